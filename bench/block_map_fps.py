"""How smooth the live block map is at scale: one pool of 16,384 blocks, 64 sequences running,
the page open in headless Chromium (Debian's package through Playwright), on this machine.

    python -m bench.block_map_fps --seconds 20

A stack with the tiny dummy model (so the model is not what is measured) and a KV budget of
`--blocks` x 16 tokens serves `--seqs` streams at once (shared prefixes, so cached and shared
blocks appear), while the page draws every update. Printed, per second of load: frames the page
drew (one redraw per batch of events, at most ~50/s as the stream coalesces events every 20 ms),
frames the browser offered (requestAnimationFrame ticks, 60/s when the main thread keeps up),
the sequences and blocks in use the page showed, and the time one full redraw of the grid took.
Browser, stack and load share the same 2 cores, so this is a floor, not a best case.
The last line: `block_map_fps=<median frames drawn/s> raf_per_s=<median> draw_ms_p99=<...>`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time

import grpc
import numpy as np
from playwright.sync_api import sync_playwright

from bench.quick import add_quick_flag, apply_quick, at_most
from deploy.run_local import running_stack
from deploy.services import free_ports, local_services
from gateway.client import stream_generate

SHOW = (
    "() => { const b = window.blockmap, id = b.poolIds()[0]; const s = b.states(id);"
    " return {fps: b.fps, raf: b.ticksPerSecond, seq: b.seq, seqs: b.sequences(id).length,"
    " used: s.filter(x => x >= 2).length, cached: s.filter(x => x === 1).length, blocks: s.length}; }"
)


def keep_streams_running(gateway: str, seqs: int, stop: threading.Event, errors: list) -> list[threading.Thread]:
    """`seqs` clients, each sending one long request after another (4 shared prefixes)."""
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 50000, size=96).tolist() for _ in range(4)]

    def client(i: int) -> None:
        local = np.random.default_rng(i)
        while not stop.is_set():
            prompt = prefixes[i % 4] + local.integers(0, 50000, size=int(local.integers(16, 160))).tolist()
            try:
                for _ in stream_generate(
                    gateway, prompt, 120, max_new_tokens=int(local.integers(200, 600)), temperature=1.0, ignore_eos=True
                ):
                    if stop.is_set():
                        break
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(seqs)]
    for t in threads:
        t.start()
    return threads


def show_a_sequence(page) -> None:
    """Hover and click a block in use (the tooltip and the sequence's table appear)."""
    block = page.evaluate(
        "(() => { const b = window.blockmap; return b.states(b.poolIds()[0]).findIndex(s => s >= 2); })()"
    )
    if block >= 0:
        at = page.evaluate(f"(() => {{ const b = window.blockmap; return b.blockPoint(b.poolIds()[0], {block}); }})()")
        page.mouse.click(at["x"], at["y"])
        page.mouse.move(at["x"], at["y"] + 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16384)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--screenshot", default="", help="save the page here at the end (a block in use clicked)")
    add_quick_flag(parser, seconds=at_most(2), blocks=at_most(1024), seqs=at_most(8))
    args = apply_quick(parser.parse_args(argv))
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser_path:
        raise SystemExit("Chromium is not installed (Debian: apt-get install chromium)")
    memory, compute, gateway, m1, m2, http, page_port = free_ports(7)
    compute_settings = {
        "model": "dummy:tiny",
        "kv_budget_tokens": str(args.blocks * 16),
        "max_num_seqs": str(args.seqs),
    }
    services = local_services(
        memory,
        (compute,),
        gateway,
        m1,
        m2,
        gateway_http_port=http,
        memory_http_port=page_port,
        compute_settings=compute_settings,
    )
    stop, errors = threading.Event(), []
    with (
        tempfile.TemporaryDirectory() as logs,
        running_stack(services, timeout_s=120, log_dir=logs),
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{page_port}/")
        page.wait_for_function("window.blockmap && window.blockmap.poolIds().length === 1")
        threads = keep_streams_running(f"127.0.0.1:{gateway}", args.seqs, stop, errors)
        time.sleep(5.0)  # every stream admitted and decoding
        samples, start_seq = [], page.evaluate("window.blockmap.seq")
        for _ in range(args.seconds):
            time.sleep(1.0)
            samples.append(page.evaluate(SHOW))
        draw_ms = sorted(page.evaluate("window.blockmap.drawMs()"))
        if args.screenshot:
            show_a_sequence(page)
            page.screenshot(path=args.screenshot, full_page=True)
        events = samples[-1]["seq"] - start_seq
        stop.set()
        browser.close()
        for t in threads:
            t.join(timeout=30)
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]}")
    print(
        f"{samples[0]['blocks']} blocks, {args.seqs} clients, {args.seconds} s sampled, "
        f"{events / args.seconds:.0f} block events/s"
    )
    print("| second | frames drawn | rAF ticks | sequences shown | blocks in use | cached |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, s in enumerate(samples):
        print(f"| {i + 1} | {s['fps']} | {s['raf']} | {s['seqs']} | {s['used']} | {s['cached']} |")
    p50 = statistics.median(draw_ms)
    p99 = draw_ms[min(len(draw_ms) - 1, int(0.99 * len(draw_ms)))]
    print(
        f"full redraw of the grid: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {draw_ms[-1]:.2f} ms "
        f"({len(draw_ms)} redraws)"
    )
    fps = statistics.median(s["fps"] for s in samples)
    raf = statistics.median(s["raf"] for s in samples)
    print(
        f"block_map_fps={fps:g} raf_per_s={raf:g} draw_ms_p99={p99:.2f} "
        f"sequences_shown_min={min(s['seqs'] for s in samples)}"
    )


if __name__ == "__main__":
    main()
