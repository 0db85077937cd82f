"""``rpicluster trust MODEL``: vouch for a model file written elsewhere (sign it with this key)."""

from __future__ import annotations

import click


@click.command("trust")
@click.argument("model_path", type=click.Path(dir_okay=False, exists=True))
def trust_cmd(model_path):
    """Trust MODEL: sign it with this user's model key so score/predict load it.

    rpicluster signs every model file it writes (MODEL.sig, key ~/.rpicluster/model.key) and
    refuses one it did not sign here: copied from another machine, or changed since. Run this
    only for a file you know came from rpicluster; its size limits and types are still checked.
    """
    from rpicluster.train.modelfile import trust_model

    digest = trust_model(model_path)
    click.echo(f"trusted {model_path} (sha256 {digest[:16]}...): signed with this user's key")
