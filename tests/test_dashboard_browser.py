"""Headless Chromium loads /rpicluster during a real training run on a local cluster.

Chromium is driven through the DevTools protocol over aiohttp's websocket client: navigate, wait
until the page's plots exist and show progress, collect every JavaScript exception and console
error, take a screenshot (saved under test-artifacts/ at the repository root).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import requests
from distributed import Client, LocalCluster

from rpicluster.dashboard import PRELOAD
from rpicluster.dashboard.page import PLOT_NAMES

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


class DevTools:
    """A minimal DevTools-protocol session on one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.errors: list[str] = []
        self.pending: dict[int, asyncio.Future] = {}
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.errors.append(f"exception: {d.get('exception', {}).get('description') or d['text']}")
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                args = data["params"]["args"]
                self.errors.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                entry = data["params"]["entry"]
                self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")

    async def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            await asyncio.sleep(0.25)


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium with a DevTools port; yields the DevTools HTTP endpoint."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs it from .ci/apt-packages.txt)")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
         "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"chromium did not open its DevTools port (exit status {proc.poll()})")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _load_page(devtools_http: str, url: str, screenshot: Path) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{devtools_http}/json/new?about:blank") as r:
            target = await r.json()
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = DevTools(ws)
            for domain in ("Runtime", "Log", "Page"):
                await cdp.call(f"{domain}.enable")
            await cdp.call("Emulation.setDeviceMetricsOverride", width=1400, height=1050,
                           deviceScaleFactor=1, mobile=False)
            await cdp.call("Page.navigate", url=url)
            names = json.dumps(PLOT_NAMES)
            # Every named plot is in the document and has a rendered view.
            await cdp.wait_for(
                f"window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
                f"{names}.every(n => Bokeh.documents[0].get_model_by_name(n) !== null) && "
                f"{names}.every(n => Bokeh.index.find_one_by_id("
                f"Bokeh.documents[0].get_model_by_name(n).id) != null)")
            # Live: the page has seen the run and local models fitted.
            await cdp.wait_for(
                "Bokeh.documents[0].get_model_by_name('rpicluster-progress')"
                ".renderers[1].data_source.data.fraction[1] > 0", timeout=60)
            await asyncio.sleep(1.5)  # let the layout settle and a refresh or two land
            shot = await cdp.call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            info = await cdp.evaluate(
                "(() => { const d = Bokeh.documents[0]; return {"
                "summary: d.get_model_by_name('rpicluster-summary').text,"
                "workers: d.get_model_by_name('rpicluster-hardware').source.data.worker.length,"
                "throughput: d.get_model_by_name('rpicluster-throughput')"
                ".renderers[0].data_source.data.worker.length,"
                "title: document.title} })()")
            cdp.reader.cancel()
            return {**info, "errors": list(cdp.errors)}


def _partition(block: int, rows: int, features: int, k: int) -> dict:
    """A block's worth of real work: a few Lloyd iterations of k-means on seeded data."""
    import numpy as np
    from distributed import get_worker

    t0 = time.perf_counter()
    rng = np.random.default_rng(block)
    X = rng.standard_normal((rows, features), dtype=np.float32)
    centers = X[:k].copy()
    for _ in range(8):
        labels = ((X[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        centers = np.stack([X[labels == j].mean(0) if (labels == j).any() else centers[j]
                            for j in range(k)])
    return {"rows": rows, "labels": labels, "worker": get_worker().address,
            "seconds": time.perf_counter() - t0}


def _fit(block: int, cluster: int, part: dict, features: int) -> dict:
    """A local model's worth of real work: least squares on the cluster's rows (R² as accuracy)."""
    import numpy as np
    from distributed import get_worker

    t0 = time.perf_counter()
    rng = np.random.default_rng([block, cluster])
    n = int((part["labels"] == cluster).sum())
    X = rng.standard_normal((n, features))
    y = X @ rng.standard_normal(features) + rng.standard_normal(n) * (2 + block % 4)
    for _ in range(20):
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    accuracy = float(1 - ((X @ coef - y) ** 2).mean() / y.var())
    return {"rows": n, "worker": get_worker().address, "accuracy": accuracy,
            "seconds": time.perf_counter() - t0}


def _run_training(client: Client, run_id: str, n_blocks: int, k: int) -> None:
    """Run a block/cluster job on the cluster, publishing the training events as it goes."""
    from distributed import as_completed

    from rpicluster.dashboard import events as ev

    def log(kind, **fields):
        client.log_event(ev.TOPIC, ev.make_event(kind, run_id=run_id, **fields))

    rows, features = 6000, 48
    log(ev.RUN_START, n_blocks=n_blocks, n_clusters=k, rows=rows * n_blocks)
    parts = {client.submit(_partition, b, rows, features, k, pure=False): b
             for b in range(n_blocks)}
    fits: dict = {}
    done_fits = {b: [] for b in range(n_blocks)}
    pending = as_completed(list(parts))
    for fut in pending:
        result = fut.result()
        if fut in parts:
            b = parts[fut]
            log(ev.PARTITIONED, block=b, rows=result["rows"], worker=result["worker"],
                seconds=result["seconds"])
            for j in range(k):
                f = client.submit(_fit, b, j, fut, features, pure=False)
                fits[f] = (b, j)
                pending.add(f)
        else:
            b, j = fits[fut]
            log(ev.FITTED, block=b, cluster=j, rows=result["rows"], worker=result["worker"],
                seconds=result["seconds"])
            done_fits[b].append(result["accuracy"])
            if len(done_fits[b]) == k:
                log(ev.COMMITTED, block=b)
                log(ev.VALIDATION, block=b, accuracy=sum(done_fits[b]) / k)
    log(ev.RUN_END)


@pytest.fixture
def cluster():
    """A real two-process LocalCluster whose scheduler preloads the rpicluster page."""
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"preload": [PRELOAD]}) as c:
        yield c


def test_page_in_headless_chromium_during_training(cluster, chromium):
    import threading

    base = cluster.dashboard_link.rsplit("/", 1)[0]
    with Client(cluster) as client:
        errors = []

        def train():
            try:
                _run_training(client, "browser-test", n_blocks=8, k=3)
            except BaseException as exc:  # re-raised in the test thread
                errors.append(exc)

        runner = threading.Thread(target=train)
        runner.start()
        try:
            for path in ("/status", "/rpicluster"):
                assert requests.get(base + path, timeout=30).status_code == 200, path
            ARTIFACTS.mkdir(exist_ok=True)
            screenshot = ARTIFACTS / "dashboard-rpicluster.png"
            seen = asyncio.run(_load_page(chromium, base + "/rpicluster", screenshot))
        finally:
            runner.join()
        if errors:
            raise errors[0]
    print(f"\nscreenshot: {screenshot}")
    assert seen["errors"] == []
    assert "browser-test" in seen["summary"]
    assert seen["workers"] == 2
    assert seen["throughput"] >= 1
    assert screenshot.stat().st_size > 10_000
