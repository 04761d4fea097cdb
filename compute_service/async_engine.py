"""Runs InferenceEngine.step() on a thread of its own and hands each request's outputs to the
asyncio side through a queue, so the gRPC event loop (health checks, streams) never waits on a
forward pass.

It also keeps the replica's link to the memory service: when the memory side loses the pool
(MemoryLost), the loop reports not-serving, registers again until it can (aborts still come
through meanwhile), drops the sequences whose streams are gone, and recomputes the others in
the new pool: their clients see a stall, never an error or a changed token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from common.failures import REPLICA_SCOPE, REQUEST_SCOPE
from common.sampling_params import SamplingParams
from compute_service.engine import InferenceEngine
from compute_service.memory_client import MemoryClient
from compute_service.outputs import RequestOutput
from compute_service.sequence import FinishReason
from memory_service.contract import MemoryLost

log = logging.getLogger(__name__)


@dataclass
class EngineFailure:
    """Put on a request's queue when the engine cannot finish it; `status` is the gRPC status
    the servicer ends the call with (INTERNAL: the engine loop failed; UNAVAILABLE: this replica
    gives the request up, e.g. draining, and the gateway continues it elsewhere), `scope` who it
    is about (common.failures; "" = none)."""

    message: str
    status: str = "INTERNAL"
    scope: str = ""


class AsyncEngine:
    def __init__(
        self,
        engine: InferenceEngine,
        max_waiting: int = 256,
        memory: MemoryClient | None = None,
        on_serving_change: Callable[[bool], None] | None = None,
    ) -> None:
        """`on_serving_change(serving)` is called from the engine thread when the memory link
        is lost or back (the server flips its health status there)."""
        self.engine = engine
        self.max_waiting = max_waiting
        self.memory = memory
        self.on_serving_change = on_serving_change
        self.memory_ok = True

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._undelivered: list[RequestOutput] = []  # the last step's outputs, handed out next step
        if memory is not None:
            memory.on_lost = self._wake.set  # an idle loop wakes up to register again

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def num_pending(self) -> int:
        return len(self._streams)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] = (),
        sample_outputs: dict[int, list[int]] | None = None,
        grammars: dict[int, object] | None = None,
    ) -> asyncio.Queue:
        """Validate now (ValueError for the caller), queue for the engine thread, return the
        stream (every sample's outputs, with their index). `grammars`: the engine's
        compile_grammar(...), built by the caller off the event loop."""
        if request_id in self._streams:
            raise KeyError(request_id)
        self.engine.validate_request(prompt_token_ids, params, output_token_ids, sample_outputs)
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        self._inbox.put(("add", request_id, prompt_token_ids, params, output_token_ids, sample_outputs, grammars))
        self._wake.set()
        return out

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._drain_inbox()
            if self.memory is not None and self.memory.lost.is_set():
                self._deliver_undelivered()  # what the last step produced goes out before the wait
                self._recover_memory("the memory link failed")
                continue
            if not engine.has_unfinished():
                self._deliver_undelivered()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                # The event loop turns the last step's tokens into gRPC messages while this step's
                # forward runs (torch drops the GIL), not while the memory call waits for the GIL.
                outputs = engine.step(before_forward=self._deliver_undelivered)
            except MemoryLost as exc:
                self._deliver_undelivered()
                self._recover_memory(str(exc))
                continue
            except Exception:  # keep serving: fail the requests in flight, log once
                log.exception("engine step failed")
                self._deliver_undelivered()
                self._fail_all("the engine step failed (logged on the replica)")
                continue
            self._undelivered = outputs
        self._deliver_undelivered()

    def _recover_memory(self, why: str) -> None:
        """Not serving until the pool is registered again; then every sequence still streamed is
        recomputed there, and the ones nobody waits for any more (cancelled meanwhile) are dropped."""
        log.warning(
            "memory link lost (%s): not serving; %d sequence(s) will be recomputed", why, self.engine.forget_memory()
        )
        self._set_serving(False)
        while True:
            if self._stop.is_set():
                return  # stopping: stay not-serving
            try:
                self.memory.reconnect()
                break
            except MemoryLost as exc:
                log.info("%s; retrying", exc)
                self._drain_inbox()  # aborts still arrive while we wait
                self._stop.wait(0.5)
        self._drain_inbox()
        for request_id in self.engine.unfinished_ids():
            if request_id not in self._streams:
                self.engine.abort(request_id)
        self._set_serving(True)

    def _set_serving(self, serving: bool) -> None:
        self.memory_ok = serving
        if self.on_serving_change is not None:
            self.on_serving_change(serving)

    def give_up_all(self, message: str) -> None:
        """End every stream with UNAVAILABLE (the gateway continues them elsewhere): a drain whose
        time ran out. Called from the event loop; the engine thread frees their blocks."""
        for request_id in list(self._streams):
            self.abort(request_id)
            self._deliver_failure(request_id, message, "UNAVAILABLE", REPLICA_SCOPE)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, request_id, prompt, params, outputs_before, sample_outputs, grammars = item
                if request_id not in self._streams:
                    continue  # cancelled before it reached the engine
                try:
                    self.engine.enqueue_validated(prompt, params, request_id, outputs_before, sample_outputs, grammars)
                except ValueError as exc:  # the id is still in the engine (its stream just ended)
                    self._deliver_failure(request_id, str(exc))
                except Exception:  # this request's data broke its admission: it alone fails
                    log.exception("request %s: queueing it failed; failing it alone", request_id)
                    self.engine.abort(request_id)  # whatever of it was queued
                    self._deliver_failure(
                        request_id,
                        "request failed: the engine could not queue it (logged on the replica)",
                        "INTERNAL",
                        REQUEST_SCOPE,
                    )
            else:
                if not self.engine.abort(item[1]):
                    self._streams.pop(item[1], None)  # not in the engine (yet): nothing to free

    def _deliver_undelivered(self) -> None:
        """One wake-up of each event loop per step, however many requests got tokens. A request
        that failed by itself (finish_reason "error") ends with an EngineFailure of REQUEST_SCOPE
        in place of its result."""
        outputs, self._undelivered = self._undelivered, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        ended, failed = set(), set()
        for out in outputs:
            target = self._streams.get(out.group_id)  # every sample of a request feeds its stream
            if out.finished and not self.engine.is_active(out.group_id):  # its last sample ended
                ended.add(out.group_id)  # (its other samples may have ended in the same step)
            if target is None or out.group_id in failed:
                continue
            if out.finish_reason == FinishReason.ERROR.value:
                failed.add(out.group_id)  # its other samples ended with it: one failure ends the call
                by_loop.setdefault(target[0], []).append(
                    (target[1], EngineFailure(f"request failed: {out.error}", "INTERNAL", REQUEST_SCOPE))
                )
            else:
                by_loop.setdefault(target[0], []).append((target[1], out))
        for request_id in ended:
            self._streams.pop(request_id, None)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver_failure(self, request_id: str, message: str, status: str = "INTERNAL", scope: str = "") -> None:
        target = self._streams.pop(request_id, None)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, EngineFailure(message, status, scope))

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._deliver_failure(request_id, message)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)
