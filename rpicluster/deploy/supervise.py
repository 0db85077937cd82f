"""Keep one worker running until ``down``: ``python -m rpicluster.deploy.supervise --spec JSON``.

``up`` starts this (through :func:`rpicluster.deploy.remote.start`) for every worker instead of
``dask worker`` itself. It runs :func:`rpicluster.deploy.remote.command` of the start spec in its
own process group and starts it again whenever it exits: a worker whose scheduler went away (a
link cut past Dask's timeouts, a scheduler restart) closes its nanny for good, and the new one
waits for the scheduler to answer at the same address and joins by itself. Restarts back off,
``FIRST_DELAY`` doubling to ``MAX_DELAY``; a worker that ran at least ``MAX_DELAY`` seconds
starts over from ``FIRST_DELAY``.

``down`` stops the whole process group (:func:`rpicluster.deploy.remote.stop`); on SIGTERM,
SIGINT or SIGHUP the supervisor passes the signal on, waits for the worker and exits without
restarting it. Each change is written to ``<local_directory>/supervisor.json``
(:data:`rpicluster.deploy.remote.SUPERVISOR_FILE`) (pid, state
``running``/``waiting``/``stopped``, restarts, last exit time and status) for ``status``, and
one line to the worker's log.

Standard library only (a Pi starts it in well under a second), like :mod:`remote`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from rpicluster.deploy import remote

#: First wait before restarting an exited worker, in seconds; it doubles up to ``MAX_DELAY``.
FIRST_DELAY = 1.0
#: Longest wait between restarts (and how long a worker must run to reset the backoff).
MAX_DELAY = 60.0

class Supervisor:
    """Run ``argv`` again and again (with backoff) until a stop signal arrives."""

    def __init__(self, argv: list[str], directory: str, *, first_delay: float = FIRST_DELAY,
                 max_delay: float = MAX_DELAY) -> None:
        self.argv, self.directory = argv, directory
        self.first_delay, self.max_delay = first_delay, max_delay
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.info = {"pid": os.getpid(), "state": "running", "restarts": 0, "last_exit": None,
                     "last_status": None, "next_start": None}

    def _signal(self, signum, frame) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            try:
                self.child.send_signal(signum)
            except ProcessLookupError:
                pass

    def _write(self, **changes) -> None:
        self.info.update(changes)
        path = os.path.join(self.directory, remote.SUPERVISOR_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.info, f)
        os.replace(path + ".tmp", path)

    def _log(self, message: str) -> None:
        print(f"--- rpicluster supervise {time.strftime('%Y-%m-%d %H:%M:%S')} {message}",
              flush=True)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        delay = self.first_delay
        while not self.stopping:
            started = time.monotonic()
            self._write(state="running", next_start=None)
            self.child = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
            code = self.child.wait()
            if self.stopping:
                break
            ran = time.monotonic() - started
            if ran >= self.max_delay:
                delay = self.first_delay
            self._write(state="waiting", restarts=self.info["restarts"] + 1,
                        last_exit=time.time(), last_status=code, next_start=time.time() + delay)
            self._log(f"worker exited with status {code} after {ran:.0f} s; "
                      f"restarting in {delay:g} s")
            until = time.monotonic() + delay
            while not self.stopping and time.monotonic() < until:
                time.sleep(0.1)
            delay = min(delay * 2, self.max_delay)
        self._write(state="stopped", next_start=None)
        self._log("stopped")
        return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rpicluster.deploy.supervise")
    parser.add_argument("--spec", required=True, help="JSON start spec of a worker")
    spec = json.loads(parser.parse_args(argv).spec)
    directory = os.path.expanduser(spec["local_directory"])
    sys.exit(Supervisor(remote.command(spec), directory).run())


if __name__ == "__main__":
    main()
