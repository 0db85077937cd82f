"""Data commands: ``ingest`` a source into a store, ``serve`` a store over HTTP, extract
``features`` of an image store on the cluster."""

from __future__ import annotations

import sys

import click

from rpicluster import config
from rpicluster.cli._common import (cluster_choice, cluster_options, command_line, echo_table,
                                    exit_interrupted, quiet_dask_logs)
from rpicluster.errors import TrainingStopped


@click.command()
@click.argument("source")
@click.argument("out", metavar="OUT.zarr", type=click.Path())
@click.option("--block-rows", type=click.IntRange(min=1), default=config.BLOCK_ROWS,
              show_default=True, metavar="N", help="Rows per training block (one Zarr chunk row).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="Labels .npy for a .npy features file.")
@click.option("--label-column", metavar="NAME",
              help="CSV label column (default: label, y or target, else the last column).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the row shuffle and of the test split.")
@click.option("--no-shuffle", is_flag=True,
              help="Keep the source's row order (blocks of sorted data hold few classes).")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              metavar="F", help="Hold out this fraction of each class (stratified) ...")
@click.option("--test-out", metavar="TEST.zarr", type=click.Path(),
              help="... into this store (same classes list as OUT.zarr).")
@click.option("--image-size", type=click.IntRange(min=1), metavar="PX",
              help="images:DIR: side of the square uint8 images stored (default 64).")
@click.option("--image-mode", type=click.Choice(["RGB", "L"]),
              help="images:DIR: colour (RGB, default) or grayscale (L).")
@click.option("--bad-images", type=click.Choice(["skip", "error"]),
              help="images:DIR: skip unreadable files with a warning (default) or refuse.")
@click.option("--resume", is_flag=True, help="Continue an interrupted ingest of the same source.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUT.zarr.")
def ingest(source, out, block_rows, labels, label_column, seed, no_shuffle, test_fraction,
           test_out, image_size, image_mode, bad_images, resume, overwrite) -> None:
    """Write SOURCE into the Zarr store OUT.zarr, block by block, rows shuffled.

    SOURCE is a file (data.npz with X and y; features.npy with --labels; data.csv; svmlight
    .svm/.svmlight/.libsvm), sklearn:digits (iris, wine, breast_cancer), idx:IMAGES,LABELS
    (MNIST-format files), fashion-mnist[:train|:test] (apt-get install dataset-fashion-mnist),
    images:DIR (one subfolder per class; stored as uint8), or
    synthetic:rows=..,features=..,classes=..,seed=..
    """
    import time
    import warnings

    from rpicluster.data.reader import class_spread_text, open_dataset
    from rpicluster.data.writer import ingest as ingest_store
    from rpicluster.progress import Progress

    if (test_fraction is None) != (test_out is None):
        raise click.UsageError("--test-fraction and --test-out go together")
    options = {k: v for k, v in (("image_size", image_size), ("image_mode", image_mode),
                                 ("bad_images", bad_images)) if v is not None}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            ds = ingest_store(source, out, block_rows=block_rows, labels=labels,
                              label_column=label_column, shuffle=not no_shuffle, seed=seed,
                              test_fraction=test_fraction, test_out=test_out,
                              source_options=options, resume=resume, overwrite=overwrite,
                              progress=Progress("ingest", unit="blocks"))
        except KeyboardInterrupt:
            exit_interrupted(["ingest", source, out],
                             (("--block-rows", block_rows), ("--labels", labels),
                              ("--label-column", label_column), ("--seed", seed),
                              ("--no-shuffle", no_shuffle), ("--test-fraction", test_fraction),
                              ("--test-out", test_out), ("--image-size", image_size),
                              ("--image-mode", image_mode), ("--bad-images", bad_images)),
                             [out] + ([test_out] if test_out else []))
        finally:
            for w in caught:
                click.echo(f"warning: {w.message}", err=True)
    seconds = f", {time.perf_counter() - t0:.1f} s"
    for what, store in [("ingested", ds)] + ([("held out", open_dataset(test_out))]
                                             if test_out else []):
        click.echo(f"{what} {store.url}: {store.n_rows} rows, {store.n_features} features, "
                   f"{len(store.classes)} classes, {store.n_blocks} blocks, {store.nbytes} bytes"
                   f"{seconds}")
        seconds = ""
        spread = class_spread_text(store)
        if spread:
            click.echo(f"  {spread}")


@click.command()
@click.argument("store", metavar="DATA.zarr", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default=config.SERVE_HOST, show_default=True,
              help="Address to bind (default: this machine only; 0.0.0.0: every interface, "
                   "so the Pis can read).")
@click.option("--port", type=click.IntRange(0, 65535), default=config.SERVE_PORT,
              show_default=True, help="Port (0 picks a free one).")
def serve(store, host, port) -> None:
    """Serve DATA.zarr read-only over HTTP; workers open http://THIS-HOST:PORT."""
    from rpicluster.data.serve import serve as serve_store

    local = host in ("127.0.0.1", "localhost", "::1")
    serve_store(store, host, port, on_ready=lambda url: click.echo(
        f"serving {store} read-only at {url} (Ctrl-C stops)"
        + ("; only this machine can read it: --host 0.0.0.0 serves the LAN" if local else "")))


@click.command("features")
@click.argument("images", metavar="IMAGES.zarr")
@click.option("-o", "--output", "out", required=True, metavar="FEATURES.zarr",
              help="Feature store to write (a path or URL every worker can write).")
@click.option("--model", default="efficientnet-lite0", show_default=True,
              metavar="efficientnet-lite0|FILE.onnx", help="Frozen network to run.")
@click.option("--input-size", type=click.IntRange(min=8), metavar="N",
              help="Network input side in pixels (default 224, or the model's fixed size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per ONNX Runtime call on a worker (bounds its memory).")
@click.option("--threads", type=click.IntRange(min=1), metavar="T",
              help="ONNX Runtime threads per worker (default: the worker's threads).")
@click.option("--block-rows", type=click.IntRange(min=1), metavar="N",
              help="Rows per feature block: a multiple of the image store's (its own by default).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into FEATURES.zarr.")
@click.option("--overwrite", is_flag=True, help="Replace an existing FEATURES.zarr.")
@cluster_options
def features_cmd(images, out, model, input_size, batch_size, threads, block_rows, resume,
                 overwrite, scheduler, inventory, local):
    """Extract frozen-network features of the image store IMAGES.zarr on the cluster."""
    from rpicluster.features.job import extract_features
    from rpicluster.progress import Progress

    quiet_dask_logs()
    try:
        with Progress("features", unit="blocks") as progress:
            r = extract_features(images, out, model=model, input_size=input_size,
                                 batch_size=batch_size, threads=threads, block_rows=block_rows,
                                 resume=resume, overwrite=overwrite,
                                 cluster=cluster_choice(scheduler, inventory, local),
                                 progress=progress)
            total = progress.elapsed  # the time its last line shows
    except (KeyboardInterrupt, TrainingStopped) as exc:
        options = (("--model", model), ("--input-size", input_size), ("--batch-size", batch_size),
                   ("--threads", threads), ("--block-rows", block_rows),
                   ("--scheduler", scheduler), ("-c", inventory), ("--local", local))
        if isinstance(exc, KeyboardInterrupt):
            exit_interrupted(["features", images, "-o", out], options, [out])
        # Workers restarted or stayed paused: the blocks kept and the command that resumes.
        again = command_line(["features", images, "-o", out], (*options, ("--resume", True)))
        click.echo(f"error: {exc}; continue with: {again}", err=True)
        sys.exit(1)
    ds = r.store
    # One total, the progress line's; the job's own time is the part spent writing features
    # (the rest reached the cluster and prepared the network).
    click.echo(f"extracted {len(r.extracted_blocks)} blocks"
               + (f" (+{len(r.resumed_blocks)} resumed)" if r.resumed_blocks else "")
               + f" in {total:.1f} s ({r.seconds:.1f} s of it extracting): {ds.n_rows} images "
               f"-> {ds.n_features} features ({r.model} at {r.input_size} px, sha256 "
               f"{r.sha256[:12]})")
    rates = r.images_per_second()
    echo_table("images per worker", ["worker", "images", "busy s", "images/s"],
               [[w, n, f"{r.busy_seconds_per_worker[w]:.1f}", f"{rates.get(w, 0):,.1f}"]
                for w, n in sorted(r.images_per_worker.items())])
    click.echo(f"features: {ds.url}")
