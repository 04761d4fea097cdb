"""docker-compose.yml starts what `make run` starts: same modules, ports, settings and health
checks, with only the gateway (and the block map, on loopback) published. (Bringing it up for
real: tests/test_compose_up.py.)"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.settings import env_name
from compute_service.config import ComputeServiceConfig
from deploy.services import ENV_PREFIXES, local_services
from gateway.config import GatewayConfig
from tests.settings_names import CONFIGS, settings_of

ROOT = Path(__file__).resolve().parent.parent
NOT_SETTINGS = {"OMP_NUM_THREADS"}  # torch's threads, set with compute's CPU limit (as deploy/k8s does)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_each_service_reads_its_own_prefixed_variables():
    for role, classes in CONFIGS.items():
        assert {cls.env_prefix for cls in classes} == {ENV_PREFIXES[role]}
    names = [
        env_name(cls.env_prefix, f.name)
        for classes in CONFIGS.values()
        for cls in classes
        for f in dataclasses.fields(cls)
    ]
    assert len(names) == len(set(names)), "two settings read the same variable"


def test_services_match_the_local_launcher(compose):
    services = compose["services"]
    assert set(services) == set(CONFIGS)
    for spec in local_services():
        svc = services[spec.name]
        env = {k: str(v) for k, v in svc["environment"].items()}
        launcher = spec.environment(host="0.0.0.0")
        command = svc["command"] if spec.role != "memory" else svc["command"][-1].split("&& exec ")[-1].split()
        assert command == ["python", "-m", spec.module]
        prefix = ENV_PREFIXES[spec.role]
        assert env[f"{prefix}_PORT"] == str(spec.port) and env[f"{prefix}_HOST"] == "0.0.0.0"
        missing = set(launcher) - {f"{prefix}_REPLICA"} - set(env)
        assert not missing, f"{spec.name}: launcher settings missing in compose: {missing}"
        assert set(launcher) <= settings_of(spec.role), f"{spec.name}: the launcher sets an unknown setting"
        assert set(env) - NOT_SETTINGS <= settings_of(spec.role), f"{spec.name}: compose sets an unknown setting"
        check = svc["healthcheck"]["test"]
        assert check == ["CMD", "python", "-m", "common.healthcheck", f"127.0.0.1:{spec.port}", spec.health_service]


def test_only_the_gateway_and_the_block_map_are_published_and_startup_is_ordered(compose):
    services = compose["services"]
    assert compose["networks"]["internal"]["internal"] is True
    assert "ports" not in services["compute"] and services["compute"]["networks"] == ["internal"]
    assert services["memory"]["ports"] == ["127.0.0.1:9102:9102"], "the block map only, on the host's loopback"
    assert services["memory"]["environment"]["MEMORY_HTTP_PORT"] == "9102"
    publish = "${GATEWAY_PUBLISH:-127.0.0.1}"  # the host's loopback unless the operator says otherwise
    assert sorted(services["gateway"]["ports"]) == [f"{publish}:{p}:{p}" for p in (50050, 8000, 9100)]
    assert "depends_on" not in services["memory"]
    assert services["compute"]["depends_on"] == {"memory": {"condition": "service_healthy"}}
    assert services["gateway"]["depends_on"] == {"compute": {"condition": "service_healthy"}}
    assert services["gateway"]["environment"]["GATEWAY_COMPUTE_ADDRESSES"] == "", "compose discovers its replicas"
    assert "COMPUTE_ADVERTISE_ADDRESS" not in services["compute"]["environment"], (
        "each scaled replica must advertise its own address (derived, not one fixed value)"
    )
    assert all(s.get("init") is True for s in services.values()), "fast shutdown needs an init process"


def test_docker_compose_validates_the_file():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (.ci/run installs it on Debian)")
    subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], check=True)


def test_compose_serves_the_engine_default_model(compose):
    from compute_service.config import DEFAULT_MODEL

    assert compose["services"]["compute"]["environment"]["COMPUTE_MODEL"] == f"${{MODEL:-{DEFAULT_MODEL}}}"


def test_the_readme_settings_table_names_every_setting():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]  # other tables may quote flags
    table = {line.split("|")[3].strip() for line in section.splitlines() if line.startswith("| ") and "`--" in line}
    listed = {name.strip(" `") for cell in table for name in cell.split(",")}
    every = set().union(*(settings_of(role) for role in CONFIGS))
    assert listed == every, f"missing from the README: {every - listed}; not a setting: {listed - every}"


def test_stop_grace_period_covers_the_drain_timeouts(compose):
    """`docker compose stop` must not SIGKILL a replica that is still draining."""
    grace = {name: svc.get("stop_grace_period", "10s") for name, svc in compose["services"].items()}
    drain = {"compute": ComputeServiceConfig.drain_timeout_s, "gateway": GatewayConfig.drain_timeout_s}
    for name, timeout_s in drain.items():
        assert grace[name].endswith("s") and float(grace[name][:-1]) > timeout_s, (name, grace[name])


def dockerfile_stages() -> tuple[list[str], list[list[str]]]:
    """The Dockerfile's instructions (continuations joined, comments dropped): those before the
    first FROM, then each stage's."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    starts = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return lines[: starts[0]], [lines[a:b] for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]


def test_the_image_builds_in_one_stage_and_runs_in_another_without_a_compiler(compose):
    from compute_service import native

    preamble, stages = dockerfile_stages()
    (arg,) = [line for line in preamble if line.startswith("ARG BASE_IMAGE=")]
    default = arg.split("=", 1)[1]
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", default), "the default base is pinned by digest"
    assert compose["x-service"]["build"]["args"]["BASE_IMAGE"] == f"${{BASE_IMAGE:-{default}}}"
    assert len(stages) == 2 and all(stage[0].split()[1] == "${BASE_IMAGE}" for stage in stages)
    build, runtime = stages
    assert build[0].endswith(" AS build")
    assert any(" g++ " in line for line in build if line.startswith("RUN "))
    assert any("compute_service.native --build --require --install-to /opt/kernels" in line for line in build)
    for line in runtime:
        assert not re.search(r"\b(g\+\+|gcc|clang|make|build-essential)\b", line), f"a build tool at run time: {line}"
    env = dict(
        item.split("=", 1) for line in runtime if line.startswith("ENV ") for item in line.split()[1:] if "=" in item
    )
    assert env["PAGED_NANOGPT_KERNELS"] == f"/opt/kernels/{native.MODULE}.so"
    assert "COPY --from=build /opt/kernels /opt/kernels" in runtime
    assert "TORCH_EXTENSIONS_DIR" not in env, "the runtime never builds: no extension cache"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HOME"] == "/tmp" and env["XDG_CACHE_HOME"].startswith("/tmp")
    (user,) = [line for line in runtime if line.startswith("USER ")]
    assert user == "USER 10001:10001", "numeric: Kubernetes' runAsNonRoot can check it"


def memory_bytes(quantity: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    return int(quantity[:-1]) * units[quantity[-1]] if quantity[-1] in units else int(quantity)


def test_every_service_runs_read_only_unprivileged_and_limited(compose):
    """Read-only root with a tmpfs /tmp, no capabilities, no privilege escalation, memory, CPU
    and process limits; compute's memory limit holds the default model and pool, and the
    README's larger example (deploy.sizing)."""
    from deploy.sizing import replica_memory

    for name, svc in compose["services"].items():
        assert svc["read_only"] is True, name
        assert [t.split(":")[0] for t in svc["tmpfs"]] == ["/tmp"], name
        assert svc["security_opt"] == ["no-new-privileges:true"], name
        assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc and not svc.get("privileged"), name
        assert memory_bytes(svc["mem_limit"]) >= 256 * 2**20 and 0 < float(svc["cpus"]) <= 2, name
        assert 64 <= svc["pids_limit"] <= 4096, name
    compute = compose["services"]["compute"]
    default = {k: re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", str(v)) for k, v in compute["environment"].items()}
    for model, tokens in ((default["COMPUTE_MODEL"], int(default["COMPUTE_KV_BUDGET_TOKENS"])), ("dummy:gpt2", 8192)):
        need = replica_memory(model, tokens).suggested_limit_bytes
        assert need <= memory_bytes(compute["mem_limit"]), f"{model} with {tokens} tokens needs {need >> 20} MiB"
    assert compute["environment"]["OMP_NUM_THREADS"] == str(compute["cpus"]), "torch's threads = the CPU limit"


def test_the_services_authenticate_each_other_with_the_token_services_volume(compose):
    services = compose["services"]
    memory = services["memory"]  # writes the token before it starts; the others wait for it to be healthy
    assert memory["command"][:2] == ["sh", "-c"] and memory["command"][2].startswith(
        "python -m common.grpc_auth new-token /run/internal-token/token && exec "
    )
    assert memory["volumes"] == ["internal-token:/run/internal-token"]
    for name, prefix in ENV_PREFIXES.items():
        svc = services[name]
        assert svc["environment"][f"{prefix}_INTERNAL_TOKEN_FILE"] == "/run/internal-token/token", name
        if name != "memory":
            assert "internal-token:/run/internal-token:ro" in svc["volumes"], f"{name}: the token's volume, read-only"
            assert svc["depends_on"] in (
                {"memory": {"condition": "service_healthy"}},
                {"compute": {"condition": "service_healthy"}},
            )
        assert f"{prefix}_ALLOW_UNAUTHENTICATED" not in svc["environment"] or name == "gateway"
    assert compose["volumes"] == {"internal-token": {}}


def test_the_gateway_reads_keys_from_a_mounted_file_and_is_open_only_on_loopback(compose):
    gateway = compose["services"]["gateway"]
    env = gateway["environment"]
    assert "GATEWAY_API_KEYS" not in env, "keys never pass through the environment"
    assert env["GATEWAY_API_KEYS_FILE"] == "/run/secrets/api-keys/keys"  # where Kubernetes mounts its Secret too
    assert "${API_KEYS_FILE:-./deploy/compose/no-api-keys.txt}:/run/secrets/api-keys/keys:ro" in gateway["volumes"]
    assert env["GATEWAY_ALLOW_UNAUTHENTICATED"] == "${GATEWAY_ALLOW_UNAUTHENTICATED:-false}"
    # Open only where published on loopback: the gateway checks the address its ports are published on.
    assert env["GATEWAY_EXPOSED_HOST"] == "${GATEWAY_PUBLISH:-127.0.0.1}"
    assert all(p.startswith("${GATEWAY_PUBLISH:-127.0.0.1}:") for p in gateway["ports"])
    from gateway.auth import read_keys

    assert read_keys(str(ROOT / "deploy/compose/no-api-keys.txt")) == [], "the default file holds no key"
