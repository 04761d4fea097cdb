"""Service settings: one dataclass per service, exposed as CLI flags and environment variables
of the same names (field `kv_budget_tokens` = flag `--kv-budget-tokens` = env `KV_BUDGET_TOKENS`).
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


def env_name(field: str) -> str:
    return field.upper()


def _parse(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return type(default)(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = os.environ.get(env_name(f.name))
        value = _parse(env, default) if env is not None else default
        if isinstance(default, bool):
            parser.add_argument(flag_name(f.name), type=lambda s, d=default: _parse(s, d), default=value,
                                help=f"(env {env_name(f.name)}, default {default})")
        else:
            parser.add_argument(flag_name(f.name), type=type(default), default=value,
                                help=f"(env {env_name(f.name)}, default {default})")


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    config = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    if hasattr(config, "validate"):
        config.validate()
    return config


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))
