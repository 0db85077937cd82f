"""Bring an inventory's cluster up, look at it, and take it down: ``up``, ``status``, ``down``.

The cluster is data and ``up`` reconciles (like distributed's ``SpecCluster``): it starts the
scheduler if it does not answer, then exactly the workers the scheduler does not see
(``to_open = spec - running``), and stops recorded workers that left the inventory. A worker is
ready when the scheduler lists it by name, never by reading its log. What was started, where,
with which pid, is kept in a state file under :func:`rpicluster.config.state_dir`, so ``down``
stops exactly that and verifies that no process of it is left.

TLS is the default: a private CA (:mod:`rpicluster.deploy.tls`) signs a certificate for the
scheduler, every worker and the client; ``insecure=True`` runs plain TCP, with a warning. ``up``
rotates the CA (:func:`rotate_certificates`) when a certificate nears expiry or belongs to a host
no longer in the inventory: the scheduler and every worker then restart with new certificates.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from rpicluster import config
from rpicluster.deploy import remote
from rpicluster.deploy.hosts import is_local_host
from rpicluster.deploy.probe import ask, check_dask_timeouts, scheduler_client, seen_workers
from rpicluster.deploy.ssh import Connection, LocalConnection, fan_out
from rpicluster.deploy.state import (ClusterState, cluster_dir, cluster_id, load_state,
                                     node_from_json, node_to_json, recorded_id)
from rpicluster.deploy.tls import CertFiles, CertificateAuthority
from rpicluster.deploy.versions import report_mismatches
from rpicluster.errors import (BootstrapError, ConfigError, HostsFailedError, RPiClusterError,
                               RPiClusterWarning, SSHError)
from rpicluster.inventory import ClusterSpec, NodeSpec, load_inventory

_REMOTE = ["-m", "rpicluster.deploy.remote", "--spec"]


# --------------------------------------------------------------------------- helpers


def _connect(node: NodeSpec, local: bool, accept_new_hosts: bool, ssh_timeout: float):
    if local:
        return LocalConnection(node)
    return Connection(node, accept_new_hosts=accept_new_hosts, timeout=ssh_timeout)


def _start_output(cid: str, name: str) -> Path:
    """Where the output of a failed start of ``name`` is kept (``rpicluster logs`` shows it)."""
    return cluster_dir(cid) / "start-errors" / f"{name}.log"


def _remote(conn, spec: dict, keep: Path | None = None, timeout: float | None = None) -> dict:
    """Run the remote entry point with ``spec``; its last output line is JSON.

    A failure is one line: the host, the action and the remote error's last line. ``keep``, when
    given, receives the full output of a failed run (and is removed before a new one).
    ``timeout`` bounds the run (default ``config.COMMAND_TIMEOUT``).
    """
    what = f"rpicluster.deploy.remote {spec['action']}"
    if keep is not None:
        keep.unlink(missing_ok=True)
    res = conn.python([*_REMOTE, json.dumps(spec)], check=False, what=what, timeout=timeout)
    try:
        if res.exit_status == 0:
            return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        pass
    output = (res.stdout + res.stderr).strip()
    last = _last_error(res.stderr if res.stderr.strip() else res.stdout)
    where = ""
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(output + "\n")
        where = f"; full output: rpicluster logs {spec.get('name', conn.host)}"
    raise SSHError(f"{conn.host}: {what} failed (exit status {res.exit_status}): {last}{where}")


def _last_error(text: str) -> str:
    """The line of a log or an error output that says what went wrong: the last line naming an
    error or exception, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["(no output)"])[-1][-300:]


def _push_certs(conn, certs: CertFiles | None, workdir: str, local: bool) -> dict | None:
    """Copy a node's certificate files next to its work directory (mode 0600)."""
    if certs is None:
        return None
    if local:
        return {"ca": str(certs.ca), "cert": str(certs.cert), "key": str(certs.key)}
    paths = remote.tls_paths(f"{workdir}/tls")
    conn.makedirs(f"{workdir}/tls")
    for kind, path in paths.items():
        conn.put_bytes(getattr(certs, kind).read_bytes(), path, mode=0o600)
    return paths


def _stop(conn, entry: dict, name: str) -> dict:
    grace = config.STOP_TIMEOUT
    # The remote stop waits the grace, then up to 5 s after SIGKILL: the command gets that long.
    return _remote(conn, {"action": "stop", "pid": entry["pid"], "name": name, "timeout": grace},
                   timeout=max(config.COMMAND_TIMEOUT, grace + 30))


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class HostRow:
    """One host's line in a report."""

    host: str
    role: str
    state: str
    pid: int | None = None
    detail: str = ""

    @property
    def reason(self) -> str:
        """``detail`` without a leading ``"host: "`` (host errors name their host already)."""
        return self.detail.removeprefix(f"{self.host}: ")


@dataclass(frozen=True)
class Report:
    """Outcome of ``up`` or ``down`` for every host."""

    address: str
    dashboard: str
    rows: tuple[HostRow, ...]

    @property
    def ok(self) -> bool:
        return not any(r.state == "failed" for r in self.rows)

    def failures(self) -> str:
        return "\n".join(f"{r.host}: {r.reason}" for r in self.rows if r.state == "failed")


# --------------------------------------------------------------------------- up


def _ensure_scheduler(spec: ClusterSpec, state: ClusterState, accept_new_hosts: bool,
                      ssh_timeout: float, open_dashboard: bool = False) -> tuple[object, HostRow]:
    """A client of a live scheduler, starting (or restarting) it when it does not answer."""
    sched = spec.scheduler
    proto = "tls" if state.tls else "tcp"
    state.address = f"{proto}://{sched.host}:{sched.scheduler_port}"
    dashboard_host = sched.host if open_dashboard else "127.0.0.1"
    state.dashboard = f"http://{dashboard_host}:{sched.dashboard_port}/status"
    security = state.security()
    if state.scheduler is not None:
        try:
            return scheduler_client(state.address, security), HostRow(
                sched.host, "scheduler", "running", state.scheduler["pid"], state.address)
        except (OSError, TimeoutError):
            pass
    local = is_local_host(sched.host)
    try:
        with _connect(sched.node, local, accept_new_hosts, ssh_timeout) as conn:
            if state.scheduler is not None:
                _stop(conn, state.scheduler, "scheduler")
            workdir = (str(cluster_dir(state.cid) / "scheduler") if local
                       else conn.resolve(f"{sched.node.local_directory}/scheduler"))
            tls = _push_certs(conn, state.certs("scheduler"), workdir, local)
            started = _remote(conn, remote.start_spec("scheduler", sched, local_directory=workdir,
                                                      tls=tls, dashboard_host=dashboard_host),
                              keep=_start_output(state.cid, "scheduler"))
    except RPiClusterError as exc:
        raise BootstrapError(f"scheduler on {sched.host}: could not start: "
                             f"{str(exc).removeprefix(f'{sched.host}: ')}") from None
    state.scheduler = {"local": local, "pid": started["pid"], "log": started["log"],
                       "node": node_to_json(sched.node)}
    state.save()
    join_timeout = config.JOIN_TIMEOUT
    deadline = time.monotonic() + join_timeout
    while True:
        try:
            client = scheduler_client(state.address, security)
            break
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                with _connect(sched.node, local, accept_new_hosts, ssh_timeout) as conn:
                    tail = conn.tail(started["log"], 200)
                    # Never leave a half-started scheduler behind.
                    if not _stop(conn, state.scheduler, "scheduler")["left"]:
                        state.scheduler = None
                        state.save()
                keep = _start_output(state.cid, "scheduler")
                keep.parent.mkdir(parents=True, exist_ok=True)
                keep.write_text(tail)
                raise BootstrapError(
                    f"scheduler on {sched.host}: not answering on {state.address} after "
                    f"{join_timeout:.0f} s (RPICLUSTER_JOIN_TIMEOUT), so it was stopped again; "
                    f"its log ends: {_last_error(tail)}; full log: rpicluster logs scheduler"
                ) from None
            time.sleep(0.5)
    return client, HostRow(sched.host, "scheduler", "started", started["pid"], state.address)


def _start_worker(node: NodeSpec, state: ClusterState, accept_new_hosts: bool,
                  ssh_timeout: float) -> dict:
    with Connection(node, accept_new_hosts=accept_new_hosts, timeout=ssh_timeout) as conn:
        old = state.workers.get(node.name)
        if old is not None:
            # Recorded but not seen by the scheduler: a stale or cut-off process; replace it.
            _stop(conn, old, node.name)
        workdir = conn.resolve(node.workdir)
        conn.makedirs(workdir)
        tls = _push_certs(conn, state.certs(node.name), workdir, local=False)
        started = _remote(conn, remote.start_spec("worker", node, local_directory=workdir,
                                                  tls=tls, scheduler=state.address),
                          keep=_start_output(state.cid, node.name))
    return {"pid": started["pid"], "log": started["log"], "node": node_to_json(node)}


def _stop_worker(name: str, entry: dict, ssh_timeout: float) -> dict:
    node = node_from_json(entry["node"])
    with Connection(node, timeout=ssh_timeout) as conn:
        return _stop(conn, entry, name)


def _log_tail(node: NodeSpec, log: str, ssh_timeout: float) -> str:
    with Connection(node, timeout=ssh_timeout) as conn:
        return conn.tail(log)


def up(inventory: str | Path | ClusterSpec, *, accept_new_hosts: bool = False,
       insecure: bool = False, provision: bool = False, join_timeout: float | None = None,
       ssh_timeout: float | None = None, open_dashboard: bool = False) -> Report:
    """Bring the inventory's cluster to its spec: start what is missing, nothing else.

    Parameters
    ----------
    inventory : path or ClusterSpec
        The TOML inventory (or one already loaded).
    accept_new_hosts : bool
        Trust and record unknown host keys (trust on first use). Changed keys are always refused.
    insecure : bool
        Plain TCP instead of TLS (a warning is issued).
    provision : bool
        First create the venv on every worker host from a wheelhouse of this machine's exact
        versions (:func:`rpicluster.deploy.provision.provision`).
    join_timeout : float, optional
        Seconds to wait for the scheduler to see every started worker (default
        ``config.JOIN_TIMEOUT``, env ``RPICLUSTER_JOIN_TIMEOUT``).
    ssh_timeout : float, optional
        Seconds for connecting to one host (default ``config.SSH_TIMEOUT``).
    open_dashboard : bool
        Let the scheduler's dashboard listen on its network address (a warning is issued: its
        pages show logs, task keys and exceptions to anyone on the network). By default it
        listens on the scheduler host's 127.0.0.1 only (``rpicluster dashboard`` prints the
        ``ssh -L`` command that reaches it from elsewhere). It applies when ``up`` starts the
        scheduler.

    Returns
    -------
    Report
        Every host's row (running, started).

    Raises
    ------
    HostsFailedError
        Some workers could not be started or did not join; the others are up and recorded.
        ``exc.report`` has every row, and the message each failure with its log tail. When
        this call started the scheduler and no worker came up, the scheduler is stopped again.
    BootstrapError
        The scheduler could not be started (or did not answer: it is stopped again).
    """
    spec = inventory if isinstance(inventory, ClusterSpec) else load_inventory(inventory)
    check_dask_timeouts(spec)
    join_timeout = config.JOIN_TIMEOUT if join_timeout is None else join_timeout
    ssh_timeout = config.SSH_TIMEOUT if ssh_timeout is None else ssh_timeout
    cid = cluster_id(spec.path)
    try:
        state = load_state(spec.path)
    except ConfigError:
        state = ClusterState(cid=cid, inventory=str(spec.path), tls=not insecure)
    if state.tls == insecure and state.scheduler is not None:
        raise ConfigError(f"{spec.path}: the cluster is running with"
                          f"{'' if state.tls else 'out'} TLS; run rpicluster down before "
                          f"switching {'to' if insecure else 'off'} --insecure")
    state.tls = not insecure
    if insecure:
        warnings.warn(f"{spec.path}: --insecure: scheduler and workers use plain TCP; anyone on "
                      "the network can connect and run code on the cluster", UserWarning,
                      stacklevel=2)
    if state.tls:
        rotate_certificates(spec)
    if provision:
        from rpicluster.deploy.provision import one_line, provision as _provision

        try:
            _provision(spec, accept_new_hosts=accept_new_hosts, ssh_timeout=ssh_timeout)
        except HostsFailedError as exc:
            # Nothing is started: every host's row says whether it was provisioned.
            raise HostsFailedError(str(exc), Report("", "", tuple(
                HostRow(h, "worker", "provisioned" if r.ok else "failed", None,
                        "" if r.ok else one_line(r.error)) for h, r in exc.report.items()))
            ) from None
    if open_dashboard:
        warnings.warn(f"the dashboard of {spec.scheduler.host} listens on the network "
                      f"(port {spec.scheduler.dashboard_port}): anyone who reaches it reads the "
                      "cluster's logs, task keys and exceptions, without a password",
                      RPiClusterWarning, stacklevel=2)
    client, sched_row = _ensure_scheduler(spec, state, accept_new_hosts, ssh_timeout,
                                          open_dashboard)
    try:
        report = _reconcile(spec, state, client, sched_row, accept_new_hosts, join_timeout,
                            ssh_timeout)
        report_mismatches(client, str(spec.path))
        return report
    except HostsFailedError as exc:
        if sched_row.state != "started" or any(
                r.role == "worker" and r.state in ("started", "running") for r in exc.report.rows):
            raise
        # This up started the scheduler and no worker came up: take it all down again.
        client.close()
        raise HostsFailedError(f"{exc} {_undo(spec, ssh_timeout)}", exc.report) from None
    except BaseException:
        if sched_row.state == "started":
            client.close()
            _undo(spec, ssh_timeout)
        raise
    finally:
        client.close()


def _undo(spec: ClusterSpec, ssh_timeout: float) -> str:
    """Stop what a failed ``up`` started (it started the scheduler); say what happened."""
    try:
        down(spec.path, ssh_timeout=ssh_timeout)
    except RPiClusterError as exc:
        return f"No worker came up; stopping the scheduler again failed too: {exc}"
    return "No worker came up, so the scheduler was stopped again (nothing is left running)."


def rotate_certificates(spec: ClusterSpec) -> str | None:
    """Replace the cluster's CA when a certificate expires within ``tls.RENEW_BEFORE`` or was
    issued to a host no longer in ``spec``; returns why (None: nothing to do).

    The running scheduler then no longer accepts the client's new certificate, so ``up`` restarts
    it, and the workers it no longer sees, with certificates of the new CA; the removed host's
    certificate connects nowhere. A warning says so.
    """
    ca = CertificateAuthority(cluster_dir(cluster_id(spec.path)) / "tls")
    why = ca.rotate_if_needed({"scheduler", "client", *(w.name for w in spec.workers)})
    if why is not None:
        warnings.warn(f"{spec.path}: new certificates ({why}); the scheduler and every worker "
                      "restart with them", UserWarning, stacklevel=3)
    return why


def _reconcile(spec, state, client, sched_row, accept_new_hosts, join_timeout, ssh_timeout):
    try:
        return _reconcile_with(spec, state, client, sched_row, accept_new_hosts, join_timeout,
                               ssh_timeout)
    except (OSError, TimeoutError):
        raise BootstrapError(f"scheduler on {spec.scheduler.host}: stopped answering on "
                             f"{state.address} (no reply within {config.PROBE_TIMEOUT:g} s, "
                             "RPICLUSTER_PROBE_TIMEOUT); see rpicluster logs scheduler "
                             f"({state.scheduler['log']} there), then run rpicluster up again"
                             ) from None


def _reconcile_with(spec, state, client, sched_row, accept_new_hosts, join_timeout,
                    ssh_timeout):
    seen = seen_workers(client)
    wanted = {w.name: w for w in spec.workers}
    rows: dict[str, HostRow] = {}
    # Recorded workers that left the inventory.
    gone = {n: e for n, e in state.workers.items() if n not in wanted}
    for name, res in fan_out([node_from_json(e["node"]) for e in gone.values()],
                             lambda n: _stop_worker(n.name, gone[n.name], ssh_timeout)).items():
        if res.ok and not res.value["left"]:
            del state.workers[name]
            rows[name] = HostRow(name, "worker", "stopped", gone[name]["pid"], "not in inventory")
        else:
            rows[name] = HostRow(name, "worker", "failed", gone[name]["pid"],
                                 res.error or f"processes left: {res.value['left']}")
    to_open = [w for w in spec.workers if w.name not in seen]
    results = fan_out(to_open, lambda n: _start_worker(n, state, accept_new_hosts, ssh_timeout))
    for name, res in results.items():
        if res.ok:
            state.workers[name] = res.value
        else:
            rows[name] = HostRow(name, "worker", "failed", None, res.error)
    state.save()
    started = [n for n, r in results.items() if r.ok]
    deadline = time.monotonic() + join_timeout
    while True:
        seen = seen_workers(client)
        missing = [n for n in started if n not in seen]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    tails = fan_out([wanted[n] for n in missing],
                    lambda n: _log_tail(n, state.workers[n.name]["log"], ssh_timeout))
    for name in missing:
        tail = tails[name].value if tails[name].ok else f"(log unavailable: {tails[name].error})"
        rows[name] = HostRow(name, "worker", "failed", state.workers[name]["pid"],
                             f"did not join within {join_timeout:.0f} s; last lines of "
                             f"{state.workers[name]['log']}:\n{tail}")
    now = time.time()
    state.failed = {n: {"reason": r.detail.splitlines()[0][:300] if r.detail else "", "at": now}
                    for n, r in rows.items() if r.state == "failed" and n in wanted}
    state.save()
    for w in spec.workers:
        if w.name not in rows:
            info = seen.get(w.name, {})
            rows[w.name] = HostRow(w.name, "worker", "started" if w.name in started else "running",
                                   state.workers.get(w.name, {}).get("pid"),
                                   info.get("address", ""))
    report = Report(state.address, state.dashboard,
                    (sched_row, *(rows[w.name] for w in spec.workers),
                     *(r for n, r in rows.items() if n not in wanted)))
    if not report.ok:
        raise HostsFailedError(f"{spec.path}: some hosts are not up (the others are):\n"
                               f"{report.failures()}", report)
    return report


# --------------------------------------------------------------------------- down


def down(inventory: str | Path | None = None, *, ssh_timeout: float | None = None) -> Report:
    """Stop exactly what ``up`` started (workers, then the scheduler) and verify it by pid.

    Parameters
    ----------
    inventory : path, optional
        The inventory whose cluster to stop; default: the cluster ``up`` last recorded.

    Raises
    ------
    HostsFailedError
        A host could not be reached or a process would not die; it stays recorded so that
        ``down`` can be run again. The other hosts are stopped.
    """
    state = load_state(inventory)
    ssh_timeout = config.SSH_TIMEOUT if ssh_timeout is None else ssh_timeout
    rows = []
    entries = dict(state.workers)
    results = fan_out([node_from_json(e["node"]) for e in entries.values()],
                      lambda n: _stop_worker(n.name, entries[n.name], ssh_timeout))
    for name, res in results.items():
        if res.ok and not res.value["left"]:
            del state.workers[name]
            rows.append(HostRow(name, "worker", "stopped" if res.value["was_running"]
                                else "not running", entries[name]["pid"]))
        else:
            rows.append(HostRow(name, "worker", "failed", entries[name]["pid"],
                                res.error or f"processes left: {res.value['left']}"))
    if state.scheduler is not None:
        node = node_from_json(state.scheduler["node"])
        try:
            with _connect(node, state.scheduler["local"], False, ssh_timeout) as conn:
                res = _stop(conn, state.scheduler, "scheduler")
            if res["left"]:
                raise SSHError(f"processes left: {res['left']}")
            rows.append(HostRow(node.host, "scheduler", "stopped" if res["was_running"]
                                else "not running", state.scheduler["pid"]))
            state.scheduler = None
        except RPiClusterError as exc:
            rows.append(HostRow(node.host, "scheduler", "failed", state.scheduler["pid"], str(exc)))
    report = Report(state.address, state.dashboard, tuple(rows))
    if state.workers or state.scheduler is not None:
        state.save()
        raise HostsFailedError(f"{state.inventory}: not everything stopped (run down again):\n"
                               f"{report.failures()}", report)
    state.path.unlink()
    return report


# --------------------------------------------------------------------------- status, logs


@dataclass(frozen=True)
class StatusRow:
    """One host's line in ``status``; ``detail`` says why a worker is not running."""

    host: str
    role: str
    state: str
    pid: int | None
    threads: int | None = None
    memory: str = ""
    tasks: int | None = None
    temperature: float | None = None
    detail: str = ""


def _when(t: float | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _check_worker(name: str, entry: dict, ssh_timeout: float) -> dict:
    node = node_from_json(entry["node"])
    with Connection(node, timeout=ssh_timeout) as conn:
        return _remote(conn, {"action": "check", "pid": entry["pid"], "name": name,
                              "local_directory": str(Path(entry["log"]).parent)})


def _absent(name: str, state: ClusterState, check) -> StatusRow:
    """The row of an inventory worker the scheduler does not list, with the reason."""
    entry = state.workers.get(name)
    failed = state.failed.get(name)
    if entry is None:
        if failed:
            return StatusRow(name, "worker", "failed", None,
                             detail=f"up failed at {_when(failed['at'])}: {failed['reason']}")
        return StatusRow(name, "worker", "missing", None,
                         detail="never connected (run rpicluster up)")
    if not check.ok:
        return StatusRow(name, "worker", "lost", entry["pid"],
                         detail=f"host unreachable: {check.error}")
    sup = check.value.get("supervisor") or {}
    if check.value["alive"]:
        detail = (f"worker restarted {sup['restarts']} times, last exit at "
                  f"{_when(sup['last_exit'])}" if sup.get("restarts") else
                  "started, not joined yet")
        if failed:
            detail += f" (last up: {failed['reason']})"
        return StatusRow(name, "worker", "rejoining", entry["pid"], detail=detail)
    ago = check.value.get("last_alive_ago")
    if ago is None:     # no supervisor state file: the worker never got as far as starting
        return StatusRow(name, "worker", "lost", entry["pid"],
                         detail="no process left on the host; run rpicluster up")
    # The supervisor's state file: written at each change, refreshed every few seconds while it
    # lives; host clock differences do not matter as the host measured the age itself.
    last = _when(time.time() - ago)
    how = (f"stopped by a signal at {last}" if sup.get("state") == "stopped" else
           f"killed outright (or the host restarted); last alive at {last}")
    return StatusRow(name, "worker", "lost", entry["pid"],
                     detail=f"{how}: no process left on the host; run rpicluster up")


def status(inventory: str | Path | None = None, *,
           ssh_timeout: float | None = None) -> tuple[StatusRow, ...]:
    """Scheduler and every inventory worker, as the scheduler sees them, with reasons.

    A worker the scheduler does not list is ``missing`` (never connected), ``failed`` (the last
    ``up`` could not start it; the reason), ``rejoining`` (its supervisor on the host is
    restarting it) or ``lost`` (no process left on the host, or the host does not answer). The
    hosts of such workers are asked over SSH (in parallel). When the scheduler does not answer,
    every worker row is ``unknown``.
    """
    from dask.utils import format_bytes

    from rpicluster.deploy.health import read_temperature

    state = load_state(inventory)
    ssh_timeout = config.SSH_TIMEOUT if ssh_timeout is None else ssh_timeout
    try:
        names = [w.name for w in load_inventory(state.inventory).workers]
    except ConfigError:      # the inventory moved or broke since up: what was recorded
        names = []
    sched_host = node_from_json(state.scheduler["node"]).host if state.scheduler else "?"
    sched_pid = state.scheduler["pid"] if state.scheduler else None
    try:
        client = scheduler_client(state.address, state.security())
        try:
            seen = seen_workers(client)
            processing = ask(client, client.scheduler.processing)
            try:
                temps = ask(client, lambda: client.run(read_temperature, asynchronous=True,
                                                        on_error="ignore")) if seen else {}
            except (OSError, TimeoutError):   # a worker too busy to answer: no temperatures
                temps = {}
        finally:
            client.close()
    except (OSError, TimeoutError):
        return (StatusRow(sched_host, "scheduler", "not answering", sched_pid,
                          detail=f"{state.address} does not answer within "
                                 f"{config.PROBE_TIMEOUT:g} s (RPICLUSTER_PROBE_TIMEOUT); see "
                                 "rpicluster logs scheduler, then run rpicluster up"),
                *(StatusRow(n, "worker", "unknown", state.workers.get(n, {}).get("pid"),
                            detail="scheduler not answering")
                  for n in dict.fromkeys([*names, *state.workers])))
    order = list(dict.fromkeys([*names, *state.workers, *seen]))
    absent = {n: state.workers[n] for n in order if n not in seen and n in state.workers}
    checks = fan_out([node_from_json(e["node"]) for e in absent.values()],
                     lambda node: _check_worker(node.name, absent[node.name], ssh_timeout))
    rows = [StatusRow(sched_host, "scheduler", "running", sched_pid,
                      tasks=sum(len(v) for v in processing.values()))]
    for name in order:
        pid = state.workers.get(name, {}).get("pid")
        w = seen.get(name)
        if w is None:
            rows.append(_absent(name, state, checks.get(name)))
            continue
        used = w.get("metrics", {}).get("memory", 0)
        rows.append(StatusRow(
            name, "worker", w.get("status", "running"), pid, w["nthreads"],
            f"{format_bytes(used)} / {format_bytes(w['memory_limit'] or 0)}",
            len(processing.get(w["address"], ())), temps.get(w["address"]),
            "" if name in names or not names else "not in the inventory"))
    return tuple(rows)


def _failed_start(name: str, path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines(keepends=True)[-lines:]
    return (f"--- rpicluster up could not start {name} at {_when(path.stat().st_mtime)}; "
            "what it printed:\n" + "".join(text))


def logs(host: str, inventory: str | Path | None = None, *, lines: int = 100,
         ssh_timeout: float | None = None) -> str:
    """The last ``lines`` lines of the log of the worker on ``host`` (or ``"scheduler"``).

    When the last ``up`` could not start it, the output of that failed start instead (kept on
    this machine: the host may have no log at all).
    """
    try:
        state = load_state(inventory)
    except ConfigError:
        # A failed up that stopped everything again keeps only what its starts printed.
        failed = _start_output(recorded_id(inventory), host)
        if not failed.exists():
            raise
        return _failed_start(host, failed, lines)
    ssh_timeout = config.SSH_TIMEOUT if ssh_timeout is None else ssh_timeout
    if host == "scheduler" or (state.scheduler and host == state.scheduler["node"]["host"]
                               and host not in state.workers):
        name, entry = "scheduler", state.scheduler
        local = entry is not None and entry["local"]
    else:
        name, entry, local = host, state.workers.get(host), False
    failed = _start_output(state.cid, name)
    if failed.exists():
        return _failed_start(name, failed, lines)
    if entry is None:
        raise ConfigError(f"{state.inventory}: nothing recorded on host {host!r} (recorded: "
                          f"scheduler, {', '.join(state.workers) or 'no workers'})")
    with _connect(node_from_json(entry["node"]), local, False, ssh_timeout) as conn:
        return conn.tail(entry["log"], lines)


__all__ = ["up", "down", "status", "logs", "Report", "HostRow", "StatusRow"]
