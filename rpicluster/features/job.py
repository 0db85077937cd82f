"""The feature-extraction job: a frozen network mapped over the blocks of an image store.

The client resolves the model (:func:`rpicluster.features.model.load_network`), runs it once on a
blank image (a wrong input shape fails here, before any work is sent), creates the feature store
(the layout contract of :mod:`rpicluster.data.layout`, marked incomplete) and ships the model's
bytes to every worker once. Each task then reads one block of images from the image store,
extracts its features and writes them and the block's labels as chunk ``i`` of the feature
store: images and features never pass through the client. The client records each finished
block in the store's ``blocks_done`` attribute; a resumed run skips those, and ``complete`` is
set last, after every block.

One block at a time per worker process, with ONNX Runtime using the worker's threads: a Pi 4
worker (4 threads) holds one session, one block of images and one batch of activations, instead
of four of each (see README "Frozen networks" for memory per model).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import uuid
from collections import Counter

import numpy as np

from rpicluster import events as ev
from rpicluster.errors import ConfigError, TrainingError, TrainingStopped
from rpicluster.features.images import open_images
from rpicluster.features.model import Extractor, FrozenModel, load_network, release_sessions
from rpicluster.progress import Progress
from rpicluster.train.failures import raise_task_error
from rpicluster.train.tasks import TaskReport
from rpicluster.train.watch import ClusterWatch

#: Images per ONNX Runtime call: EfficientNet-Lite0 at 224 px peaks near 0.5 GB at 32 (see
#: README), inside a 4 GB Pi 4 with room for the block and the worker.
BATCH_SIZE = 32

_WORKER_LOCK = threading.Lock()


@dataclasses.dataclass
class FeaturesResult:
    """What an extraction run did.

    Attributes
    ----------
    store : Dataset
        The feature store, opened.
    model, sha256 : str
        The model's name and the sha256 of its ONNX graph.
    input_size : int
    seconds : float
        Wall time of the call.
    extracted_blocks, resumed_blocks : list of int
    images_per_worker, busy_seconds_per_worker : Counter
        Images extracted and task seconds, by worker name.
    """

    store: object
    model: str
    sha256: str
    input_size: int
    seconds: float
    extracted_blocks: list
    resumed_blocks: list
    images_per_worker: Counter
    busy_seconds_per_worker: Counter

    def images_per_second(self) -> dict:
        """Per-worker throughput over the time each worker spent in its tasks."""
        return {w: self.images_per_worker[w] / s
                for w, s in sorted(self.busy_seconds_per_worker.items()) if s > 0}


@dataclasses.dataclass
class ExtractedBlock(TaskReport):
    """An extraction task's report: feature block ``block`` is written (``rows`` images) and
    ``crc`` holds the checksums of its two chunks (``{"X": ..., "y": ...}``), which the client
    records with the block."""

    block: int
    crc: dict


def extract_task(model: FrozenModel, images, out_url: str, out_options, block: int,
                 block_rows: int, input_size: int, batch_size: int,
                 threads: int | None) -> ExtractedBlock:
    """Extract the features of feature block ``block`` (``block_rows`` rows, one or more image
    blocks read one at a time) and write it as one chunk of the feature store (on a worker)."""
    from rpicluster.data.writer import StoreWriter
    from rpicluster.train.tasks import worker_address, worker_name

    with _WORKER_LOCK:
        t0 = time.perf_counter()
        extractor = Extractor(model, input_size=input_size, batch_size=batch_size,
                              threads=threads or _worker_threads())
        per = block_rows // images.block_rows
        ys = []

        def batches():
            # Advanced on the extractor's prefetch thread: the next batch is read and resized
            # while the network runs. One image block is held at a time (each batch is
            # preprocessed before the next is drawn, so nothing else refers to the block).
            for b in range(block * per, min((block + 1) * per, images.n_blocks)):
                imgs, y = images.block(b)
                ys.append(y)
                for lo in range(0, len(imgs), batch_size):
                    yield imgs[lo:lo + batch_size]
                del imgs

        X = extractor.transform_batches(batches()).astype(np.float32, copy=False)
        y = np.concatenate(ys)
        crc = StoreWriter.reopen(out_url, out_options).write_block(block, X, y)
        del extractor
        if _memory_pressure():
            release_sessions()
        return ExtractedBlock(rows=int(len(y)), worker=worker_name(), address=worker_address(),
                              seconds=time.perf_counter() - t0, block=block, crc=crc)


def _memory_pressure() -> bool:
    """Whether this worker's process memory is above Dask's target fraction of its limit (where
    it starts spilling): time to drop cached sessions before it pauses or is restarted."""
    try:
        import dask
        from distributed import get_worker

        worker = get_worker()
        limit = worker.memory_manager.memory_limit
        target = dask.config.get("distributed.worker.memory.target") or 0.6
        return bool(limit) and worker.monitor.get_process_memory() > target * limit
    except (ValueError, AttributeError):
        return False


def release_worker_sessions(dask_worker=None) -> int:
    """``client.run`` target: drop the worker's cached ONNX Runtime sessions (see
    :func:`rpicluster.features.model.release_sessions`)."""
    return release_sessions()


def _model_value(model: FrozenModel) -> FrozenModel:
    return model


def _worker_threads() -> int:
    """The cores this worker may use: its Dask thread count, else the machine's cores."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ValueError, AttributeError):
        return os.cpu_count() or 1


def extract_features(images: str, out: str, *, model: str = "efficientnet-lite0",
                     input_size: int | None = None, batch_size: int = BATCH_SIZE,
                     threads: int | None = None, block_rows: int | None = None,
                     resume: bool = False, overwrite: bool = False, client=None,
                     cluster=None, storage_options: dict | None = None,
                     cache: str | os.PathLike | None = None,
                     progress: Progress | None = None) -> FeaturesResult:
    """Run a frozen network over every image of ``images`` on the cluster; write ``out``.

    Parameters
    ----------
    images : str
        An image store (``rpicluster ingest images:DIR`` / ``idx:`` / ``fashion-mnist``): a
        path or URL every worker can read.
    out : str
        The feature store to write (a path or URL every worker can write): float32
        ``(n_rows, d)``, one block per chunk like ``images``, labels and classes carried over.
    model : str
        ``"efficientnet-lite0"`` (1,280 features) or a path to an ``.onnx`` file.
    input_size : int, optional
        Side of the square network input (default 224, or the graph's fixed size). Smaller
        images are upscaled; 64-96 suits 28x28 images.
    batch_size : int
        Images per ONNX Runtime call on a worker.
    threads : int, optional
        ONNX Runtime threads per worker (default: the worker's Dask threads).
    block_rows : int, optional
        Rows per block of the feature store: the image store's (default) or a multiple of it.
        Small image blocks bound a worker's memory (it holds one image block at a time) and
        spread the work; training wants bigger feature blocks.
    resume, overwrite : bool
        Continue an interrupted run into ``out`` (finished blocks are skipped), or replace an
        existing store.
    client : distributed.Client, optional
        The cluster to run on; default: ``cluster``'s.
    cluster : rpicluster.train.api.ClusterChoice, optional
        Which cluster, as for ``rpicluster train`` (default: the recorded cluster, else an
        embedded one for this call).
    storage_options : dict, optional
        fsspec options for both stores.
    cache : path, optional
        Folder for the built EfficientNet-Lite0 graph.
    progress : Progress, optional

    Returns
    -------
    FeaturesResult

    Raises
    ------
    ModelError
        Unreadable model or one that does not take these images.
    DataError
        ``images`` is not an image store, or ``out`` exists (without resume/overwrite) or holds
        another run.
    TrainingError
        A task failed on a worker (naming the block).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    frozen = load_network(model, cache=cache)
    size = frozen.size(input_size)
    source = open_images(images, storage_options)
    block_rows = source.block_rows if block_rows is None else int(block_rows)
    if block_rows < 1 or block_rows % source.block_rows:
        raise ConfigError(f"block rows {block_rows} must be a multiple of the image store's "
                          f"block rows ({source.block_rows}): each feature block is made of "
                          "whole image blocks")
    # One blank image through the network on the client: a model that cannot take these images
    # fails here with its shapes, not on every worker.
    probe = Extractor(frozen, input_size=size, batch_size=1, threads=1)
    n_features = probe.transform(np.zeros((1, *source.image_shape), np.uint8)).shape[1]
    run = dict(batch_size=batch_size, threads=threads, resume=resume, overwrite=overwrite,
               storage_options=storage_options, progress=progress or Progress.null())
    from rpicluster import history
    from rpicluster.train.checks import fingerprint

    with history.recording("features", data=str(source.url), fingerprint=fingerprint(source),
                           params={"model": frozen.name, "model_sha256": frozen.sha256,
                                   "input_size": size, "batch_size": batch_size,
                                   "threads": threads, "block_rows": block_rows, "out": out,
                                   "resume": resume, "overwrite": overwrite}) as record:
        if client is not None:
            return _run_recorded(record, source, frozen, size, n_features, block_rows, out,
                                 client, **run)
        from rpicluster.train.api import ClusterChoice

        with (cluster or ClusterChoice()).client() as c:
            return _run_recorded(record, source, frozen, size, n_features, block_rows, out, c,
                                 **run)


def _run_recorded(record, *args, **run) -> FeaturesResult:
    """:func:`_run`, recording its cluster, workers and figures in the run history."""
    record.connected(args[-1])
    result = _run(*args, **run)
    images = sum(result.images_per_worker.values())
    record.result(phases={"extract": result.seconds}, model_path=result.store.url,
                  blocks=len(result.extracted_blocks), resumed=len(result.resumed_blocks),
                  images=images, n_features=result.store.n_features,
                  images_per_second=images / result.seconds if result.seconds > 0 else None)
    return result


def _layout(source, frozen: FrozenModel, size: int, n_features: int, block_rows: int) -> dict:
    from rpicluster.data.layout import FORMAT_KEY, FORMAT_VERSION

    return {
        FORMAT_KEY: FORMAT_VERSION,
        "classes": source.attrs["classes"],
        "n_rows": source.n_rows,
        "n_features": int(n_features),
        "block_rows": block_rows,
        "n_blocks": math.ceil(source.n_rows / block_rows),
        "source": f"features:{os.path.basename(frozen.name)}@{frozen.sha256[:12]}"
                  f",input={size}:{source.url}",
        "features_model": frozen.name,
        "features_model_sha256": frozen.sha256,
        "features_input_size": size,
    }


def _prepare(url: str, layout: dict, *, resume: bool, overwrite: bool, storage_options):
    """Create the feature store, or reopen one to resume; the blocks already done."""
    from rpicluster.data.layout import CHECKSUMS_KEY
    from rpicluster.data.writer import StoreWriter, check_output

    existing = check_output(url, layout, resume=resume, overwrite=overwrite,
                            storage_options=storage_options, writer="run")
    if existing is not None:
        return (set(existing.get("blocks_done", [])), existing.get("complete") is True,
                existing.get(CHECKSUMS_KEY))
    StoreWriter.create(url, {**layout, "blocks_done": []}, dtype=np.float32,
                       storage_options=storage_options)
    return set(), False, None


def _run(source, frozen, size, n_features, block_rows, out, client, *, batch_size, threads,
         resume, overwrite, storage_options, progress) -> FeaturesResult:
    from concurrent.futures import CancelledError

    from distributed import KilledWorker

    from rpicluster.data.layout import CHECKSUMS_KEY, normalize_url
    from rpicluster.data.reader import open_dataset
    from rpicluster.data.writer import StoreWriter

    t0 = time.perf_counter()
    url = normalize_url(out)
    if url == source.url:
        raise ConfigError(f"the feature store {url} would overwrite its own image store")
    layout = _layout(source, frozen, size, n_features, block_rows)
    n_blocks = layout["n_blocks"]
    done, complete, sums = _prepare(url, layout, resume=resume, overwrite=overwrite,
                                    storage_options=storage_options)
    # Blocks finish out of order: one slot per position, filled as each block is recorded.
    sums = {k: list((sums or {}).get(k) or [None] * n_blocks) for k in ("X", "y")}
    resumed = sorted(done)
    todo = [] if complete else [b for b in range(n_blocks) if b not in done]
    writer = StoreWriter.reopen(url, storage_options)
    run_id = uuid.uuid4().hex[:8]
    log = _logger(client, run_id)
    log(ev.RUN_START, n_blocks=n_blocks, resumed=len(resumed), rows=source.n_rows)
    images_done, busy = Counter(), Counter()
    # The model's bytes travel once, as a task's value: the tasks fetch it from whichever
    # worker holds it, and the scheduler computes it again when every worker restarted (a
    # scattered copy would be lost with them, and every task with it).
    remote_model = client.submit(_model_value, frozen, pure=False,
                                 key=f"rpicluster-features-model-{run_id}")
    futures = [client.submit(extract_task, remote_model, source, url, storage_options, b,
                             block_rows, size, batch_size, threads, priority=-b, pure=False,
                             key=f"rpicluster-features-{run_id}-{b}") for b in todo]
    index = {f.key: b for f, b in zip(futures, todo)}
    watch = ClusterWatch(client, progress)
    with progress:
        progress.total = n_blocks
        if resumed:
            progress.skip(len(resumed), note=f"{len(resumed)} blocks resumed")
        try:
            for future in _completed(futures, watch):
                b = index[future.key]
                if future.status == "error":
                    raise_task_error(future.exception(), b, None)
                r: ExtractedBlock = future.result()
                images_done[r.worker] += r.rows
                busy[r.worker] += r.seconds
                done.add(b)
                sums["X"][b], sums["y"][b] = r.crc["X"], r.crc["y"]
                # Recorded only after the worker wrote both chunks: resume skips this block.
                writer.record(blocks_done=sorted(done), blocks_written=len(done),
                              **{CHECKSUMS_KEY: sums})
                log(ev.EXTRACTED, block=b, rows=r.rows, worker=r.worker, seconds=r.seconds)
                rate = r.rows / r.seconds if r.seconds > 0 else math.inf
                progress.advance(note=f"block {b}: {r.rows} images, {rate:.0f} images/s "
                                      f"on {r.worker}")
        except (CancelledError, KilledWorker, _Stalled, OSError, TimeoutError) as exc:
            # Workers restarted (all at once: every task is forgotten), stayed paused for
            # memory, or the scheduler went away: the recorded blocks are kept for --resume.
            why = (str(exc) if isinstance(exc, _Stalled) else
                   f"the workers restarted or left ({type(exc).__name__})")
            stopped = TrainingStopped(f"the features run stopped: {why}; {url} keeps "
                                      f"{len(done)} of {n_blocks} blocks and is marked "
                                      "incomplete", run_dir=url)
            _stop(client, futures, log, stopped)
            raise stopped from None
        except BaseException as exc:
            _stop(client, futures, log, exc)
            raise
    writer.finish()
    log(ev.RUN_END, **ev.ending(None))
    _release(client)
    return FeaturesResult(store=open_dataset(url, storage_options), model=frozen.name,
                          sha256=frozen.sha256, input_size=size,
                          seconds=time.perf_counter() - t0, extracted_blocks=todo,
                          resumed_blocks=resumed, images_per_worker=images_done,
                          busy_seconds_per_worker=busy)


class _Stalled(TrainingError):
    """No worker, or every worker paused for memory, for too long (:class:`ClusterWatch`)."""


def _completed(futures, watch):
    """The futures as they finish; meanwhile ``watch`` looks at the workers about once a
    second (a run whose workers all stay paused for memory stops instead of waiting forever)."""
    from distributed import as_completed

    pending = as_completed(futures)
    while not pending.is_empty():
        batch = pending.next_batch(block=False)
        if not batch:
            try:
                watch.tick("extracting features")
            except TrainingError as exc:
                raise _Stalled(str(exc)) from None
            time.sleep(0.05)
        yield from batch


def _release(client) -> None:
    """Drop the cached sessions on every worker (best effort): the run is over, and a
    session with its weights would otherwise stay in each worker's memory (and in the memory
    floor the next run measures)."""
    try:
        client.run(release_worker_sessions)
    except Exception:  # noqa: BLE001 - a worker gone or refusing: nothing to release there
        pass


def _stop(client, futures, log, exc: BaseException) -> None:
    try:
        client.cancel(futures)
        log(ev.RUN_END, **ev.ending(exc))
    except Exception:  # noqa: BLE001 - the scheduler may be gone: nothing to cancel
        pass
    _release(client)


def _logger(client, run_id: str):
    def log(kind: str, **fields) -> None:
        ev.publish(client, ev.FEATURES_TOPIC, ev.make_event(kind, run_id=run_id, **fields))

    return log
