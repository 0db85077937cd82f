"""Headless Chromium loads /rpicluster during a real training run on a local cluster.

Inc-kSGD trains on a two-process LocalCluster (the page preloaded as the embedded cluster does)
in a thread while Chromium, driven through the DevTools protocol over aiohttp's websocket client,
opens the page: it waits until the plots exist and show live progress, a validation point and
per-worker throughput, screenshots the page, follows the run to its end and screenshots it again
(both under test-artifacts/ at the repository root), collecting every JavaScript exception and
console error on the way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import requests
from distributed import Client, LocalCluster

from rpicluster.dashboard import PRELOAD
from rpicluster.deploy.guard import GUARD
from rpicluster.dashboard.page import PLOT_NAMES
from rpicluster.data.sources import ArraySource
from rpicluster.data.writer import ingest
from rpicluster.data.synthetic import make_imagenet_like
from rpicluster.models.incremental import IncrementalKSGDClassifier
from rpicluster.testing import wait_until
from rpicluster.train.job import train

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
    try:
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 30,
                   what=f"chromium's DevTools port in {port_file}", process=proc,
                   interval=0.1)
    except AssertionError as e:
        proc.kill()
        pytest.fail(str(e))
    try:
        yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Reads the page's models in the browser: the progress bars, accuracy points, throughput bars,
# hardware rows and summary, as the user sees them.
_PAGE_STATE = """(() => {
  const m = n => Bokeh.documents[0].get_model_by_name(n);
  const progress = m('rpicluster-progress').renderers[1].data_source.data;
  const throughput = m('rpicluster-throughput').renderers[0].data_source.data;
  return {
    summary: m('rpicluster-summary').text,
    fractions: Array.from(progress.fraction),
    labels: Array.from(progress.label),
    accuracy: Array.from(m('rpicluster-accuracy').renderers[0].data_source.data.accuracy),
    throughput_workers: Array.from(throughput.worker),
    partition_rates: Array.from(throughput.partition),
    fit_rates: Array.from(throughput.fit),
    hardware_workers: Array.from(m('rpicluster-hardware').source.data.worker),
    title: document.title,
  };
})()"""

# Live progress: a local model fitted, a block scored on the validation set, a worker's rate.
_LIVE = ("(s => s.fractions[1] > 0 && s.accuracy.length > 0 && s.fit_rates.some(r => r > 0))"
         f"({_PAGE_STATE})")


@contextlib.asynccontextmanager
async def _open_page(devtools_http: str, url: str):
    """A new Chromium tab (1400 x 1050) on ``url``, with the Runtime, Log and Page domains on:
    yields its :class:`DevTools`."""
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
            yield cdp


async def _watch_training(devtools_http: str, url: str, run_done, shots: Path) -> dict:
    """Open ``url`` while training runs; screenshot it live and once ``run_done()`` returns.

    Returns the page's state as seen live (``live``) and after the run (``final``), and every
    JavaScript error.
    """
    async with _open_page(devtools_http, url) as cdp:
        names = json.dumps(PLOT_NAMES)
        # Every named plot is in the document and has a rendered view.
        await cdp.wait_for(
            f"window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
            f"{names}.every(n => Bokeh.documents[0].get_model_by_name(n) !== null) && "
            f"{names}.every(n => Bokeh.index.find_one_by_id("
            f"Bokeh.documents[0].get_model_by_name(n).id) != null)")
        await cdp.wait_for(_LIVE, timeout=90)
        live = await cdp.evaluate(_PAGE_STATE)
        await _screenshot(cdp, shots / "dashboard-rpicluster-live.png")
        await asyncio.to_thread(run_done)
        # The page follows the run to its end without a reload.
        await cdp.wait_for(f"{_PAGE_STATE}.summary.includes('<b>done</b>')", timeout=30)
        final = await cdp.evaluate(_PAGE_STATE)
        await _screenshot(cdp, shots / "dashboard-rpicluster.png")
        cdp.reader.cancel()
        return {"live": live, "final": final, "errors": list(cdp.errors)}


async def _screenshot(cdp: DevTools, path: Path) -> None:
    await asyncio.sleep(1.5)  # let the layout settle and a refresh or two land
    shot = await cdp.call("Page.captureScreenshot", format="png")
    path.write_bytes(base64.b64decode(shot["data"]))


ROWS, FEATURES, CLASSES, BLOCK_ROWS = 30_000, 64, 10, 2_000


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Train and held-out validation stores of seeded ImageNet-like rows (15 training blocks).

    Sized so that training takes some 10-20 s on two single-threaded workers: long enough to
    load the page while it runs.
    """
    root = tmp_path_factory.mktemp("stores")
    X, y = make_imagenet_like(ROWS + BLOCK_ROWS, FEATURES, CLASSES, seed=0)
    train = ingest(ArraySource("browser-test train rows", X[:ROWS], y[:ROWS]),
                   root / "train.zarr", block_rows=BLOCK_ROWS)
    test = ingest(ArraySource("browser-test held-out rows", X[ROWS:], y[ROWS:]),
                  root / "test.zarr", block_rows=BLOCK_ROWS)
    return train, test


@pytest.fixture
def cluster():
    """A two-process LocalCluster whose scheduler preloads the guard and the page, as the
    embedded one does (no client code runs on it: the page must not need any)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0",
                      scheduler_kwargs={"preload": [GUARD, PRELOAD]}) as c:
        yield c


def test_page_in_headless_chromium_during_training(cluster, chromium, stores):
    train_store, test_store = stores
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    estimator = IncrementalKSGDClassifier(block_rows=BLOCK_ROWS, n_clusters=4, max_iter=5,
                                          random_state=0)
    outcome: dict = {}
    with Client(cluster) as client:

        def run() -> None:
            try:
                outcome["result"] = train(estimator, train_store, client, validation=test_store)
            except BaseException as exc:  # re-raised in the test thread
                outcome["error"] = exc

        runner = threading.Thread(target=run)
        runner.start()
        try:
            for path in ("/status", "/rpicluster"):
                assert requests.get(base + path, timeout=30).status_code == 200, path
            ARTIFACTS.mkdir(exist_ok=True)
            seen = asyncio.run(_watch_training(chromium, base + "/rpicluster", runner.join,
                                               ARTIFACTS))
        finally:
            runner.join()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    live, final = seen["live"], seen["final"]
    print(f"\nscreenshots: {ARTIFACTS / 'dashboard-rpicluster-live.png'} "
          f"({'during' if 'running' in live['summary'] else 'after'} the run), "
          f"{ARTIFACTS / 'dashboard-rpicluster.png'}")
    assert seen["errors"] == []
    assert live["fractions"][1] > 0 and live["accuracy"]
    # Per-worker throughput under the workers' own names, as training measured them.
    assert set(final["throughput_workers"]) == set(result.rows_per_second())
    assert set(final["throughput_workers"]) <= set(final["hardware_workers"])
    assert len(final["hardware_workers"]) == 2
    # A worker may have only partitioned or only fitted, but every one charted did work.
    assert all(p + f > 0 for p, f in zip(final["partition_rates"], final["fit_rates"]))
    n_blocks = train_store.n_blocks
    assert final["fractions"] == [1, 1, 1]
    assert final["labels"][2] == f"{n_blocks} / {n_blocks}"
    assert len(final["accuracy"]) == n_blocks
    assert all(0 <= a <= 1 for a in final["accuracy"])
    assert "100% done" in final["summary"] and "– rows/s" not in final["summary"]
    for name in ("dashboard-rpicluster-live.png", "dashboard-rpicluster.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000


# --- rounds of model-averaging and federated runs ------------------------------------------------

_ROUNDS_STATE = """(() => {
  const m = n => Bokeh.documents[0].get_model_by_name(n);
  const table = m('rpicluster-rounds').source.data;
  const acc = m('rpicluster-round-accuracy').renderers[0].data_source.data;
  return {
    summary: m('rpicluster-rounds-summary').text,
    visible: m('rpicluster-rounds-summary').visible !== false,
    rounds: Array.from(table.round), participants: Array.from(table.participants),
    left_out: Array.from(table.left_out), moved: Array.from(table.moved),
    accuracy_rounds: Array.from(acc.round), accuracy: Array.from(acc.accuracy),
  };
})()"""


async def _watch_rounds(devtools_http: str, url: str, runs, shots: Path) -> dict:
    """Open ``url``, then run each of ``runs`` (in a thread) and read the rounds part of the
    page once its summary names that run's mode and says done (no reload in between)."""
    seen = []
    async with _open_page(devtools_http, url) as cdp:
        await cdp.wait_for("window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
                           "Bokeh.documents[0].get_model_by_name('rpicluster-rounds') "
                           "!== null")
        for mode, run in runs:
            result = await asyncio.to_thread(run)
            await cdp.wait_for(f"(s => s.summary.includes({json.dumps(mode)}) && "
                               f"s.summary.includes('<b>done</b>') && "
                               f"s.rounds.length === {len(result.rounds)})({_ROUNDS_STATE})",
                               timeout=30)
            seen.append((result, await cdp.evaluate(_ROUNDS_STATE)))
            await _screenshot(cdp, shots / f"dashboard-rpicluster-rounds-{mode.split()[0]}"
                                           ".png")
        cdp.reader.cancel()
        return {"seen": seen, "errors": list(cdp.errors)}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits as a 2-block training store and a held-out store."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype("float32")
    train_store = ingest(ArraySource("digits train", X[:1400], y[:1400]), root / "train.zarr",
                         block_rows=700)
    test_store = ingest(ArraySource("digits test", X[1400:], y[1400:]), root / "test.zarr",
                        block_rows=400)
    return train_store, test_store


def test_rounds_in_headless_chromium(cluster, chromium, digits, tmp_path):
    """A federated run with one host left out (its store is missing), then a model-averaging
    run: the page shows each round's participants, who was left out and why, the bytes moved
    and the validation accuracy, and follows the second run without a reload."""
    from dask.utils import format_bytes

    from rpicluster.train.averaging import train_averaged
    from rpicluster.train.federated import federate_on

    train_store, test_store = digits
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    missing = tmp_path / "nothing-here.zarr"
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        names = sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values())
        hosts = {names[0]: str(train_store.url), names[1]: str(missing)}
        runs = [("federated averaging", lambda: federate_on(
                    client, hosts, model="sgd", params={"random_state": 0}, rounds=3,
                    validation=test_store)),
                ("model averaging", lambda: train_averaged(
                    train_store, client, model="mlp", rounds=3, validation=test_store,
                    params={"hidden_layer_sizes": (16,), "random_state": 0,
                            "learning_rate_init": 0.02}))]
        ARTIFACTS.mkdir(exist_ok=True)
        seen = asyncio.run(_watch_rounds(chromium, base + "/rpicluster", runs, ARTIFACTS))
    assert seen["errors"] == []
    (fed, fed_page), (avg, avg_page) = seen["seen"]

    assert fed_page["visible"] and "sgd" in fed_page["summary"]
    assert f"left out of round 3: <b>{names[1]}</b>: no Zarr store at {missing}" in \
        fed_page["summary"]
    assert fed_page["rounds"] == [3, 2, 1]  # newest first
    assert fed_page["participants"] == [names[0]] * 3
    assert all(lo.startswith(f"{names[1]}: ") and str(missing) in lo
               for lo in fed_page["left_out"]), fed_page["left_out"]
    assert fed_page["moved"] == [format_bytes(r["bytes_down"] + r["bytes_up"])
                                 for r in reversed(fed.rounds)]
    assert fed_page["accuracy_rounds"] == [1, 2, 3]
    assert fed_page["accuracy"] == pytest.approx([r["accuracy"] for r in fed.rounds])

    assert "mlp" in avg_page["summary"] and "3 / 3 rounds" in avg_page["summary"]
    assert avg_page["rounds"] == [3, 2, 1]
    assert avg_page["participants"] == [", ".join(sorted(r["busy"])) for r in reversed(avg.rounds)]
    assert all(lo == "–" for lo in avg_page["left_out"])
    assert avg_page["accuracy"] == pytest.approx([r["accuracy"] for r in avg.rounds])
    assert (ARTIFACTS / "dashboard-rpicluster-rounds-model.png").stat().st_size > 10_000


# --- the page tells the story: run list, time series, memory against the limit -----------------

_STORY_STATE = """(() => {
  const m = n => Bokeh.documents[0].get_model_by_name(n);
  const runs = m('rpicluster-runs').source.data;
  const rows = m('rpicluster-rows-timeline').renderers[0].data_source.data;
  const mem = m('rpicluster-memory-timeline').renderers[0].data_source.data;
  const root = Bokeh.documents[0].roots()[0];
  const acc = m('rpicluster-accuracy');
  return {
    runs: Array.from(runs.run), kinds: Array.from(runs.kind), whats: Array.from(runs.what),
    statuses: Array.from(runs.status), progress: Array.from(runs.progress),
    accuracy: Array.from(runs.accuracy),
    rate_points: rows.rate.length, max_rate: Math.max(0, ...Array.from(rows.rate)),
    memory_lines: Array.from(mem.worker).map((w, i) => [w, mem.dash[i], mem.ys[i].length,
                                                         mem.ys[i][mem.ys[i].length - 1]]),
    sections: root.children.map(c => c.name).filter(n => n && n.endsWith('-section')),
    no_accuracy: acc.center.filter(l => l.text !== undefined && l.visible).map(l => l.text),
    // What the browser drew: the run list's first row, cell by cell (tables live in shadow DOM).
    first_row: (() => {
      const find = (root) => {
        for (const el of root.querySelectorAll('*')) {
          if (el.classList && el.classList.contains('slick-row')) return el;
          if (el.shadowRoot) { const r = find(el.shadowRoot); if (r) return r; }
        }
        return null;
      };
      const row = find(document);
      return row ? Array.from(row.querySelectorAll('.slick-cell')).map(c => c.innerText) : [];
    })(),
    hardware_memory: Array.from(m('rpicluster-hardware').source.data.memory),
    summary: m('rpicluster-summary').text,
  };
})()"""


def test_page_tells_the_story_of_several_runs(home, cluster, chromium, digits, tmp_path):
    """A model-averaging (MLP) run, then an Inc-kSGD run without --test through the library
    entry point (recorded in the history): the run list shows the Inc-kSGD run on top with its
    history number and outcome, then the MLP run; the Inc-kSGD section sits above the older
    rounds section; the validation plot says the run had no validation set; the time series
    show the cluster's rows/s and each worker's memory against its limit."""
    from rpicluster.train.api import ClusterChoice, train_model
    from rpicluster.train.averaging import train_averaged

    train_store, test_store = digits
    base = cluster.dashboard_link.rsplit("/", 1)[0]
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        train_averaged(train_store, client, model="mlp", rounds=2, validation=test_store,
                       params={"hidden_layer_sizes": (8,), "random_state": 0})

    def inc_ksgd():
        return train_model(str(train_store.url), tmp_path / "m.skops",
                           {"n_clusters": 3, "max_iter": 5, "random_state": 0},
                           cluster=ClusterChoice(scheduler=cluster.scheduler_address),
                           show_progress=False)

    async def look() -> dict:
        async with _open_page(chromium, base + "/rpicluster") as cdp:
            await cdp.wait_for("window.Bokeh !== undefined && Bokeh.documents.length > 0 && "
                               "Bokeh.documents[0].get_model_by_name('rpicluster-runs') "
                               "!== null")
            # The page is open before the run: its cells must follow it (a DataTable redraws
            # on a new row count only, unless told).
            await cdp.wait_for(f"{_STORY_STATE}.first_row.includes('mlp rounds')")
            nonlocal summary
            summary = await asyncio.to_thread(inc_ksgd)
            # Two samples of the timeline at least (one every 2 s) and the finished run.
            # ... drawn too: a table's changed cells are redrawn within a few seconds. The
            # history number comes at the page's next read of the history (every 5 s), which
            # the run writes after its end event.
            await cdp.wait_for(f"(s => s.runs.length >= 2 && s.rate_points >= 2 && "
                               f"s.statuses[0].startsWith('done') && "
                               f"s.runs[0].endsWith('(#1)') && s.first_row[0] === s.runs[0] && "
                               f"s.first_row[4] === 'done')({_STORY_STATE})", timeout=30)
            seen = await cdp.evaluate(_STORY_STATE)
            ARTIFACTS.mkdir(exist_ok=True)
            await _screenshot(cdp, ARTIFACTS / "dashboard-rpicluster-story.png")
            cdp.reader.cancel()
            return {"seen": seen, "errors": list(cdp.errors)}

    summary = None
    out = asyncio.run(look())
    assert out["errors"] == []
    s = out["seen"]
    print(f"\nscreenshot: {ARTIFACTS / 'dashboard-rpicluster-story.png'}\n{s}")
    # The current (latest) run on top, with its history number; the MLP run below it.
    assert s["kinds"][:2] == ["train", "train"]
    assert s["whats"][:2] == ["Inc-kSGD", "mlp rounds"]
    # One word for how runs ended, whatever their kind: the run history's.
    assert s["runs"][0].endswith("(#1)") and s["statuses"][:2] == ["done", "done"]
    assert s["progress"][:2] == [f"{train_store.n_blocks} / {train_store.n_blocks} blocks",
                                 "2 / 2 rounds"]
    assert s["accuracy"][0] == "–" and s["accuracy"][1] != "–"
    # ... and the browser drew it: the first row's cells as shown.
    assert s["first_row"][:5] == [s["runs"][0], "train", "Inc-kSGD", s["first_row"][3], "done"]
    assert s["first_row"][5] == f"{train_store.n_blocks} / {train_store.n_blocks} blocks"
    assert summary.test_accuracy is None
    # Sections stay with their runs: the newer Inc-kSGD run's above the MLP rounds.
    assert s["sections"] == ["rpicluster-blocks-section", "rpicluster-rounds-section"]
    assert s["no_accuracy"] == ["this run had no validation set (train with --test STORE to "
                                "score each block)"]
    # Each worker's memory against its own limit (not the host's RAM).
    limit = next(iter(cluster.scheduler.workers.values())).memory_limit
    from dask.utils import format_bytes

    assert all(f" / {format_bytes(limit)} (" in m for m in s["hardware_memory"])
    assert len(s["hardware_memory"]) == 2
    solid = [line for line in s["memory_lines"] if line[1] == "solid"]
    dashed = [line for line in s["memory_lines"] if line[1] == "dashed"]
    assert len(solid) == 2 and len(dashed) == 2
    assert all(line[3] == limit for line in dashed)
    assert all(0 < line[3] < limit for line in solid)
    assert s["max_rate"] > 0
