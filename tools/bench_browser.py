"""The page's on-device prediction, measured in headless Chromium (a row of `make bench`).

    python -m tools.bench_browser            # starts the service, prints the table

What is measured, against the issue's budgets:
- the bytes the service sends for a first visit that ends with an on-device answer (page,
  scripts, service worker, LiteRT.js runtime, model), and for a later visit (the service
  worker answers from its cache; what is left are revalidations);
- the time from the start of the page's navigation to the first on-device answer shown
  (a person drawing is not timed: the drawing is put on the canvas by the page's own code),
  on a first visit (everything downloaded) and on a later one;
- the time of each later answer: the page's own device code (preprocessing + inference) on
  the canvas, median and 90th percentile over repeated answers.

The bytes are counted by a small proxy in front of the service (the browser's own counters
miss what the service worker fetches), so they are exactly what crossed the wire.
"""

from __future__ import annotations

import http.client
import statistics
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from playwright.sync_api import BrowserContext, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FIRST_VISIT_BUDGET_MB = 15.0
FIRST_ANSWER_BUDGET_S = 3.0
PER_ANSWER_BUDGET_MS = 50.0
REPEATS = 50
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class BrowserRow:
    """What one run measured."""

    first_visit_bytes: int = 0
    later_visit_bytes: int = 0
    first_visit_api_bytes: int = 0
    later_visit_api_bytes: int = 0
    first_answer_s: float = 0.0
    later_visit_answer_s: float = 0.0
    answer_ms: list[float] = field(default_factory=list)
    runtime: str = "@litertjs/core 2.5.3, WebAssembly (relaxed SIMD), 1 thread"

    def goals(self) -> list[tuple[str, str, bool]]:
        """(budget, measured, met) for the issue's four budgets."""
        mb = (self.first_visit_bytes + self.first_visit_api_bytes) / 1e6
        median = statistics.median(self.answer_ms)
        p90 = statistics.quantiles(self.answer_ms, n=10)[-1]
        return [
            (
                f"first visit downloads <= {FIRST_VISIT_BUDGET_MB:.0f} MB",
                f"{mb:.2f} MB ({self.first_visit_api_bytes} bytes of them API answers)",
                mb <= FIRST_VISIT_BUDGET_MB,
            ),
            (
                "a later visit downloads nothing again (page, scripts, runtime, model)",
                f"{self.later_visit_bytes} bytes (+ {self.later_visit_api_bytes} bytes of API "
                "answers: GET /models, which version is stable)",
                self.later_visit_bytes == 0,
            ),
            (
                f"first on-device answer <= {FIRST_ANSWER_BUDGET_S:.0f} s after the page starts",
                f"{self.first_answer_s:.2f} s (later visit: {self.later_visit_answer_s:.2f} s)",
                self.first_answer_s <= FIRST_ANSWER_BUDGET_S,
            ),
            (
                f"each later answer <= {PER_ANSWER_BUDGET_MS:.0f} ms",
                f"median {median:.1f} ms, p90 {p90:.1f} ms",
                p90 <= PER_ANSWER_BUDGET_MS,
            ),
        ]

    def markdown(self) -> list[str]:
        """The section of docs/benchmark.md."""
        lines = [
            "## In the browser (on-device prediction)",
            "",
            f"Headless Chromium ({CHROMIUM}, no GPU) on the same machine, the page's own code; "
            f"runtime {self.runtime}. Bytes counted by a proxy in front of the service "
            "(response bodies: what the service worker fetches included). `python -m "
            "tools.bench_browser` runs this part alone.",
            "",
            "| budget | measured | met |",
            "|---|---|---|",
        ]
        for goal, measured, met in self.goals():
            lines.append(f"| {goal} | {measured} | {'yes' if met else '**no**'} |")
        return [*lines, ""]


class CountingProxy:
    """A loopback HTTP proxy that forwards to the service and counts response body bytes."""

    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.lock = threading.Lock()
        self.body_bytes = 0
        self.api_bytes = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the benchmark prints its own table."""

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    content = response.read()
                finally:
                    connection.close()
                path = urlsplit(self.path).path
                api = not (path == "/" or path.startswith("/static/") or path == "/sw.js")
                with proxy.lock:
                    # The API's own JSON (which version is stable, the predictions) apart
                    # from the files: the page, scripts, runtime and model.
                    if api and not path.endswith("/browser-model"):
                        proxy.api_bytes += len(content)
                    else:
                        proxy.body_bytes += len(content)
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_GET(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self) -> tuple[int, int]:
        """File bytes and API bytes counted since the last call."""
        with self.lock:
            counted = (self.body_bytes, self.api_bytes)
            self.body_bytes = self.api_bytes = 0
        return counted

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Draws a "7" with the page's own stroke settings and predicts it as the Predict button does.
DRAW_SEVEN = """
() => {
  const canvas = document.getElementById("canvas");
  const ctx = canvas.getContext("2d");
  ctx.beginPath();
  ctx.moveTo(70, 56); ctx.lineTo(210, 56); ctx.lineTo(168, 140); ctx.lineTo(118, 230);
  ctx.stroke();
}
"""
ANSWER_TIMES = """
async (repeats) => {
  const device = await import("/static/device.js");
  const canvas = document.getElementById("canvas");
  const times = [];
  for (let i = 0; i < repeats; i++) times.push((await device.predictCanvas(canvas)).ms);
  return times;
}
"""


def visit(context: BrowserContext, url: str) -> tuple[Page, float]:
    """Open the page, draw, press Predict; seconds from navigation start to the answer."""
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.documentElement.dataset.device === 'ready'", timeout=60_000)
    page.evaluate(DRAW_SEVEN)
    page.click("#predict-button")
    page.wait_for_function(
        "document.getElementById('result-where').textContent === 'on this device'",
        timeout=60_000,
    )
    return page, float(page.evaluate("performance.now()")) / 1000


def measure(service_url: str, api_key: str) -> BrowserRow:
    """Run the browser measurements against a running service."""
    row = BrowserRow()
    proxy = CountingProxy(service_url)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 900, "height": 900})
            # The key as a returning person has it (the page keeps it in localStorage).
            context.add_init_script(f"localStorage.setItem('mnist-api-key', {api_key!r});")
            proxy.take()
            page, row.first_answer_s = visit(context, proxy.url)
            page.wait_for_timeout(500)  # the service worker's install finishes its revalidations
            row.first_visit_bytes, row.first_visit_api_bytes = proxy.take()
            page.close()
            page, row.later_visit_answer_s = visit(context, proxy.url)
            page.wait_for_timeout(500)
            row.later_visit_bytes, row.later_visit_api_bytes = proxy.take()
            row.answer_ms = list(page.evaluate(ANSWER_TIMES, REPEATS))
            context.close()
            browser.close()
    finally:
        proxy.close()
    return row


def main() -> int:
    """Start the service (the Procfile's gunicorn), measure, print the table."""
    from tools.services import start_web, stop  # noqa: PLC0415 - the bench passes its own

    with tempfile.TemporaryDirectory() as tmp:
        server = start_web(Path(tmp), WEB_CONCURRENCY="1")
        try:
            row = measure(server.url, server.api_key)
        finally:
            stop(server.process)
    sys.stdout.write("\n".join(row.markdown()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
