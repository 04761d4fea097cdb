"""`make compose-test`: bring docker-compose.yml up for real with podman and use it.

Steps: validate the file (`docker-compose config -q`), make a local Debian base image with
debootstrap (no registry needed), build the project image with the CPU torch wheel from a local
folder, then drive the compose file with Docker's own `docker-compose` (1.29, Debian) talking to
`podman system service` through DOCKER_HOST: `up -d` (start-up ordered by service_healthy), stream a
generation through the published gateway port with the project's client and compare it with the in-
process engine (and the same text from POST /v1/completions on the published port 8000), `up -d
--scale compute=2` with API keys from a mounted keys file (the gateway is recreated with keys; the
new replica is discovered through the memory service) and check both replicas serve a keyed client
and a client without a key is refused, check the services authenticate each other (inside the
network, a call to the memory service without the token the memory service wrote is refused,
with it answered), check the block map (published on loopback 9102) refuses a request without the
token and shows both replicas' pools with it, then `down`. The hardening is checked too: the runtime
image has no compiler or make; in every running container the root filesystem is read-only (a write
to /, /app, /opt fails with EROFS, /tmp works), the engine applied the file's limits, and the
compute service runs the kernels from the prebuilt library (mapped into the server process, said in
its log) with no compiler and no extension cache. Container storage lives in this project's cache
folder (`$XDG_CACHE_HOME/paged-nanogpt/compose-test`, or COMPOSE_TEST_WORKDIR), never the machine's
default, on the overlay driver where the kernel has it (deploy.compose_test. storage_driver): the
base image and the image's layers (system packages, torch, the dependencies, the kernels, keyed on
their sources) are built once per machine and reused, so a later run rebuilds only what changed (the
last layer, the tree). Containers and dangling layers are removed after each run;
COMPOSE_TEST_FRESH=1 uses a temporary folder and deletes it. Podman runs healthchecks from systemd
timers, and there is no systemd here: a thread of this driver plays the timer (`podman healthcheck
run` every 2 s), so `service_healthy` still means the service's own grpc.health check passed. Needs
(Debian): podman runc debootstrap docker-compose catatonit.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from compute_service.config import DEFAULT_MODEL  # noqa: E402

PROJECT = "pagedcompose"
IMAGE = "paged-nanogpt:latest"
# The Dockerfile's build stage, tagged: else `podman image prune` deletes its layers (torch, the
# dependencies, the compiled kernels) after each run, and the next one rebuilds them.
BUILD_STAGE = "paged-nanogpt-build:cache"
BASE = "localbase:bookworm"
PROMPT, MAX_NEW = "ROMEO:", 16
API_KEY = "sk-compose-test"
REQUIRED = ("podman", "debootstrap", "docker-compose", "runc")
INSTALL_HINT = "on Debian: apt-get install -y podman runc debootstrap docker-compose catatonit (.ci/run does)"


def cache_dir() -> Path:
    """Where the container storage persists between runs (the layers are the slow part)."""
    if os.environ.get("COMPOSE_TEST_WORKDIR"):
        return Path(os.environ["COMPOSE_TEST_WORKDIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "paged-nanogpt" / "compose-test"


def storage_driver() -> str:
    """overlay where the kernel has it (layers and containers are diffs: a build and `up` copy
    nothing), else vfs (every layer and every container is a full copy of the image: minutes
    and gigabytes more). COMPOSE_TEST_STORAGE_DRIVER overrides."""
    chosen = os.environ.get("COMPOSE_TEST_STORAGE_DRIVER")
    if chosen:
        return chosen
    try:
        return "overlay" if "\toverlay\n" in Path("/proc/filesystems").read_text() else "vfs"
    except OSError:
        return "vfs"


def missing_tools() -> list[str]:
    return [t for t in REQUIRED if shutil.which(t) is None]


class Podman:
    """podman, its Docker-API socket and docker-compose, confined to one storage folder."""

    def __init__(self, work: Path) -> None:
        self.work = work
        driver = storage_driver()
        storage = work / f"storage-{driver}"  # one folder per driver: they cannot share layers
        storage.mkdir(exist_ok=True)
        (work / "storage.conf").write_text(
            f'[storage]\ndriver = "{driver}"\ngraphroot = "{storage}/graph"\nrunroot = "{storage}/run"\n'
        )
        (work / "containers.conf").write_text(
            '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n'
        )
        self.socket = work / "podman.sock"
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
            "CONTAINERS_CONF": str(work / "containers.conf"),
            "DOCKER_HOST": f"unix://{self.socket}",
            "BASE_IMAGE": BASE,
            "COMPOSE_HTTP_TIMEOUT": "600",
        }
        self.env.pop("MODEL", None)  # the compose file's default model is the one under test
        self._service: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._health_timer, daemon=True)

    def run(self, *args: str, check: bool = True, capture: bool = False, timeout: float = 1800) -> str:
        shown = (a.strip().splitlines()[0] + " ..." if "\n" in a else a for a in args)  # scripts: their first line
        print("+", " ".join(shown), flush=True)
        result = subprocess.run(
            args,
            env=self.env,
            cwd=ROOT,
            check=check,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            text=True,
        )
        return result.stdout or ""

    def compose(self, *args: str, **kw) -> str:
        return self.run("docker-compose", "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args, **kw)

    def start_api(self) -> None:
        """The Docker API that docker-compose talks to, and the healthcheck timer."""
        self._service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"], env=self.env
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if time.monotonic() > deadline or self._service.poll() is not None:
                raise RuntimeError("podman system service did not start")
            time.sleep(0.2)
        self._timer.start()

    def stop_api(self) -> None:
        self._stop.set()
        if self._service is not None:
            self._service.terminate()
            self._service.wait(timeout=30)

    def container_ids(self, service: str | None = None) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = subprocess.run(["podman", "ps", "-q", *filters], env=self.env, capture_output=True, text=True)
        return out.stdout.split()

    def _health_timer(self) -> None:
        while not self._stop.wait(2.0):
            for cid in self.container_ids():
                subprocess.run(["podman", "healthcheck", "run", cid], env=self.env, capture_output=True)

    def health(self, cid: str) -> str:
        out = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.Health.Status}}", cid],
            env=self.env,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()


def make_base_image(podman: Podman) -> None:
    rootfs = podman.work / "rootfs"
    podman.run(
        "debootstrap",
        "--variant=minbase",
        "--include=python3,python3-dev,python3-pip,python-is-python3,ca-certificates",
        "bookworm",
        str(rootfs),
    )
    # Debian marks its Python as externally managed; the official python image does not.
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, env=podman.env, check=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)  # imported: the image holds it now


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
        # the build borrows them read-only (Debian's pip reads the system bundle); nothing of
        # them lands in the image.
        for target in (["--target", "build", "-t", BUILD_STAGE], ["-t", IMAGE]):  # the second reuses the first
            podman.run(
                "podman",
                "build",
                *target,
                "--build-arg",
                f"BASE_IMAGE={BASE}",
                "--build-arg",
                "TORCH_INDEX_URL=" if local else "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
                "--volume",
                "/etc/ssl/certs:/etc/ssl/certs:ro",
                str(ROOT),
            )
    finally:
        for target in copied:
            target.unlink()


# Compilers and build tools the runtime stage must not have (PATH lookups, versioned names such as
# x86_64-linux-gnu-g++-12, and GCC's own cc1/cc1plus).
NO_COMPILER_CHECK = r"""
import glob, os, re, shutil
names = ("gcc", "g++", "cc", "c++", "cpp", "make", "clang", "clang++", "ld")
found = {shutil.which(n) for n in names} - {None}
for d in filter(os.path.isdir, os.environ["PATH"].split(os.pathsep)):
    found |= {os.path.join(d, f) for f in os.listdir(d) if re.search(r"(^|-)(gcc|g\+\+|clang|c\+\+)(-[0-9.]+)?$", f)}
found |= set(glob.glob("/usr/lib/gcc/*/*/cc1*") + glob.glob("/usr/libexec/gcc/*/*/cc1*"))
print("compilers:", sorted(found))
"""

# Run inside each service's container (as its user): the root filesystem is read-only, /tmp is
# not; in compute, the server process has the prebuilt kernel library mapped.
RUNNING_CHECK = r"""
import errno, glob, os, sys
for d in ("/", "/app", "/opt/kernels", "/opt/venv"):
    try:
        open(os.path.join(d, ".write-probe"), "w").close()
    except OSError as exc:
        assert exc.errno == errno.EROFS, f"{d}: {exc} (expected EROFS: a read-only root filesystem)"
    else:
        raise AssertionError(f"{d} is writable")
with open("/tmp/.write-probe", "w") as f:
    f.write("ok")
os.remove("/tmp/.write-probe")
report = "read-only root (EROFS on /, /app, /opt; /tmp writable)"
if sys.argv[1] == "compute":
    lib = "/opt/kernels/paged_nanogpt_cpu_kernels.so"  # the image's PAGED_NANOGPT_KERNELS
    mapped = []
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            if lib in open(maps).read():
                mapped.append(maps.split("/")[2])
        except OSError:
            pass
    assert mapped, f"no process has {lib} mapped"
    assert not glob.glob("/tmp/**/torch_extensions", recursive=True), "an extension cache: built at run time"
    report += f"; kernels {lib} mapped by pid {','.join(mapped)}"
print(report)
"""


def check_no_compiler(podman: Podman, cid: str) -> None:
    """In a running container of the image (podman 4.3's `run --rm` takes 20 s to return here)."""
    out = podman.run("podman", "exec", cid, "python", "-c", NO_COMPILER_CHECK, capture=True)
    assert out.strip() == "compilers: []", f"the runtime image has build tools: {out.strip()}"
    print("runtime image: no compiler, no make")


def check_hardened(podman: Podman, service: str) -> None:
    """The file's hardening as the engine applied it, and as the processes inside see it."""
    (cid,) = podman.container_ids(service)
    out = podman.run("podman", "exec", cid, "python", "-c", RUNNING_CHECK, service, capture=True)
    host = json.loads(podman.run("podman", "inspect", "--format", "{{json .HostConfig}}", cid, capture=True))
    assert host["ReadonlyRootfs"] is True, f"{service}: root filesystem not read-only"
    assert host["Memory"] > 0 and host["NanoCpus"] > 0 and host["PidsLimit"] > 0, f"{service}: no limits"
    assert any("no-new-privileges" in opt for opt in host.get("SecurityOpt") or []), f"{service}: {host['SecurityOpt']}"
    assert "CAP_NET_RAW" in host["CapDrop"] and not host.get("CapAdd"), f"{service}: capabilities kept"
    print(
        f"{service}: {out.strip()}; limits: {host['Memory'] // 2**20} MiB, {host['NanoCpus'] / 1e9:g} CPUs, "
        f"{host['PidsLimit']} pids; capabilities dropped, no-new-privileges"
    )
    if service == "compute":
        logs = subprocess.run(["podman", "logs", cid], env=podman.env, capture_output=True, text=True)
        text = logs.stdout + logs.stderr
        assert "C++ CPU kernels loaded from the prebuilt library /opt/kernels/" in text, text[-3000:]
        assert "PyTorch paths" not in text, text[-3000:]


def wait_healthy(podman: Podman, services: list[str], count: int = 1, timeout_s: float = 600) -> None:
    """Until `count` containers of each service report healthy (the timer thread runs the checks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        healthy = {s: [c for c in podman.container_ids(s) if podman.health(c) == "healthy"] for s in services}
        if all(len(ids) >= count for ids in healthy.values()):
            return
        time.sleep(1)
    raise TimeoutError(f"not healthy after {timeout_s:.0f}s: {healthy}")


def generate_through_gateway(times: int = 4, vary: bool = False, api_key: str = "") -> tuple[list[int], set[str]]:
    """Generate `times` times (with `vary`, prompts that share no prefix: kv-aware routing
    would rightly keep repeats of one prompt on the replica that caches it)."""
    from gateway.client import stream_generate

    tokens, replicas = [], set()
    for i in range(times):
        tokens = []
        prompt = f"Request {i}: {PROMPT}" if vary else PROMPT
        stream = stream_generate(
            "127.0.0.1:50050", prompt, api_key=api_key, max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True
        )
        for r in stream:
            if r.HasField("chunk"):
                tokens.extend(r.chunk.token_ids)
            elif r.HasField("complete"):
                replicas.add(r.complete.replica)
    return tokens, replicas


def http_completion_text() -> str:
    """The same greedy generation through the published OpenAI HTTP port (8000)."""
    import urllib.request

    body = json.dumps({"prompt": PROMPT, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}).encode()
    request = urllib.request.Request(
        "http://127.0.0.1:8000/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["choices"][0]["text"]


def block_map_pools(token: str) -> list[dict]:
    """The pools the memory service's block map shows, through its port published on loopback
    (9102), which answers 401 without the internal token."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen("http://127.0.0.1:9102/state", timeout=30)
        raise AssertionError("the block map answered without the internal token")
    except urllib.error.HTTPError as refused:
        assert refused.code == 401, refused.code
    auth = {"authorization": f"Bearer {token}"}
    with urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:9102/", headers=auth), timeout=30) as response:
        assert b"KV block map" in response.read(), "9102 does not serve the block map page"
    with urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:9102/state", headers=auth), timeout=30) as r:
        return json.load(r)["pools"]


# Run inside the gateway's container: the memory service without the token, then with it.
INTERNAL_AUTH_CHECK = """
import grpc
from common.grpc_auth import internal_channel
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc
import asyncio

async def ask(token_file):
    async with internal_channel("memory:50051", token_file) as channel:
        try:
            await memory_pb2_grpc.MemoryServiceStub(channel).ListReplicas(memory_pb2.ListReplicasRequest(), timeout=10)
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name

print(asyncio.run(ask("")), asyncio.run(ask("/run/internal-token/token")))
"""


def check_internal_auth(podman: Podman) -> str:
    """The services authenticate each other: the memory service refuses a caller inside the
    network without the token and answers one with it. Returns the token (for the block map)."""
    (gateway,) = podman.container_ids("gateway")
    out = podman.run("podman", "exec", gateway, "python", "-c", INTERNAL_AUTH_CHECK, capture=True)
    assert out.split() == ["UNAUTHENTICATED", "OK"], out
    print("inside the network: the memory service refuses a caller without the internal token")
    return podman.run("podman", "exec", gateway, "cat", "/run/internal-token/token", capture=True).strip()


def check_keys_required() -> None:
    """With the keys file mounted, a client without a key is refused."""
    import grpc

    try:
        generate_through_gateway(times=1)
        raise AssertionError("the gateway served a client without a key")
    except grpc.RpcError as refused:
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, refused


def in_process_tokens() -> list[int]:
    from bench.local_engine import LocalEngine
    from common.sampling_params import SamplingParams

    engine = LocalEngine(model=DEFAULT_MODEL, kv_budget_tokens=1024)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    return engine.generate([PROMPT], params)[0].token_ids


def main() -> int:
    missing = missing_tools()
    if missing:
        print(f"missing tools: {missing}; {INSTALL_HINT}", file=sys.stderr)
        return 2
    subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], check=True)
    fresh = os.environ.get("COMPOSE_TEST_FRESH") == "1"
    work = Path(tempfile.mkdtemp(prefix="compose-test-")) if fresh else cache_dir()
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / "lock", "w")  # held for the whole run
    fcntl.flock(lock, fcntl.LOCK_EX)  # one run at a time per storage folder
    podman = Podman(work)
    try:
        if not podman.run("podman", "images", "-q", BASE, capture=True).strip():
            make_base_image(podman)
        build_image(podman)
        podman.start_api()
        podman.compose("up", "-d")
        wait_healthy(podman, ["memory", "compute", "gateway"])
        check_no_compiler(podman, podman.container_ids("compute")[0])
        for service in ("memory", "compute", "gateway"):
            check_hardened(podman, service)
        tokens, replicas = generate_through_gateway()
        expected = in_process_tokens()
        assert tokens == expected, f"gateway tokens {tokens} != in-process {expected}"
        from common.tokenizer import get_tokenizer

        http_text = http_completion_text()
        assert http_text == get_tokenizer().decode(expected), f"HTTP text {http_text!r} != gRPC's"
        print("HTTP /v1/completions on the published port 8000: the same text")
        print(f"one replica ({DEFAULT_MODEL}): tokens match the in-process engine; served by {replicas}")
        # Keys from a mounted file (never the environment), the open default switched off.
        (work / "api_keys.txt").write_text(f"{API_KEY} compose-test\n")
        podman.env.update(API_KEYS_FILE=str(work / "api_keys.txt"))
        podman.compose("up", "-d", "--scale", "compute=2")
        wait_healthy(podman, ["compute"], count=2)
        wait_healthy(podman, ["gateway"])
        time.sleep(1.0)  # the gateway discovers both replicas (polls every 0.5 s)
        _, replicas = generate_through_gateway(times=6, vary=True, api_key=API_KEY)
        assert len(replicas) == 2, f"expected both compute replicas to serve, got {replicas}"
        print(f"scaled, keys required: both replicas served a keyed client: {sorted(replicas)}")
        check_keys_required()
        print("a client without a key: UNAUTHENTICATED")
        pools = block_map_pools(check_internal_auth(podman))
        assert len(pools) == 2 and all(p["num_blocks"] > 0 for p in pools), pools
        print(f"block map on 127.0.0.1:9102: {len(pools)} pools ({pools[0]['num_blocks']} blocks each)")
        print(json.dumps({"compose_test": "passed"}))
        return 0
    finally:
        podman.compose("down", "-t", "1", "--remove-orphans", check=False)
        podman.stop_api()
        if fresh:
            podman.run("podman", "system", "reset", "--force", check=False)
            shutil.rmtree(work, ignore_errors=True)
        else:  # keep the images for the next run; nothing else
            podman.run("podman", "container", "prune", "-f", check=False)
            podman.run("podman", "image", "prune", "-f", check=False)
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
