"""Locust, headless for about 20 s, against a live stack serving the default model (512-token
context) with no cap on output lengths: requests happen and none fail, because the locustfile
draws its requests to fit the model the gateway reports."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from deploy.run_local import running_stack
from deploy.services import free_ports, local_services

ROOT = Path(__file__).resolve().parent.parent


def test_locust_headless_runs_over_grpc_and_http_against_the_default_model_with_an_api_key(tmp_path):
    memory, compute, gateway, m1, m2, http = free_ports(6)
    services = local_services(
        memory, (compute,), gateway, m1, m2, gateway_http_port=http, gateway_settings={"api_keys": "locust-key"}
    )  # the default model and settings
    with running_stack(services, timeout_s=120, log_dir=str(tmp_path)):
        env = {k: v for k, v in os.environ.items() if k != "MAX_NEW_TOKENS"}
        for transport, host in (("grpc", f"127.0.0.1:{gateway}"), ("http", f"http://127.0.0.1:{http}")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    str(ROOT / "bench" / "locustfile.py"),
                    "--headless",
                    "-u",
                    "8",
                    "-r",
                    "4",
                    "-t",
                    "20s",
                    "--host",
                    host,
                    "--csv",
                    str(tmp_path / transport),
                    "--only-summary",
                ],
                env={**env, "PYTHONPATH": str(ROOT), "TRANSPORT": transport, "API_KEY": "locust-key"},
                check=True,
                timeout=120,
                cwd=ROOT,
            )
            rows = {r["Name"]: r for r in csv.DictReader((tmp_path / f"{transport}_stats.csv").open())}
            assert rows["Generate"]["Type"] == transport
            assert int(rows["Generate TTFT"]["Request Count"]) >= 8  # every user got a first token
            assert int(rows["Generate"]["Request Count"]) > 0
            assert int(rows["Aggregated"]["Failure Count"]) == 0
