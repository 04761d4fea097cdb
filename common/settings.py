"""Service settings: one dataclass per service, exposed as CLI flags and environment variables.

A field `kv_budget_tokens` of a config whose `env_prefix` is "COMPUTE" is the flag
`--kv-budget-tokens` and the environment variable `COMPUTE_KV_BUDGET_TOKENS`. The prefix keeps
services' variables apart in a shared environment (`GATEWAY_PORT` vs `COMPUTE_PORT`).
Precedence: flag, then env var, then the dataclass default. No torch here (the memory service uses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TypeVar

T = TypeVar("T")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(prefix: str, field: str) -> str:
    """The environment variable of one setting: `<SERVICE>_<FIELD>` (prefix = a config's env_prefix)."""
    return f"{prefix}_{field.upper()}"


def parse_value(value: str, default: Any) -> Any:
    """A setting's text (a flag or an environment variable) as the type of its default."""
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = env_name(cls.env_prefix, f.name)
        value = parse_value(os.environ[env], default) if env in os.environ else default
        parse = (lambda s, d=default: parse_value(s, d)) if isinstance(default, bool) else type(default)
        parser.add_argument(flag_name(f.name), type=parse, default=value, help=f"(env {env}, default {default})")


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    config = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    if hasattr(config, "validate"):
        config.validate()
    return config


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))
