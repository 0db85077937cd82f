"""Serve a store read-only over HTTP, so workers read chunks from the desktop without NFS.

Only the store's own files are served: the ``zarr.json`` metadata of the group and of its arrays
``X`` and ``y``, and their chunk files (``X/c/<block>/0``, ``y/c/<block>``); anything else
placed in the folder (``.env``, notes, keys, another store's ``zarr.json`` or chunks) is 404.
GET and HEAD only (anything else is answered 405), byte ranges, no directory listings, no
symlinks followed, and paths resolved inside the store (``..`` cannot escape it). The default
address is loopback; ``--host 0.0.0.0`` serves the Pis on the LAN. Workers then open
``http://HOST:PORT`` with :func:`~rpicluster.data.reader.open_dataset`.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import threading
from collections.abc import Callable

from rpicluster import config
from rpicluster.errors import DataError


# A store's files, and no others: the group's and its two arrays' metadata, and the chunk keys
# of X (row block / 0) and y (row block); a zarr.json or c/N placed anywhere else is not served.
_STORE_FILE = re.compile(r"\A(?:zarr\.json|X/zarr\.json|y/zarr\.json|X/c/[0-9]+/[0-9]+"
                         r"|y/c/[0-9]+)\Z")


def make_app(root: str | os.PathLike):
    """The aiohttp application serving the store files under ``root`` read-only."""
    from aiohttp import web

    root = os.path.realpath(os.fspath(root))

    async def handle(request):
        rel = request.match_info["path"]
        path = os.path.join(root, *rel.split("/"))
        # The pattern admits no "..", no hidden names; realpath then refuses any symlink.
        if (not _STORE_FILE.match(rel) or os.path.realpath(path) != path
                or not os.path.isfile(path)):
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/{path:.*}", handle)  # and HEAD; other methods get 405
    return app


class StoreServer:
    """A read-only HTTP server for one store, running in a background thread.

    Use as a context manager (``with StoreServer(path, port=0) as server: server.url``) or
    :meth:`start` / :meth:`stop`. ``port=0`` picks a free port.

    Raises
    ------
    DataError
        On start, when ``root`` is not a complete rpicluster store.
    """

    def __init__(self, root: str | os.PathLike, host: str = config.SERVE_HOST,
                 port: int = config.SERVE_PORT):
        self.root = os.path.abspath(os.fspath(root))
        self.host, self.port = host, port
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None

    def start(self) -> str:
        """Start serving; returns the URL (with the port actually bound)."""
        from rpicluster.data.reader import open_dataset

        # Serving a store workers would refuse only moves the error to every worker.
        open_dataset(self.root)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def setup():
            from aiohttp import web

            runner = web.AppRunner(make_app(self.root), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
            return runner

        def run():
            asyncio.set_event_loop(loop)
            try:
                self._runner = loop.run_until_complete(setup())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="rpicluster-serve", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise DataError(f"cannot serve {self.root} on {self.host}:{self.port}: "
                            f"{failure[0]}") from failure[0]
        host, port = self._runner.addresses[0][:2]
        self.port = port
        # Bound to every interface: name this machine the way the workers on the LAN will.
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        self.url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}"
        return self.url

    def stop(self) -> None:
        """Stop serving and wait for the server thread to finish."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "StoreServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(root: str | os.PathLike, host: str = config.SERVE_HOST, port: int = config.SERVE_PORT,
          *, on_ready: Callable[[str], None] = print, stop: threading.Event | None = None) -> None:
    """Serve ``root`` read-only until interrupted (Ctrl-C) or ``stop`` is set.

    Parameters
    ----------
    root : path
        A complete rpicluster store.
    host, port : str, int
        Address to bind (default loopback, this machine only; ``0.0.0.0``: every interface, so
        Pis on the LAN can read; port 0 picks a free one).
    on_ready : callable
        Called with the URL once the server listens.
    stop : threading.Event, optional
        Set it to stop serving.
    """
    server = StoreServer(root, host, port)
    on_ready(server.start())
    try:
        (stop or threading.Event()).wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
