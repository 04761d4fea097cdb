"""The settings every service reads, by environment name: what the compose and Kubernetes tests
hold their files against (one list, so the ways to run cannot drift apart)."""

from __future__ import annotations

import dataclasses

from common.settings import env_name
from compute_service.config import ComputeServiceConfig, EngineConfig
from gateway.config import GatewayConfig
from memory_service.server import MemoryServiceConfig

CONFIGS = {"memory": [MemoryServiceConfig], "compute": [ComputeServiceConfig, EngineConfig], "gateway": [GatewayConfig]}


def settings_of(role: str) -> set[str]:
    """Every environment variable a service of this role reads."""
    return {env_name(cls.env_prefix, f.name) for cls in CONFIGS[role] for f in dataclasses.fields(cls)}


def setting_default(name: str):
    """The default of the setting an environment variable names."""
    for classes in CONFIGS.values():
        for cls in classes:
            for f in dataclasses.fields(cls):
                if env_name(cls.env_prefix, f.name) == name:
                    return f.default
    raise KeyError(name)
