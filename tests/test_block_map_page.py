"""The live block map in a real headless Chromium (Debian's package, driven by Playwright through
its executable path; nothing is downloaded): under load, what the page shows at an event number
equals the replayed event log at that number, and a finished request's blocks turn free (or
cached, evictable). A missing browser fails this test.

BLOCK_MAP_SCREENSHOT=path saves the screenshot taken under load there (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import grpc
import numpy as np
from playwright.sync_api import sync_playwright

from deploy.run_local import running_stack
from deploy.services import free_ports, local_services
from gateway.client import stream_generate
from memory_service.audit import CACHED, FREE, USED, audit, replay, replay_states
from memory_service.events import read_log
from rpc.internal.v1 import memory_pb2, memory_pb2_grpc


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
    return path


def load(gateway: str, stop: threading.Event, errors: list) -> None:
    """Requests with shared prefixes and n=2 (cached, shared and copied-on-write blocks), 8 at a time."""
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 50000, size=48).tolist() for _ in range(3)]

    def one(i: int) -> None:
        while not stop.is_set():
            prompt = prefixes[i % 3] + rng.integers(0, 50000, size=int(rng.integers(4, 40))).tolist()
            try:
                list(
                    stream_generate(
                        gateway,
                        prompt,
                        60,
                        max_new_tokens=int(rng.integers(20, 80)),
                        temperature=1.0,
                        n=2 if i % 2 else 1,
                        ignore_eos=True,
                    )
                )
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


CLICK_A_BLOCK_IN_USE = (
    """() => {  // one JS task: no event is applied between the click and the reading
  const b = window.blockmap, id = b.poolIds()[0], block = b.states(id).findIndex(s => s >= %d);
  if (block < 0) return null;
  const at = b.blockPoint(id, block);
  const click = new MouseEvent("click", {clientX: at.x, clientY: at.y, bubbles: true});
  document.querySelector("canvas").dispatchEvent(click);
  return {seq: b.seq, id, block, detail: document.getElementById("detail").textContent};
}"""
    % USED
)


def check_click_shows_the_sequence_table(page, log) -> None:
    """Clicking a block in use shows each sequence that holds it: its table as the log has it,
    its tokens and replica; hovering shows the block's state and ref count."""
    shown = page.evaluate(CLICK_A_BLOCK_IN_USE)
    assert shown, "no block in use to click"
    tables = replay(read_log(str(log)), shown["seq"]).pools[shown["id"]].tables
    owners = [seq for seq, table in tables.items() if shown["block"] in table]
    assert owners, f"block {shown['block']} is in use on the page but in no table of the log"
    for seq in owners:
        assert f"sequence {seq} on compute-0: " in shown["detail"], shown["detail"]
        assert f"table [{', '.join(map(str, tables[seq]))}]" in shown["detail"], shown["detail"]
    at = page.evaluate(f"window.blockmap.blockPoint({shown['id']!r}, {shown['block']})")
    page.mouse.move(at["x"], at["y"])  # a real pointer this time
    assert page.locator("#tip").is_visible() and page.locator("#tip").text_content().startswith(
        f"block {shown['block']}: "
    )


def test_the_page_shows_the_logged_state_at_its_event_number_and_blocks_turn_free(tmp_path):
    log = tmp_path / "events.jsonl"
    memory, compute, gateway, m1, m2, http, page_port = free_ports(7)
    services = local_services(
        memory,
        (compute,),
        gateway,
        m1,
        m2,
        gateway_http_port=http,
        memory_http_port=page_port,
        compute_settings={"model": "dummy:tiny", "kv_budget_tokens": "4096", "max_num_seqs": "16"},
    )
    services[0].settings["event_log"] = str(log)
    with running_stack(services, timeout_s=120, log_dir=str(tmp_path)), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page_errors: list = []
        page.on(
            "pageerror", lambda error: page_errors.append(error)
        )  # an exception in the page's script fails the test
        page.goto(f"http://127.0.0.1:{page_port}/")
        page.wait_for_function("window.blockmap && window.blockmap.poolIds().length === 1")
        stop, errors = threading.Event(), []
        loader = threading.Thread(target=load, args=(f"127.0.0.1:{gateway}", stop, errors))
        loader.start()
        try:
            checked = 0
            for _ in range(5):  # several moments under load
                time.sleep(1.0)
                shown = page.evaluate(
                    "() => { const id = window.blockmap.poolIds()[0];"
                    " return {seq: window.blockmap.seq, id, states: window.blockmap.states(id)}; }"
                )
                truth = replay_states(read_log(str(log)), shown["seq"])
                assert shown["states"] == truth[shown["id"]], f"page differs from the log at event {shown['seq']}"
                checked += sum(s > CACHED for s in shown["states"]) > 0
            assert checked >= 3, "the page showed no block in use under load"
            check_click_shows_the_sequence_table(page, log)
            if os.environ.get("BLOCK_MAP_SCREENSHOT"):
                page.screenshot(path=os.environ["BLOCK_MAP_SCREENSHOT"], full_page=True)
            page.screenshot(path=str(tmp_path / "block_map.png"), full_page=True)
        finally:
            stop.set()
            loader.join()
        assert not errors, errors[:3]
        # everything finished: no block in use, on the page and in the memory service
        page.wait_for_function(
            "(() => { const id = window.blockmap.poolIds()[0];"
            " return window.blockmap.states(id).every(s => s <= 1)"
            " && window.blockmap.sequences(id).length === 0; })",
            timeout=15000,
        )
        shown = page.evaluate(
            "() => { const id = window.blockmap.poolIds()[0];"
            " return {seq: window.blockmap.seq, id, states: window.blockmap.states(id)}; }"
        )
        assert shown["states"] == replay_states(read_log(str(log)), shown["seq"])[shown["id"]]
        assert FREE in shown["states"] and page.evaluate("window.blockmap.missed") == 0
        assert not page_errors, page_errors[:3]
        with grpc.insecure_channel(f"127.0.0.1:{memory}") as channel:
            pools = memory_pb2_grpc.MemoryServiceStub(channel).Stats(memory_pb2.StatsRequest(), timeout=10).pools
        assert pools[0].num_used_blocks == 0 and pools[0].num_sequences == 0
        browser.close()
    ok, message = audit(read_log(str(log)))  # the whole run's log passes the audit
    assert ok, message
