"""`raysvc bench router` runs end to end (a real Router actor, fake workers, client
actors) and reports what it measured; the numbers themselves go to docs/perf.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_router_reports_admissions_and_latency(tmp_path):
    out = tmp_path / "router.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "raysvc.cli", "bench", "router", "--workers",
                          "2", "--clients", "2", "--in-flight", "8", "--duration", "2",
                          "--num-cpus", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    for protocol in ("batched", "per-request"):
        phase = report[protocol]
        assert phase["admitted"] > 0 and sum(phase["per_second"]) == phase["admitted"]
        assert 0 < phase["latency_p50_ms"] <= phase["latency_p99_ms"]
    # the per-request protocol makes two router calls per request; batching far fewer
    assert report["per-request"]["requests_per_call"] == 0.5
    assert report["batched"]["requests_per_call"] > 1
    assert report["ratio"] > 0 and "batched / per-request" in run.stdout


def test_bench_serve_request_rate_mode_runs_raysvc_beside_a_bare_serve_echo(tmp_path):
    """`raysvc bench serve --mode requests` (issue [router-scale]): max_tokens 1 through the
    whole HTTP path, and the same workload against a bare Serve app that echoes, on the
    same Ray and proxy; both rows and the ratio are reported."""
    out = tmp_path / "serve.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "raysvc.cli", "bench", "serve", "--mode",
                          "requests", "--num-prompts", "40", "--concurrency", "8",
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    raysvc, echo = report["results"]
    assert echo["name"].startswith("bare Serve echo")
    for row in (raysvc, echo):
        assert row["completed"] == 40 and row["failed"] == 0
        assert row["total_output_tokens"] == 40  # max_tokens 1 each
    assert report["raysvc_over_echo"] == raysvc["request_throughput"] / echo[
        "request_throughput"]
    assert "raysvc / bare Serve echo requests/s" in run.stdout
