"""`make bench` cannot rot: the benchmark runs end to end in a short form and writes its files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from mnist_api.config import PROJECT_ROOT
from mnist_api.inference.registry import ModelRegistry
from tests.http.test_metrics import total
from tools.bench import V2_INFER, Scenario, digit_png, v2_image_body, wrk
from tools.services import start_web, stop, venv_env

BENCH_ARGS = ("--seconds", "1", "--max-attempts", "1")
needs_wrk = pytest.mark.skipif(shutil.which("wrk") is None, reason="make test installs wrk")


@needs_wrk
def test_short_benchmark_writes_its_table_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "benchmark.md"
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", *BENCH_ARGS, "--out", str(out)],
        cwd=PROJECT_ROOT,
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "## Targets (concurrency 8)" in text and "ready in < 2 s" in text
    http_table = text.split("## Through HTTP", 1)[1].split("\n## ", 1)[0]
    rows = [
        line
        for line in http_table.splitlines()
        if re.match(r"\| (healthz|predict|batch)", line) and "shadow" not in line
    ]
    assert len(rows) == 20  # 6 scenarios at 3 concurrencies, the phone JPEG at 2
    floor_rows = [line for line in http_table.splitlines() if line.startswith("| floor: ")]
    assert len(floor_rows) == 6  # the floor's upload and bare route at 3 concurrencies
    assert "280x280 miss >= 1.0x the floor" in text and "<= 2x the bare route's" in text
    # The browser row (issue 24): the four budgets of on-device prediction.
    browser = text.split("## In the browser (on-device prediction)", 1)[1]
    assert "first visit downloads <= 15 MB" in browser and "each later answer <= 50 ms" in browser
    if len(ModelRegistry.discover(PROJECT_ROOT / "models").versions()) > 1:
        assert "| predict 28x28 miss, shadow | 8 |" in http_table
        assert "shadow adds <= one interpreter call per miss" in text
    v2_rows = [line for line in http_table.splitlines() if line.startswith("| v2 ")]
    assert len(v2_rows) == 4  # V2 infer: 32 image elements and 64 pixels, at 2 concurrencies
    errors_column = 8
    # No errors: a wrong binary size in a V2 body would show here as non-2xx answers.
    assert all(
        row.split("|")[errors_column].strip() == "0" for row in rows + v2_rows + floor_rows
    ), rows
    assert "V2 pixels (64, binary) >= 10x" in text and "V2 image batch of 32" in text


@needs_wrk
def test_miss_scenarios_really_miss_the_cache(tmp_path: Path) -> None:
    # A run reusing an earlier run's nonces would silently measure cache hits as misses.
    server = start_web(tmp_path, WEB_CONCURRENCY="1")  # one worker: one cache sees everything
    try:
        body = tmp_path / "digit.png"
        body.write_bytes(digit_png(28))
        miss = Scenario("miss", "POST", "/predict", "nonce", "image/png", body.read_bytes())
        hit = Scenario("hit", "POST", "/predict", "fixed", "image/png", body.read_bytes())
        for scenario in (miss, miss):
            assert wrk(server.url, scenario, 2, 1.0, body)["requests"] > 0
        time.sleep(0.5)  # requests in flight when wrk stopped are logged after it
        after_misses = caches(server.records())
        assert wrk(server.url, hit, 2, 1.0, body)["requests"] > 0
        time.sleep(0.5)
        after_hits = caches(server.records())[len(after_misses) :]
    finally:
        stop(server.process)
    assert after_misses and set(after_misses) == {"MISS"}
    # The field is real: the fixed bytes miss at first (once per connection at most), then hit.
    assert after_hits.count("MISS") <= 2 and after_hits.count("HIT") > 10


@needs_wrk
def test_v2_image_scenario_really_misses_the_cache(tmp_path: Path) -> None:
    # Its nonces keep every element's stated length true (else: 400s) and new (else: hits).
    server = start_web(tmp_path, WEB_CONCURRENCY="1")
    try:
        body, header = v2_image_body(digit_png(28), 32)
        scenario = Scenario(
            "v2", "POST", V2_INFER, "padded", "application/octet-stream", body, 32, header=header
        )
        body_file = tmp_path / "v2.bin"
        body_file.write_bytes(body)
        summaries = [wrk(server.url, scenario, 2, 1.0, body_file) for _ in range(2)]
        time.sleep(0.5)  # requests in flight when wrk stopped
        metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    finally:
        stop(server.process)
    answered = sum(s["requests"] for s in summaries)
    assert answered > 0 and all(s["status"] == 0 for s in summaries)
    assert total(metrics, "mnist_cache_lookups_total", result="hit") == 0
    assert total(metrics, "mnist_cache_lookups_total", result="miss") >= 32 * answered


def caches(records: list[dict[str, object]]) -> list[object]:
    """The cache result of every /predict request in the server's log, in order."""
    return [r["cache"] for r in records if r.get("route") == "/predict"]
