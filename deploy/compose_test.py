"""`make compose-test`: bring docker-compose.yml up for real with podman and use it.

Steps: validate the file (`docker-compose config -q`), make a local Debian base image with
debootstrap (no registry needed), build the project image with the CPU torch wheel from a
local folder, `podman-compose up -d`, wait until every container's healthcheck passes, stream a
generation through the published gateway port with the project's client and compare it with
the in-process engine, scale compute to 2 and check both replicas serve, then `down` and
delete everything. Container storage lives in a temporary folder, never the machine's default.
Needs (Debian): podman podman-compose runc debootstrap docker-compose catatonit.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "pagedcompose"
IMAGE = "paged-nanogpt:latest"
BASE = "localbase:bookworm"
MODEL = "dummy:tiny"
PROMPT, MAX_NEW = "The meaning of life is", 16
REQUIRED = ("podman", "podman-compose", "debootstrap", "docker-compose", "runc")


def missing_tools() -> list[str]:
    return [t for t in REQUIRED if shutil.which(t) is None]


class Podman:
    """podman and podman-compose confined to one temporary storage folder."""

    def __init__(self, work: Path) -> None:
        self.work = work
        (work / "storage").mkdir()
        (work / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{work}/storage/graph"\nrunroot = "{work}/storage/run"\n')
        (work / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
            '[engine]\nruntime = "runc"\n')
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
                    "CONTAINERS_CONF": str(work / "containers.conf"), "MODEL": MODEL, "BASE_IMAGE": BASE}

    def run(self, *args: str, check: bool = True, capture: bool = False, timeout: float = 1800) -> str:
        print("+", " ".join(args), flush=True)
        result = subprocess.run(args, env=self.env, cwd=ROOT, check=check, timeout=timeout,
                                stdout=subprocess.PIPE if capture else None, text=True)
        return result.stdout or ""

    def compose(self, *args: str, **kw) -> str:
        return self.run("podman-compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args, **kw)


def make_base_image(podman: Podman) -> None:
    rootfs = podman.work / "rootfs"
    podman.run("debootstrap", "--variant=minbase", "--include=python3,python3-pip,python-is-python3,ca-certificates",
               "bookworm", str(rootfs))
    # Debian marks its Python as externally managed; the official python image does not.
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, env=podman.env, check=True)
    tar.wait()


def build_image(podman: Podman) -> None:
    wheels = ROOT / "wheels"
    local = glob.glob("/opt/wheels/torch-2.13.0*cp311*.whl")
    copied = []
    for wheel in local:  # the CPU torch wheel this kind of machine keeps on disk
        target = wheels / Path(wheel).name
        if not target.exists():
            shutil.copy(wheel, target)
            copied.append(target)
    try:
        # This machine's HTTPS goes through a proxy whose CA lives in the host's certificates:
        # the build borrows them read-only; nothing of them lands in the image.
        podman.run("podman", "build", "-t", IMAGE, "--build-arg", f"BASE_IMAGE={BASE}",
                   "--build-arg", "TORCH_INDEX_URL=" if local else "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
                   "--volume", "/etc/ssl/certs:/etc/ssl/certs:ro",
                   "--build-arg", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", str(ROOT))
    finally:
        for target in copied:
            target.unlink()


def container_ids(podman: Podman, service: str) -> list[str]:
    out = podman.run("podman", "ps", "-q", "--filter", f"label=com.docker.compose.service={service}",
                     "--filter", f"label=com.docker.compose.project={PROJECT}", capture=True)
    return out.split()


def wait_healthy(podman: Podman, services: list[str], timeout_s: float = 600) -> None:
    """Run each container's own healthcheck (podman runs none without systemd) until it passes."""
    deadline = time.monotonic() + timeout_s
    pending = {cid for s in services for cid in container_ids(podman, s)}
    assert pending, "no containers running"
    while pending and time.monotonic() < deadline:
        for cid in list(pending):
            if subprocess.run(["podman", "healthcheck", "run", cid], env=podman.env).returncode == 0:
                pending.discard(cid)
        time.sleep(2)
    if pending:
        raise TimeoutError(f"containers not healthy after {timeout_s:.0f}s: {pending}")


def generate_through_gateway() -> tuple[list[int], set[str]]:
    sys.path.insert(0, str(ROOT))
    from gateway.client import stream_generate

    tokens, replicas = [], set()
    for _ in range(4):
        tokens = []
        for r in stream_generate("127.0.0.1:50050", PROMPT, max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True):
            if r.HasField("chunk"):
                tokens.extend(r.chunk.token_ids)
            elif r.HasField("complete"):
                replicas.add(r.complete.replica)
    return tokens, replicas


def in_process_tokens() -> list[int]:
    from compute_service.engine import InferenceEngine
    from compute_service.sampling_params import SamplingParams

    engine = InferenceEngine(model=MODEL, kv_budget_tokens=1024)
    return engine.generate([PROMPT], SamplingParams(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True))[0].token_ids


def main() -> int:
    missing = missing_tools()
    if missing:
        print(f"missing tools: {missing}; on Debian: apt-get install -y podman podman-compose runc "
              "debootstrap docker-compose catatonit", file=sys.stderr)
        return 2
    subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], check=True)
    work = Path(tempfile.mkdtemp(prefix="compose-test-"))
    podman = Podman(work)
    try:
        make_base_image(podman)
        build_image(podman)
        podman.compose("up", "-d")
        wait_healthy(podman, ["memory", "compute", "gateway"])
        tokens, replicas = generate_through_gateway()
        expected = in_process_tokens()
        assert tokens == expected, f"gateway tokens {tokens} != in-process {expected}"
        print(f"one replica: tokens match the in-process engine; served by {replicas}")
        podman.compose("up", "-d", "--scale", "compute=2")
        wait_healthy(podman, ["compute"])
        podman.compose("restart", "gateway")  # re-resolve `compute` to both replicas
        wait_healthy(podman, ["gateway"])
        _, replicas = generate_through_gateway()
        assert len(replicas) == 2, f"expected both compute replicas to serve, got {replicas}"
        print(f"scaled: both replicas served: {sorted(replicas)}")
        print(json.dumps({"compose_test": "passed"}))
        return 0
    finally:
        podman.compose("down", "-t", "1", check=False)
        podman.run("podman", "system", "reset", "--force", check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
