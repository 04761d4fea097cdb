"""bench.serve --peers llama-server, without llama-server: the service level and the ratios, the
agreement check's verdicts, the flags and where the binary is found. (The one test that reads the
built binary's --help runs only where `make peers` built it.)"""

from __future__ import annotations

import math
import re
import subprocess

import pytest

from bench.build_llama_server import CMAKE_FLAGS, binary_path, pinned_version
from bench.llama_server_peer import server_flags
from bench.peer_agreement import MAX_GAP, Greedy, judge
from bench.peer_slo import meets_slo, ratio, summary_lines, sustainable
from common.tokenizer import EOT_TOKEN_ID


def _row(rate: float, ttft_p99: float = 500.0, tpot_p50: float = 50.0, failed: int = 0, tok_s: float = 100.0) -> dict:
    return dict(
        request_rate=rate, p99_ttft_ms=ttft_p99, median_tpot_ms=tpot_p50, failed=failed, output_token_throughput=tok_s
    )


def test_service_level_needs_all_three():
    assert meets_slo(_row(1, ttft_p99=2000, tpot_p50=150), tpot_limit_ms=150)  # both bounds inclusive
    assert not meets_slo(_row(1, ttft_p99=2000.1), tpot_limit_ms=150)
    assert not meets_slo(_row(1, tpot_p50=150.1), tpot_limit_ms=150)
    assert not meets_slo(_row(1, failed=1), tpot_limit_ms=150)  # a failed request is not served


def test_sustainable_is_the_highest_swept_rate_meeting_it_and_zero_when_none():
    rows = [_row(0.2), _row(1.6, ttft_p99=5000), _row(0.8), _row(0.4, ttft_p99=2500), _row(1.2)]
    assert sustainable(rows, tpot_limit_ms=150) == 1.2  # not contiguous from the lowest: the highest that meets
    assert sustainable([_row(0.2, failed=3), _row(0.4, ttft_p99=9000)], tpot_limit_ms=150) == 0.0


def test_ratio_says_inf_and_nan_instead_of_dividing_by_zero():
    assert ratio(1.2, 0.4) == pytest.approx(3.0)
    assert ratio(1.2, 0.0) == math.inf
    assert math.isnan(ratio(0.0, 0.0))


def test_summary_judges_both_by_our_tpot_at_the_lowest_rate():
    ours = [_row(0.4, tpot_p50=40, tok_s=90), _row(0.2, tpot_p50=30), _row(0.8, tpot_p50=80, tok_s=200)]
    # llama-server: TPOT 95 ms <= 3 x 30 fails (3x ITS OWN 40 at 0.2 would pass), at 0.8 too slow
    theirs = [_row(0.2, tpot_p50=89), _row(0.4, tpot_p50=95), _row(0.8, ttft_p99=4000, tok_s=50)]
    lines = summary_lines("sharegpt-synth", ours, theirs)
    assert "TPOT p50 <= 90.0 ms" in lines[0]
    assert "ours 0.8 req/s, llama-server 0.2 req/s" in lines[1]
    assert lines[-1] == "vs_llama_server_rate=4.00 vs_llama_server_throughput=4.00"


def test_summary_when_llama_server_meets_no_rate_and_the_prefix_names():
    ours = [_row(0.5), _row(1.0)]
    theirs = [_row(0.5, failed=2, tok_s=40), _row(1.0, failed=8, tok_s=25)]
    lines = summary_lines("shared-prefix", ours, theirs)
    assert any("met the service level at no swept rate" in line and ">= 2.00x" in line for line in lines)
    assert lines[-1] == "vs_llama_server_prefix_rate=inf vs_llama_server_prefix_throughput=4.00"


def _ours(tokens: list[int], gaps: list[float] | None = None, runner_up: list[int] | None = None) -> Greedy:
    return Greedy(tokens, gaps or [1.0] * len(tokens), runner_up or [0] * len(tokens))


def test_agreement_accepts_identical_tokens_and_near_ties_only():
    assert judge(0, _ours([5, 6, 7]), [5, 6, 7]).ok
    near = judge(1, _ours([5, 6, 7], gaps=[1.0, MAX_GAP / 2, 1.0]), [5, 9, 1])
    assert near.diverged_at == 1 and near.ok
    real = judge(2, _ours([5, 6, 7], gaps=[1.0, MAX_GAP, 1.0]), [5, 9, 7])
    assert real.diverged_at == 1 and not real.ok  # a gap of exactly 5e-3 is not a near-tie
    short = judge(3, _ours([5, 6, 7], gaps=[0.0] * 3), [5, 6])
    assert short.diverged_at == 2 and not short.ok  # a missing token is never excused


def test_agreement_where_ours_emits_end_of_text_that_llama_server_masks():
    ours = _ours([5, EOT_TOKEN_ID, 7], runner_up=[0, 42, 0])
    assert judge(0, ours, [5, 42, 8]).ok  # its token is our runner-up; the prefixes differ after it
    assert not judge(0, ours, [5, 43, 8]).ok


def test_flags_are_the_ones_the_issue_names():
    flags = server_flags("/m.gguf", 8080, threads=2, pool_tokens=4096, slots=64)
    pairs = dict(zip(flags, flags[1:], strict=False))
    assert pairs["-m"] == "/m.gguf" and pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8080"
    assert pairs["-t"] == pairs["-tb"] == "2" and pairs["-c"] == "4096" and pairs["-np"] == "64"
    assert pairs["-ctk"] == pairs["-ctv"] == "f32" and pairs["--cache-ram"] == "0"
    assert {"--kv-unified", "-cb", "--no-webui"} <= set(flags)


@pytest.mark.skipif(not binary_path().exists(), reason="llama-server is built by `make peers` only")
def test_every_flag_is_in_the_built_llama_servers_help():
    helptext = subprocess.run([str(binary_path()), "--help"], capture_output=True, text=True, timeout=60).stdout
    known = set(re.findall(r"(?:^|[\s,])(--?[a-z][\w-]*)", helptext, re.MULTILINE))
    options = {f for f in server_flags("m", 1, 1, 1, 1) if f.startswith("-")}
    assert len(known) > 100 and options - known == set()


def test_the_binary_is_found_by_version_or_by_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAMA_SERVER_BIN", raising=False)
    assert pinned_version() == "0.3.36"  # pyproject's peers extra, the one pin
    assert binary_path().parts[-2:] == ("llama-server-0.3.36", "llama-server")
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(tmp_path / "mine"))
    assert binary_path() == tmp_path / "mine"
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in CMAKE_FLAGS and "-DLLAMA_BUILD_SERVER=ON" in CMAKE_FLAGS


def test_transports_without_a_grpc_address_open_http_alone():
    """llama-server speaks HTTP only: run_load's transports must not dial (or even build) a gRPC channel."""
    import asyncio

    from bench.transports import Transports

    async def open_and_close() -> tuple:
        async with Transports("", "http://127.0.0.1:1/") as transports:
            return transports.channel, transports.http_url, transports.http.closed

    assert asyncio.run(open_and_close()) == (None, "http://127.0.0.1:1", False)
