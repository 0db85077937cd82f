"""``rpicluster export``: a model file as one ONNX file for the edge runner."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write.")
@click.option("--features", "features", default=None, metavar="efficientnet-lite0|FILE.onnx",
              help="The network the model's features came from: the file then takes photos "
                   "(uint8 crops; the runner resizes them).")
@click.option("--input-size", type=int, default=None,
              help="The --input-size the features were extracted at (default: the network's).")
@click.option("--image-size", type=int, default=None,
              help="The `ingest images: --image-size` of the training photos: the runner fits "
                   "photos to it first, as ingest did.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Quantize the network (static, calibrated on --calibration).")
@click.option("--calibration", default=None, metavar="IMAGES.zarr",
              help="Image store whose first images calibrate --quantize.")
@click.option("--calibration-images", type=int, default=None,
              help="How many images calibrate --quantize (default 200).")
def export_cmd(model, output, features, input_size, image_size, quantize, calibration,
               calibration_images):
    """Write MODEL (from train or federate) as one ONNX file: rows or photos in, label out.

    Run it anywhere with only onnxruntime, numpy and Pillow:
    python -m rpicluster.edge OUTPUT IMAGES...|DIR
    """
    from rpicluster.export import export_onnx

    r = export_onnx(model, output, features, quantize, input_size=input_size,
                    image_size=image_size, calibration=calibration,
                    calibration_images=calibration_images)
    shape = ", ".join(map(str, r.input_shape))
    click.echo(f"wrote {r.path} ({r.size_bytes / 1e6:.1f} MB): {r.model}, input {r.input} "
               f"({shape}){', int8 network' if r.quantize else ''}")
    if r.input == "images":
        click.echo(f"run it: python -m rpicluster.edge {r.path} IMAGES...|DIR")
