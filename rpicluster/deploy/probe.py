"""Talking to a recorded scheduler without hanging: Dask's TCP timeout checked first
(:func:`check_dask_timeouts`), the handshake bounded (:func:`scheduler_client`), every question
bounded (:func:`ask`)."""

from __future__ import annotations

from rpicluster import config
from rpicluster.errors import ConfigError
from rpicluster.inventory import ClusterSpec

#: Dask's least TCP timeout in seconds: under it every connection a process accepts or makes
#: fails ("Timeout too low" in ``distributed.comm.tcp``), and a scheduler then never answers.
DASK_MIN_TCP_TIMEOUT = 11
_TCP_TIMEOUT_KEY = "distributed.comm.timeouts.tcp"


def _tcp_timeout_problem(value) -> str | None:
    """Why ``value`` (Dask's ``distributed.comm.timeouts.tcp``) cannot work, or None."""
    from dask.utils import parse_timedelta

    if value is None:
        return None
    try:
        seconds = parse_timedelta(value, default="seconds")
    except (TypeError, ValueError, KeyError):
        return f"{value!r} is not a duration (e.g. 30s)"
    if int(seconds) < DASK_MIN_TCP_TIMEOUT:
        return (f"{value!r} is under the {DASK_MIN_TCP_TIMEOUT} s Dask needs (every connection "
                "would fail with 'Timeout too low')")
    return None


def check_dask_timeouts(spec: ClusterSpec | None = None) -> None:
    """Refuse, in one line, a Dask TCP timeout under :data:`DASK_MIN_TCP_TIMEOUT` that this
    machine's Dask config sets (the client's) or that ``spec``'s env passes to its scheduler or
    workers (``DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP``)."""
    import dask

    places = [("this machine's Dask config", dask.config.get(_TCP_TIMEOUT_KEY, None))]
    if spec is not None:
        for where, env in [("the scheduler's env", spec.scheduler.node.env),
                           *((f"worker {w.name}'s env", w.env) for w in spec.workers)]:
            found = dask.config.collect_env(dict(env))
            places.append((f"{spec.path}: {where}",
                           dask.config.get(_TCP_TIMEOUT_KEY, None, config=found)))
    for where, value in places:
        problem = _tcp_timeout_problem(value)
        if problem:
            raise ConfigError(f"{where}: Dask TCP timeout ({_TCP_TIMEOUT_KEY}, "
                              f"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP) {problem}; raise it to "
                              f"{DASK_MIN_TCP_TIMEOUT} s or more, or unset it")


def handshake(address: str, security, timeout: float) -> None:
    """Raise OSError/TimeoutError unless the scheduler at ``address`` completes Dask's handshake
    within ``timeout`` seconds.

    distributed's ``connect`` waits for the handshake without a bound (``Client(timeout=...)``
    bounds only the TCP connect): a scheduler whose connection handler crashes accepts and never
    answers. So the handshake is tried first, in a thread with its own event loop.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect

    args = security.get_connection_args("client") if security is not None else {}

    async def shake():
        comm = await asyncio.wait_for(connect(address, timeout=timeout, **args), timeout)
        await comm.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, shake()).result()


def scheduler_client(address: str, security, timeout: float | None = None):
    """A client of a recorded scheduler, or OSError/TimeoutError when it does not answer within
    ``timeout`` (default ``config.PROBE_TIMEOUT``); ConfigError for a Dask TCP timeout that
    cannot work."""
    from distributed import Client

    timeout = config.PROBE_TIMEOUT if timeout is None else timeout
    check_dask_timeouts()
    handshake(address, security, timeout)
    return Client(address, security=security, set_as_default=False, timeout=timeout)


def ask(client, call, timeout: float | None = None):
    """``await call()`` on the client's event loop, at most ``timeout`` seconds (default
    ``config.PROBE_TIMEOUT``): TimeoutError when the scheduler does not reply in time."""
    timeout = config.PROBE_TIMEOUT if timeout is None else timeout
    return client.sync(call, callback_timeout=timeout)


def seen_workers(client) -> dict[str, dict]:
    """name -> worker info for every worker the scheduler lists (TimeoutError: no reply)."""
    info = ask(client, lambda: client.scheduler.identity(n_workers=-1))
    return {str(w["name"]): {**w, "address": a} for a, w in info["workers"].items()}
