"""The qc web summary in a real browser: headless Chromium (Debian's package,
installed by .ci/setup-tests) driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: fd 3 in, fd 4 out, NUL-terminated JSON), so the
test needs nothing beyond the standard library and the browser itself.

It renders report.html from a file:// URL and checks that the page loads
without a console error or an exception, asks for nothing but itself (works
offline), shows the key numbers, fits the window (no horizontal scrolling),
and that its script works: the rank plot's tooltip and the table's sorting.

Without Chromium the tests are skipped, unless BAMFLOW_BROWSER_TESTS=required
(.ci/run sets it), which makes a missing browser a failure.

``python tests/test_report_browser.py REPORT.html OUT.png [WIDTH]`` saves a
full-page screenshot (how docs/qc_report.png is made).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# no network, no first-run or background services: the machine may be offline
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium and one page, over the DevTools protocol on a pipe."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="bamflow-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds_3_and_4() -> None:  # in the child: the pipe ends the protocol expects
            a = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=fds_3_and_4,
            pass_fds=(3, 4),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    # -- the protocol ----------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    # -- what the tests use ------------------------------------------------------------------

    def open(self, path: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries so far."""
        self.call("Runtime.evaluate", session=True, expression="0")  # let pending events arrive
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(params["entry"].get("text", "")[:500])
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def mouse(self, kind: str, x: float, y: float) -> None:
        params = {"type": kind, "x": x, "y": y, "button": "left" if kind != "mouseMoved" else "none"}
        if kind != "mouseMoved":
            params["clickCount"] = 1
        self.call("Input.dispatchMouseEvent", session=True, **params)

    def screenshot(self, path: Path) -> None:
        import base64

        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.scrollWidth")
        shot = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("BAMFLOW_BROWSER_TESTS") == "required":
            pytest.fail("Chromium is required (BAMFLOW_BROWSER_TESTS=required) but not installed: run .ci/setup-tests")
        pytest.skip("Chromium is not installed (.ci/setup-tests installs it)")
    chrome = Chromium(binary)
    yield chrome
    chrome.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """qc on a simulated 10x BAM (genes named like Cell Ranger's, chrM genes MT-…)."""
    from bamflow.presets.qc import qc
    from bamflow.simulate import simulate_bam

    folder = tmp_path_factory.mktemp("report")
    simulate_bam(folder / "sim.bam", n_reads=20_000, n_barcodes=400, n_cells=80, seed=3)
    summary = qc(folder / "sim.bam", folder / "qc", workers=2, threads=1)
    return folder / "qc" / "report.html", summary


def count(n):
    """A median as people read it: 1,234 or 41.5."""
    return f"{n:,.0f}" if n == int(n) else f"{n:,.1f}"


@pytest.mark.timeout(180)
def test_report_renders_in_chromium(browser, report):
    page, summary = report
    browser.open(page)
    assert browser.errors() == []
    assert browser.requests() == [page.resolve().as_uri()]  # the page itself, nothing else: works offline
    text = browser.evaluate("document.body.innerText")
    cards = browser.evaluate("Array.from(document.querySelectorAll('#cards .card')).map(c => c.innerText)")
    shown = {card.split("\n")[1]: card.split("\n")[0] for card in cards}
    assert shown["Estimated number of cells"] == f"{summary['cells']:,}"
    assert shown["Median UMIs per cell"] == count(summary["median_umis_per_cell"])
    assert shown["Median genes per cell"] == count(summary["median_genes_per_cell"])
    assert shown["Mean reads per cell"] == f"{round(summary['mean_reads_per_cell']):,}"
    assert shown["Sequencing saturation"] == f"{100 * summary['saturation']:.1f}%"
    assert shown["Fraction reads in cells"] == f"{100 * summary['fraction_counted_reads_in_cells']:.1f}%"
    assert shown["Median mitochondrial UMIs"] == f"{100 * summary['mito']['median_fraction_per_cell']:.1f}%"
    assert f"{summary['reads_in']:,}" in text  # formatted, never 20000
    for warning in summary["warnings"]:
        assert warning["title"] in text
    # every plot drew, and nothing is wider than the window
    assert browser.evaluate("document.querySelectorAll('svg.plot').length") >= 4
    assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert browser.evaluate("document.querySelector('#barcodes').getBoundingClientRect().right <= window.innerWidth")


@pytest.mark.timeout(180)
def test_report_is_interactive(browser, report):
    page, summary = report
    browser.open(page)
    box = browser.evaluate("(() => { const r = document.querySelector('#rank svg').getBoundingClientRect();"
                           " return [r.left, r.top, r.width, r.height]; })()")
    browser.evaluate("document.querySelector('#rank').scrollIntoView()")
    box = browser.evaluate("(() => { const r = document.querySelector('#rank svg').getBoundingClientRect();"
                           " return [r.left, r.top, r.width, r.height]; })()")
    left, top, width, height = box
    browser.mouse("mouseMoved", left + width * (70 + 5) / 640, top + height / 2)  # near rank 1
    tip = browser.evaluate("document.getElementById('tip').textContent")
    assert tip.startswith("rank 1: ") and "cell" in tip, tip
    # sort the barcode table by reads, then filter it
    browser.evaluate("document.querySelector('#barcodes').scrollIntoView()")
    th = browser.evaluate("(() => { const r = document.querySelectorAll('#barcodes th')[3].getBoundingClientRect();"
                          " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
    browser.mouse("mousePressed", *th)
    browser.mouse("mouseReleased", *th)
    reads = browser.evaluate("Array.from(document.querySelectorAll('#barcodes tbody tr'))"
                             ".map(r => Number(r.cells[3].textContent.replace(/,/g, '')))")
    assert reads == sorted(reads, reverse=True) and len(reads) == summary["barcodes"]
    first = browser.evaluate("document.querySelector('#barcodes tbody tr').cells[1].textContent")
    browser.evaluate(f"const f = document.getElementById('filter'); f.value = '{first[:10]}';"
                     " f.dispatchEvent(new Event('input'))")
    visible = browser.evaluate("Array.from(document.querySelectorAll('#barcodes tbody tr'))"
                               ".filter(r => r.style.display !== 'none').length")
    assert 1 <= visible < summary["barcodes"]
    assert browser.errors() == []


def main(argv: list[str]) -> None:
    report, out = Path(argv[0]), Path(argv[1])
    width = int(argv[2]) if len(argv) > 2 else 1280
    chrome = Chromium(find_chromium() or "chromium", width=width, height=900)
    try:
        chrome.open(report)
        errors = chrome.errors()
        if errors:
            raise SystemExit(f"console errors: {errors}")
        chrome.screenshot(out)
    finally:
        chrome.close()


if __name__ == "__main__":
    main(sys.argv[1:])
