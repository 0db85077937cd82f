"""The ``/rpicluster`` bokeh document: training progress, worker throughput and hardware, accuracy,
and the rounds of model-averaging and federated runs.

One :class:`TrainingPage` per browser session; every second it redraws from the
:class:`~rpicluster.dashboard.state.TrainingState` the server passes in (the folded event stream)
and from the workers' heartbeat metrics (:mod:`rpicluster.dashboard.health`). Plots carry ``name`` attributes
(see :data:`PLOT_NAMES`) so tests and users can find them in ``Bokeh.documents``.
"""

from __future__ import annotations

import html
import time

from bokeh.layouts import column, row
from bokeh.models import (AdaptiveTicker, ColumnDataSource, DataTable, Div, FactorRange, HoverTool, Label,
                          LabelSet, NumeralTickFormatter, Range1d, TableColumn)
from bokeh.plotting import figure
from bokeh.transform import dodge
from dask.utils import format_bytes
from distributed.dashboard.components import add_periodic_callback
from distributed.dashboard.components.scheduler import BOKEH_THEME, env
from distributed.utils import log_errors

from rpicluster.dashboard.health import METRIC
from rpicluster.dashboard.state import (FeaturesState, RoundsState, RunLog, Timeline,
                                        TrainingState)
from rpicluster.progress import format_duration

#: Refresh period of the page, in milliseconds.
REFRESH_MS = 1000

#: ``name`` of each plot or table on the page.
PLOT_NAMES = ("rpicluster-summary", "rpicluster-progress", "rpicluster-throughput",
              "rpicluster-accuracy", "rpicluster-hardware")
#: ``name`` of the sections of a block-ensemble (Inc-kSGD) run and of a round-based run: the
#: latest run's section comes first.
SECTION_NAMES = ("rpicluster-blocks-section", "rpicluster-rounds-section")
#: ``name`` of the run list and of the cluster's time series (rows/s, temperature, memory).
STORY_NAMES = ("rpicluster-runs", "rpicluster-rows-timeline", "rpicluster-temperature-timeline",
               "rpicluster-memory-timeline")
#: ``name`` of the parts shown once a round-based run (``--model mlp|sgd``, ``federate``)
#: published: its summary line, the rounds table and the accuracy per round.
ROUND_PLOT_NAMES = ("rpicluster-rounds-summary", "rpicluster-rounds",
                    "rpicluster-round-accuracy")

_STAGES = ("blocks partitioned", "clusters fitted", "blocks committed")
_DONE, _TODO = "#2b8cbe", "#e5eef5"
_PARTITION, _FIT = "#7fb2d5", "#e6821e"
_HARDWARE_COLUMNS = (("worker", "Worker"), ("host", "Host"), ("arch", "Arch"),
                     ("cores", "Cores"), ("threads", "Threads"),
                     ("memory", "Memory used / limit"), ("host_memory", "Host RAM"),
                     ("temperature", "Temp °C"), ("throttling", "Throttling"))
_RUN_COLUMNS = (("run", "Run", 90), ("kind", "Kind", 70), ("what", "What", 130),
                ("started", "Started", 80), ("status", "Status", 150), ("progress", "Progress", 90),
                ("accuracy", "Accuracy", 70), ("duration", "Duration", 80))
#: Colours of the workers' lines, in worker order (Category10).
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")
#: Seconds between two reads of the desktop's run history (a page refreshes every second).
HISTORY_EVERY_S = 5.0
#: Seconds between two whole redraws of a table whose cells changed (see
#: :meth:`TrainingPage._set_table`).
TABLE_REDRAW_S = 3.0
# (field, title, relative width): the reasons hosts were left out need the room.
_ROUND_COLUMNS = (("round", "Round", 50), ("participants", "Participants", 160),
                  ("left_out", "Left out (reason)", 420), ("rows", "Rows", 70),
                  ("moved", "Moved", 80), ("seconds", "Seconds", 60),
                  ("accuracy", "Accuracy", 70))


def _short(address: str) -> str:
    return address.split("://", 1)[-1]


class TrainingPage:
    """The models of one ``/rpicluster`` session and the callback that refreshes them.

    Parameters
    ----------
    scheduler : distributed.Scheduler
        The scheduler the page runs in (its workers give the hardware table).
    state : TrainingState
        The live training state folded by the scheduler plugin.
    """

    def __init__(self, scheduler, state: TrainingState, features: FeaturesState | None = None,
                 rounds: RoundsState | None = None, runs: RunLog | None = None,
                 timeline: Timeline | None = None) -> None:
        self.scheduler = scheduler
        self.state = state
        self.features = features if features is not None else FeaturesState()
        self.rounds = rounds if rounds is not None else RoundsState()
        self.runs = runs if runs is not None else RunLog()
        self.timeline = timeline if timeline is not None else Timeline()
        self._history_cache: tuple[float, list] = (0.0, [])
        self._stale: set[str] = set()  # tables whose cells changed but are not redrawn yet
        self._drawn: dict[str, float] = {}  # table id -> when it was last redrawn
        self.summary = Div(name=PLOT_NAMES[0], sizing_mode="stretch_width")

        self.runs_source = ColumnDataSource({key: [] for key, _, _ in _RUN_COLUMNS})
        self.runs_table = DataTable(
            name=STORY_NAMES[0], source=self.runs_source, index_position=None,
            height=_table_height(0), sizing_mode="stretch_width",
            columns=[TableColumn(field=key, title=title, width=width)
                     for key, title, width in _RUN_COLUMNS])
        runs_title = Div(text="<h3 style='margin:4px 0'>Runs (newest first)</h3>",
                         sizing_mode="stretch_width")
        self.rows_line_source = ColumnDataSource({"t": [], "rate": []})
        self.rows_line = figure(
            name=STORY_NAMES[1], title="Cluster rows per second (rows processed, 10 s window)",
            height=220, sizing_mode="stretch_width", tools="", toolbar_location=None,
            x_axis_type="datetime")
        self.rows_line.line(x="t", y="rate", source=self.rows_line_source, color=_DONE,
                            line_width=2)
        self.rows_line.yaxis.formatter = NumeralTickFormatter(format="0.[0]a")
        self.rows_line.y_range.start = 0
        self.temperature_source = ColumnDataSource({"xs": [], "ys": [], "worker": [],
                                                    "color": []})
        self.temperature = figure(
            name=STORY_NAMES[2], title="Temperature per worker (°C)", height=220,
            sizing_mode="stretch_width", tools="", toolbar_location=None,
            x_axis_type="datetime")
        self.temperature.multi_line(xs="xs", ys="ys", color="color", line_width=2,
                                    source=self.temperature_source)
        self.no_temperature = Label(x=10, y=80, x_units="screen", y_units="screen",
                                    text="no worker reports a temperature (no thermal zone)",
                                    text_color="#777777", text_font_size="13px")
        self.temperature.add_layout(self.no_temperature)
        self.memory_source = ColumnDataSource({"xs": [], "ys": [], "worker": [], "color": [],
                                               "dash": []})
        self.memory = figure(
            name=STORY_NAMES[3], title="Memory per worker (solid) against its limit (dashed)",
            height=220, sizing_mode="stretch_width", tools="", toolbar_location=None,
            x_axis_type="datetime")
        self.memory.multi_line(xs="xs", ys="ys", color="color", line_width=2,
                               line_dash="dash", source=self.memory_source)
        self.memory.yaxis.formatter = NumeralTickFormatter(format="0.0 b")
        self.memory.y_range.start = 0
        for fig in (self.temperature, self.memory):
            fig.add_tools(HoverTool(tooltips=[("worker", "@worker")]))
        self.story_box = column(runs_title, self.runs_table,
                                row(self.rows_line, self.temperature, self.memory,
                                    sizing_mode="stretch_width"),
                                sizing_mode="stretch_width")

        self.progress_source = ColumnDataSource(
            {"stage": list(_STAGES), "fraction": [0.0] * 3, "label": [""] * 3, "full": [1.0] * 3})
        self.progress = figure(
            name=PLOT_NAMES[1], title="Training progress", y_range=FactorRange(*reversed(_STAGES)),
            x_range=Range1d(0, 1), height=230, sizing_mode="stretch_width", tools="",
            toolbar_location=None)
        self.progress.hbar(y="stage", right="full", height=0.6, color=_TODO,
                           source=self.progress_source)
        self.progress.hbar(y="stage", right="fraction", height=0.6, color=_DONE,
                           source=self.progress_source)
        self.progress.add_layout(LabelSet(
            x=0.99, y="stage", text="label", source=self.progress_source, text_align="right",
            text_baseline="middle", text_font_size="13px", text_color="#222222"))
        self.progress.xaxis.formatter = NumeralTickFormatter(format="0%")
        self.progress.ygrid.grid_line_color = None

        self.throughput_source = ColumnDataSource(
            {"worker": [], "partition": [], "fit": [], "tasks": []})
        self.throughput = figure(
            name=PLOT_NAMES[2], title="Throughput per worker (rows per second of task time)",
            x_range=FactorRange(), height=300, sizing_mode="stretch_width", tools="",
            toolbar_location=None, x_axis_label="worker")
        for series, color, offset in (("partition", _PARTITION, -0.18), ("fit", _FIT, 0.18)):
            self.throughput.vbar(x=dodge("worker", offset, range=self.throughput.x_range),
                                 top=series, width=0.34, color=color, legend_label=series,
                                 source=self.throughput_source)
        self.throughput.add_tools(HoverTool(tooltips=[
            ("worker", "@worker"), ("partition", "@partition{0,0} rows/s"),
            ("fit", "@fit{0,0} rows/s"), ("tasks", "@tasks")]))
        self.throughput.y_range.start = 0
        self.throughput.yaxis.formatter = NumeralTickFormatter(format="0.[0]a")
        self.throughput.xaxis.major_label_text_font_size = "13px"
        # Outside the plot: inside, it would hide the first worker's bars.
        self.throughput.add_layout(self.throughput.legend[0], "right")
        self.throughput.xgrid.grid_line_color = None

        self.accuracy_source = ColumnDataSource({"block": [], "accuracy": []})
        self.accuracy = figure(
            name=PLOT_NAMES[3], title="Validation accuracy per block", height=300,
            x_range=Range1d(-0.5, 0.5), y_range=Range1d(0, 1.02), sizing_mode="stretch_width",
            tools="", toolbar_location=None, x_axis_label="block", y_axis_label="accuracy")
        self.accuracy.line(x="block", y="accuracy", source=self.accuracy_source, color=_DONE,
                           line_width=2)
        self.accuracy.scatter(x="block", y="accuracy", source=self.accuracy_source, color=_DONE,
                              size=7)
        self.accuracy.add_tools(HoverTool(tooltips=[("block", "@block"),
                                                    ("accuracy", "@accuracy{0.000}")]))
        self.accuracy.yaxis.formatter = NumeralTickFormatter(format="0%")
        self.accuracy.xaxis.ticker = AdaptiveTicker(min_interval=1, mantissas=[1, 2, 5])
        self.no_accuracy = Label(x=10, y=120, x_units="screen", y_units="screen",
                                 text=_NO_ACCURACY_YET,
                                 text_color="#777777", text_font_size="13px")
        self.accuracy.add_layout(self.no_accuracy)

        self.hardware_source = ColumnDataSource({key: [] for key, _ in _HARDWARE_COLUMNS})
        self.hardware = DataTable(
            name=PLOT_NAMES[4], source=self.hardware_source, index_position=None,
            height=_table_height(0),
            sizing_mode="stretch_width",
            columns=[TableColumn(field=key, title=title) for key, title in _HARDWARE_COLUMNS])
        hardware_title = Div(text="<h3 style='margin:4px 0'>Worker hardware</h3>",
                             sizing_mode="stretch_width")

        # Rounds of model-averaging / federated runs: shown once such a run published.
        self.rounds_summary = Div(name=ROUND_PLOT_NAMES[0], sizing_mode="stretch_width")
        self.round_accuracy_source = ColumnDataSource({"round": [], "accuracy": [],
                                                       "participants": []})
        self.round_accuracy = figure(
            name=ROUND_PLOT_NAMES[2], title="Validation accuracy per round", height=260,
            x_range=Range1d(0.5, 1.5), y_range=Range1d(0, 1.02), sizing_mode="stretch_width",
            tools="", toolbar_location=None, x_axis_label="round", y_axis_label="accuracy")
        self.round_accuracy.line(x="round", y="accuracy", source=self.round_accuracy_source,
                                 color=_FIT, line_width=2)
        self.round_accuracy.scatter(x="round", y="accuracy", source=self.round_accuracy_source,
                                    color=_FIT, size=7)
        self.round_accuracy.add_tools(HoverTool(tooltips=[
            ("round", "@round"), ("accuracy", "@accuracy{0.000}"),
            ("participants", "@participants")]))
        self.round_accuracy.yaxis.formatter = NumeralTickFormatter(format="0%")
        self.round_accuracy.xaxis.ticker = AdaptiveTicker(min_interval=1, mantissas=[1, 2, 5])
        self.rounds_source = ColumnDataSource({key: [] for key, _, _ in _ROUND_COLUMNS})
        self.rounds_table = DataTable(
            name=ROUND_PLOT_NAMES[1], source=self.rounds_source, index_position=None,
            height=_table_height(0), sizing_mode="stretch_width",
            columns=[TableColumn(field=key, title=title, width=width)
                     for key, title, width in _ROUND_COLUMNS])
        self.rounds_box = column(self.rounds_summary, self.round_accuracy, self.rounds_table,
                                 name=SECTION_NAMES[1], sizing_mode="stretch_width",
                                 visible=False)

        # The block-ensemble (Inc-kSGD) parts, hidden while only a round-based run published.
        self.blocks_box = column(row(self.progress, self.accuracy, sizing_mode="stretch_width"),
                                 self.throughput, name=SECTION_NAMES[0],
                                 sizing_mode="stretch_width")

        self.root = column(
            self.summary, self.story_box, self.blocks_box, self.rounds_box, hardware_title,
            self.hardware, sizing_mode="stretch_width")

    @log_errors
    def update(self) -> None:
        """Redraw every part from the current state (called every :data:`REFRESH_MS`)."""
        now = time.time()
        s = self.state
        only_rounds = s.status() == "waiting" and self.rounds.run_id is not None
        self.summary.text = (_summary_html(s, now) if not only_rounds else
                             _TITLE) + _features_html(self.features)
        if self.blocks_box.visible == only_rounds:
            self.blocks_box.visible = not only_rounds

        stages = s.stages()
        fractions = [min(1.0, d / t) if t else 0.0 for d, t in stages]
        labels = [f"{d} / {t if t is not None else '?'}" for d, t in stages]
        _set(self.progress_source, {"stage": list(_STAGES), "fraction": fractions,
                                    "label": labels, "full": [1.0] * 3})

        workers = sorted(s.workers)
        names = [_short(w) for w in workers]
        if list(self.throughput.x_range.factors) != names:
            self.throughput.x_range.factors = names
            # Slanted only when many workers' names would collide.
            self.throughput.xaxis.major_label_orientation = 0.5 if len(names) > 8 else "horizontal"
        _set(self.throughput_source, {
            "worker": names,
            "partition": [s.workers[w].partition_rate for w in workers],
            "fit": [s.workers[w].fit_rate for w in workers],
            "tasks": [s.workers[w].tasks for w in workers]})

        blocks = sorted(s.accuracy)
        _set(self.accuracy_source, {"block": blocks, "accuracy": [s.accuracy[b] for b in blocks]})
        self.no_accuracy.visible = not blocks
        text = _NO_ACCURACY if s.finished is not None else _NO_ACCURACY_YET
        if self.no_accuracy.text != text:
            self.no_accuracy.text = text
        # Every block of the run on the axis from the start, so points fill it in as blocks are
        # scored instead of the axis rescaling under them.
        end = (s.n_blocks if s.n_blocks else max(blocks, default=0) + 1) - 0.5
        if self.accuracy.x_range.end != end:
            self.accuracy.x_range.end = end

        self._update_rounds()
        self._order_sections()
        self._update_story(now)

        hardware = _hardware_rows(self.scheduler)
        self._set_table(self.hardware, hardware)
        height = _table_height(len(hardware["worker"]))
        if self.hardware.height != height:
            self.hardware.height = height


    def _set_table(self, table: DataTable, data: dict) -> None:
        """:func:`_set` for a table's source, redrawing the table in the browser.

        bokeh's DataTable redraws on a change of its row count only (its view's indices), so a
        table whose cells change while its rows stay (a run going from running to done, a
        worker's memory) kept showing its first cells. A change of the table itself (its tags)
        redraws it, a whole redraw: at most one every :data:`TABLE_REDRAW_S` per table (a
        running run's duration changes every second), the latest cells always in the end.
        """
        old = dict(table.source.data)
        if old != data:
            same_rows = len(next(iter(old.values()), [])) == len(next(iter(data.values()), []))
            table.source.data = data
            if same_rows:
                self._stale.add(table.id)
        now = time.monotonic()
        if table.id in self._stale and now - self._drawn.get(table.id, -TABLE_REDRAW_S) \
                >= TABLE_REDRAW_S:
            table.tags = [int(table.tags[0]) + 1 if table.tags else 1]
            self._drawn[table.id] = now
            self._stale.discard(table.id)

    def _order_sections(self) -> None:
        # Each run's section stays with its run: the latest run's comes first, under the run
        # list, so an older MLP run's rounds never sit above a newer Inc-kSGD run.
        train_started = self.runs.runs.get(self.state.run_id, {}).get("started") or 0.0
        rounds_started = self.runs.runs.get(self.rounds.run_id, {}).get("started") or 0.0
        boxes = [self.blocks_box, self.rounds_box]
        if rounds_started > train_started:
            boxes.reverse()
        children = list(self.root.children)
        at = children.index(self.story_box) + 1
        if children[at:at + 2] != boxes:
            children[at:at + 2] = boxes
            self.root.children = children

    def _history(self, now: float) -> list[dict]:
        """The desktop's run history when this scheduler can read it (a local cluster shares
        its home), re-read every :data:`HISTORY_EVERY_S`; [] otherwise."""
        read_at, runs = self._history_cache
        if now - read_at >= HISTORY_EVERY_S:
            from rpicluster import history

            runs = []
            if history.enabled() and history.path().exists():
                try:
                    runs = history.list_runs(20)
                except Exception:  # noqa: BLE001 - the page shows what the events tell
                    runs = []
            self._history_cache = (now, runs)
        return runs

    def _update_story(self, now: float) -> None:
        rows = run_rows(self.runs, self._history(now), now)
        self._set_table(self.runs_table, rows)
        height = _table_height(len(rows["run"]))
        if self.runs_table.height != height:
            self.runs_table.height = height
        ts, rates = self.timeline.rows_per_second()
        _set(self.rows_line_source, {"t": [t * 1000 for t in ts], "rate": rates})
        temps = self.timeline.per_worker("temperature")
        _set(self.temperature_source, _lines(temps))
        self.no_temperature.visible = not temps
        used, limits = self.timeline.per_worker("memory"), self.timeline.per_worker("limit")
        lines = _lines(used)
        dashed = _lines({w: v for w, v in limits.items() if any(v[1])}, order=sorted(used))
        _set(self.memory_source, {**{k: lines[k] + dashed[k] for k in lines},
                                  "dash": ["solid"] * len(lines["xs"])
                                  + ["dashed"] * len(dashed["xs"])})

    def _update_rounds(self) -> None:
        r = self.rounds
        if r.run_id is None:
            return
        self.rounds_box.visible = True
        self.rounds_summary.text = _rounds_html(r)
        cols = r.table()
        scored = [i for i, a in enumerate(cols["accuracy"]) if a == a]  # not NaN
        _set(self.round_accuracy_source, {
            "round": [cols["round"][i] for i in scored],
            "accuracy": [cols["accuracy"][i] for i in scored],
            "participants": [cols["participants"][i] for i in scored]})
        # Every round of the run on the axis from the start (points fill it in).
        end = max(r.n_rounds or 1, max(cols["round"], default=1)) + 0.5
        if self.round_accuracy.x_range.end != end:
            self.round_accuracy.x_range.end = end
        # Newest round first: the table shows the latest rounds without scrolling.
        order = list(reversed(range(len(cols["round"]))))
        self._set_table(self.rounds_table, {
            "round": [cols["round"][i] for i in order],
            "participants": [cols["participants"][i] for i in order],
            "left_out": [cols["left_out"][i] or "–" for i in order],
            "rows": [f"{cols['rows'][i]:,}" for i in order],
            "moved": [format_bytes(cols["moved"][i]) for i in order],
            "seconds": [f"{cols['seconds'][i]:.1f}" for i in order],
            "accuracy": [f"{cols['accuracy'][i]:.4f}" if cols["accuracy"][i] == cols[
                "accuracy"][i] else "–" for i in order]})
        height = _table_height(len(order))
        if self.rounds_table.height != height:
            self.rounds_table.height = height


def _rounds_html(r: RoundsState) -> str:
    """One line on the latest round-based run."""
    what = {"averaging": "model averaging", "federated": "federated averaging"}.get(
        str(r.mode), str(r.mode))
    done = len(r.rounds)
    moved = sum(r.table()["moved"])
    last = r.rounds[max(r.rounds)] if r.rounds else {}
    acc = last.get("accuracy")
    parts = [f"{html.escape(what)} ({html.escape(str(r.model))}) run "
             f"<b>{html.escape(str(r.run_id))}</b>", f"<b>{r.status()}</b>",
             f"{done} / {r.n_rounds if r.n_rounds is not None else '?'} rounds"
             + (f" ({r.resumed} resumed)" if r.resumed else ""),
             f"{format_bytes(moved)} moved",
             f"latest accuracy {acc:.4f}" if acc is not None else "no validation accuracy"]
    left = "; ".join(f"<b>{html.escape(str(h))}</b>: {html.escape(str(why))}"
                     for h, why in (last.get("left_out") or {}).items())
    return (f"<h3 style='margin:8px 0 2px 0'>Rounds</h3>"
            f"<div style='font-size:15px;color:#333'>{' · '.join(parts)}</div>"
            + (f"<div style='font-size:14px;color:#8a4b08;margin-top:2px'>left out of round "
               f"{max(r.rounds)}: {left}</div>" if left else ""))


_NO_ACCURACY_YET = "no validation set in this run (yet)"
_NO_ACCURACY = "this run had no validation set (train with --test STORE to score each block)"


def _lines(series: dict, order: list | None = None) -> dict:
    """Columns of a multi-line plot, one line per worker (times in ms), coloured by the
    worker's place in ``order`` (default: the workers sorted)."""
    order = order if order is not None else sorted(series)
    names = [w for w in order if w in series] + sorted(set(series) - set(order))
    return {"xs": [[t * 1000 for t in series[w][0]] for w in names],
            "ys": [list(series[w][1]) for w in names], "worker": names,
            "color": [_PALETTE[order.index(w) % len(_PALETTE)] if w in order else "#777777"
                      for w in names]}


def run_rows(runs: RunLog, recorded: list[dict], now: float) -> dict:
    """Columns of the run list: the runs this scheduler saw in its events, each with its
    history number and outcome when the desktop's history (``recorded``) holds it, then the
    history's other runs (earlier ones, benches, tunes); newest first."""
    entries = []
    matched = set()
    for e in runs.newest_first():
        # The history row of this run: the latest one of its kind that began before it and
        # had not ended yet when it began (a recorder begins before the run's first event).
        began = e["started"] or 0.0
        rec = max((r for r in recorded if r["id"] not in matched and r["kind"] == e["kind"]
                   and r["outcome"] != "lost" and r["started"] - 1 <= began
                   <= (r["ended"] or now) + 1), key=lambda r: r["started"], default=None)
        if rec is not None:
            matched.add(rec["id"])
        # The history's outcome once it has one (it knows a failure from a stop), else the
        # one the run's events told: the same words either way.
        if rec is not None and rec["outcome"] != "running":
            e = {**e, "status": rec["outcome"], "reason": rec["reason"]}
        status = e["status"] + (f": {e['reason']}" if e.get("reason") else "")
        total = e["total"] if e["total"] is not None else "?"
        entries.append({
            "run": e["run"] + (f" (#{rec['id']})" if rec else ""), "kind": e["kind"],
            "what": e["what"], "started": e["started"], "status": status,
            "progress": f"{e['done']} / {total} {e['unit']}",
            "accuracy": e["accuracy"],
            "duration": (e["ended"] or now) - e["started"] if e["started"] else None})
    for r in recorded:
        if r["id"] in matched:
            continue
        res = r["results"]
        acc = res.get("test_accuracy", res.get("accuracy"))
        entries.append({
            "run": f"#{r['id']}", "kind": r["kind"], "what": str(r["data"] or ""),
            "started": r["started"],
            "status": r["outcome"] + (f": {r['reason']}" if r["reason"] else ""),
            "progress": "", "accuracy": acc,
            "duration": (r["ended"] or now) - r["started"]})
    entries.sort(key=lambda x: -(x["started"] or 0.0))
    return {
        "run": [x["run"] for x in entries], "kind": [x["kind"] for x in entries],
        "what": [x["what"] for x in entries],
        "started": [time.strftime("%H:%M:%S", time.localtime(x["started"]))
                    if x["started"] else "?" for x in entries],
        "status": [x["status"] for x in entries], "progress": [x["progress"] for x in entries],
        "accuracy": [f"{x['accuracy']:.4f}" if isinstance(x["accuracy"], (int, float)) else "–"
                     for x in entries],
        "duration": [format_duration(x["duration"]) for x in entries]}


def _table_height(n_rows: int) -> int:
    # Grow with the cluster so eight Pis show without a scroll bar; scroll beyond twenty.
    return 32 + 26 * max(2, min(n_rows, 20))


def _set(source: ColumnDataSource, data: dict) -> None:
    # Sending identical data every second would make every browser re-render for nothing.
    if dict(source.data) != data:
        source.data = data




_TITLE = "<h2 style='margin:6px 0 2px 0'>rpicluster training</h2>"


def _summary_html(s: TrainingState, now: float) -> str:
    status = s.status()
    if status == "waiting":
        body = "waiting for a training run (nothing published on this scheduler yet)"
    else:
        frac = s.fraction()
        ended = s.finished if s.finished is not None else now
        elapsed = ended - s.started if s.started is not None else None
        rate = s.rows_per_second(now)
        parts = [f"run <b>{html.escape(str(s.run_id or '?'))}</b>", f"<b>{status}</b>",
                 f"{s.n_blocks if s.n_blocks is not None else '?'} blocks × "
                 f"{s.n_clusters if s.n_clusters is not None else '?'} clusters"
                 + (f" ({s.resumed} blocks resumed)" if s.resumed else ""),
                 f"<b>{s.blocks_done()} / {s.n_blocks if s.n_blocks is not None else '?'}</b> "
                 "blocks done",
                 f"{frac:.0%} done" if frac is not None else "size unknown",
                 f"elapsed {format_duration(elapsed)}",
                 f"{rate:,.0f} rows/s" if rate is not None else "– rows/s"]
        if status == "running":
            parts.append(f"ETA <b>{format_duration(s.eta(now))}</b>")
        body = " · ".join(parts)
        if s.alert and status == "running":
            body += f"<br><span style='color:#b00'>{html.escape(s.alert)}</span>"
    return f"{_TITLE}<div style='font-size:15px;color:#333'>{body}</div>"


def _features_html(f: FeaturesState) -> str:
    """One line on the latest ``rpicluster features`` run, or nothing before the first."""
    if f.run_id is None:
        return ""
    done = f.resumed + len(f.done)
    rates = ", ".join(f"{html.escape(_short(w))} {r:,.1f}"
                      for w, r in f.images_per_second().items())
    return (f"<div style='font-size:15px;color:#333;margin-top:4px'>feature extraction run "
            f"<b>{html.escape(f.run_id)}</b> · <b>{f.status()}</b>"
            f" · {done} / {f.n_blocks if f.n_blocks is not None else '?'} blocks"
            f" · images/s per worker: {rates or '–'}</div>")


def _hardware_rows(scheduler) -> dict:
    rows = {key: [] for key, _ in _HARDWARE_COLUMNS}
    for address, ws in sorted(scheduler.workers.items(), key=lambda kv: str(kv[1].name)):
        health = (ws.metrics or {}).get(METRIC) or {}
        temp = health.get("temperature")
        flags = health.get("throttled")
        if flags is None:
            throttling = "n/a (no vcgencmd)" if health else "waiting for report"
        else:
            throttling = ", ".join(flags) if flags else "ok"
        memory = health.get("memory")
        used = format_bytes(ws.memory.process)
        for key, value in (
                ("worker", str(ws.name) if ws.name != address else _short(address)),
                ("host", ws.host), ("arch", health.get("arch", "")),
                ("cores", health.get("cores", "")), ("threads", ws.nthreads),
                ("memory", f"{used} / {format_bytes(ws.memory_limit)} "
                           f"({ws.memory.process / ws.memory_limit:.0%})"
                 if ws.memory_limit else f"{used} / no limit"),
                ("host_memory", format_bytes(memory) if memory else ""),
                ("temperature", f"{temp:.1f}" if temp is not None else "n/a"),
                ("throttling", throttling)):
            rows[key].append(value)
    return rows


@log_errors
def training_doc(scheduler, extra: dict, doc, *, state: TrainingState,
                 features: FeaturesState | None = None, rounds: RoundsState | None = None,
                 runs: RunLog | None = None, timeline: Timeline | None = None) -> None:
    """Bokeh application body for ``/rpicluster`` (the signature distributed's dashboard uses).

    The server binds ``state`` (``functools.partial``), so the page never looks up the scheduler
    plugin that folds it.

    Parameters
    ----------
    scheduler : distributed.Scheduler
        The scheduler serving the dashboard (its workers give the hardware table).
    extra : dict
        Template variables of the Dask dashboard (navigation bar, prefix).
    doc : bokeh.document.Document
        The session's document.
    state : TrainingState
        The live training state (the :class:`~rpicluster.dashboard.server.TrainingMonitor`'s).
    features : FeaturesState, optional
        The live feature-extraction state (the monitor's too).
    rounds : RoundsState, optional
        The live state of round-based runs (the monitor's too).
    runs, timeline : RunLog, Timeline, optional
        The runs seen and the cluster's samples over time (the monitor's too).
    """
    page = TrainingPage(scheduler, state, features, rounds, runs, timeline)
    page.update()
    add_periodic_callback(doc, page, REFRESH_MS)
    doc.title = "Dask: rpicluster training"
    doc.add_root(page.root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME
