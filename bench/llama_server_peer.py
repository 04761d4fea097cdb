"""llama.cpp's own server (`llama-server`, built by bench/build_llama_server.py) on our weights.

The serving peer of `bench.serve --peers llama-server`: the GGUF that bench/llama_cpp_peer.py
writes from the same model spec (f32, as our weights), on the same cores and the same KV pool,
driven over its OpenAI endpoint with the same requests as our gateway. Every flag, and why
(each checked against this build's `llama-server --help`, llama.cpp 0c1e570 in the 0.3.36 sdist):
  -m GGUF --host 127.0.0.1 --port P   loopback, a free port
  -t N -tb N        N = torch's threads in this process: the cores our one compute replica uses
  -c POOL           the KV cache's tokens = our --kv-budget-tokens (one pool for all slots)
  --kv-unified      one KV buffer shared by every slot, as our block pool (else -c is split n ways)
  -ctk f32 -ctv f32 our KV cache is fp32 (llama.cpp's default is f16: half the bytes per token)
  --cache-ram 0     its host-RAM prompt cache (8192 MiB by default) would hold prompts far beyond
                    our pool; 0 turns it off (and with it --cache-idle-slots, which needs it)
  -np SLOTS         slots = requests in flight at once; default our --max-num-seqs (the admission
                    cap of our engine); with --kv-unified slots cost no KV of their own. It has no
                    preemption: when the requests in flight fill the pool, every one of them fails
                    ("Context size has been exceeded"); fewer slots (bench.serve --peer-slots,
                    e.g. pool // longest request) make it queue instead
  -cb               continuous batching (its default; written so the command says it)
  -fa auto          flash attention as llama.cpp decides (its default; the decode peer's too): on
                    this CPU build its log says "Flash Attention enabled"
  --fit off         do not shrink unset parameters to "fit device memory": we set what matters
  --no-webui        no browser UI (the build embeds none anyway)
Left at llama.cpp's defaults: -b 2048 -ub 512, prompt caching per slot (cache_prompt, the
prefix reuse llama-server has: an idle slot reuses its own previous prompt's KV, slots share none),
--slot-prompt-similarity 0.1, no context shift, -lm auto (the GGUF memory-mapped: -lm none made no
difference here), --poll 50 (its threads spin a while waiting for work), warm-up at start.
LLAMA_ARG_* variables are removed from its environment so that nothing outside this list
configures it. Its OpenMP threads meet at a barrier after every op: with -t equal to the cores,
another job on the machine stalls it far more than it stalls us (a 2-core VM with ~1 core taken
by a test run: 56-230 ms a token single-stream, against 14-16 ms idle), so time it on a quiet
machine; bench/serve_peers.py prints what other processes used during each arm.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.build_llama_server import binary_path


def server_flags(gguf: str | os.PathLike, port: int, threads: int, pool_tokens: int, slots: int) -> list[str]:
    """The command line after the binary (the module docstring says why each flag)."""
    return [
        *("-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("-t", str(threads), "-tb", str(threads)),
        *("-c", str(pool_tokens), "--kv-unified", "-ctk", "f32", "-ctv", "f32"),
        *("--cache-ram", "0", "-np", str(slots), "-cb", "-fa", "auto", "--fit", "off", "--no-webui"),
    ]


def require_binary() -> Path:
    path = binary_path()
    if not path.exists():
        raise SystemExit(
            f"{path} not found: run `make peers` (python -m bench.build_llama_server) or set LLAMA_SERVER_BIN"
        )
    return path


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set so far (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class LlamaServer:
    """`with LlamaServer(gguf, threads, pool_tokens, slots) as server:` started and healthy inside
    (server.url, server.startup_s = spawn to the first healthy /health); stopped cleanly after
    (SIGTERM, then SIGKILL after `stop_timeout_s`). Its log goes to a file in `log_dir` (kept), or
    to a temporary file removed on exit; its tail is raised with any failure to start."""

    gguf: str | os.PathLike
    threads: int
    pool_tokens: int
    slots: int
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0
    log_dir: str | os.PathLike | None = None
    port: int = 0
    startup_s: float = float("nan")
    command: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LlamaServer":
        from deploy.services import free_ports

        self.port = self.port or free_ports(1)[0]
        self.command = [
            str(require_binary()),
            *server_flags(self.gguf, self.port, self.threads, self.pool_tokens, self.slots),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", dir=self.log_dir, delete=False)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        """/health answers 503 while the model loads and 200 once it serves."""
        while time.perf_counter() - t0 < self.start_timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200 and json.load(response).get("status") == "ok":
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while loading
            time.sleep(0.05)
        raise TimeoutError(f"llama-server not healthy after {self.start_timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(Path(self._log.name).read_text(errors="replace").splitlines()[-lines:])

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.log_dir is None:
            os.unlink(self._log.name)
