"""Search spaces: which parameters a tune samples, from what, and checks that they can work.

A space maps an estimator parameter to one of::

    {"choice": [v1, v2, ...]}          one of the values (a bare list means the same)
    {"uniform": [low, high]}           a float in [low, high)
    {"loguniform": [low, high]}        a float whose log is uniform (0 < low < high)
    {"randint": [low, high]}           an int in [low, high] (both ends included)
    value                              fixed

The same mapping is read from a TOML or JSON file (``--space FILE``)::

    [alpha]
    loguniform = [1e-6, 1e-2]
    [n_clusters]
    choice = [10, 20, 50]

Every name must be a parameter of the estimator, and every value the space can produce (each
choice, both ends of a range) must pass the estimator's own parameter validation; otherwise one
:class:`~rpicluster.errors.ConfigError` names the file, the parameter and the value.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from rpicluster.errors import ConfigError

MODELS = ("ksgd", "mlp", "sgd")
KINDS = ("choice", "uniform", "loguniform", "randint")

#: The default space of each model: the parameters that matter most, over ranges that make
#: sense for standardised or [0, 1] features (what ``rpicluster ingest`` stores).
DEFAULT_SPACES = {
    # max_iter is the SGD epochs of every cluster's model; eta0 counts with learning_rate
    # "invscaling"/"constant" only, so the space draws the schedule too.
    "ksgd": {"n_clusters": {"choice": [5, 10, 20, 40]},
             "alpha": {"loguniform": [1e-6, 1e-2]},
             "learning_rate": {"choice": ["optimal", "invscaling"]},
             "eta0": {"loguniform": [1e-3, 1e-1]},
             "max_iter": {"choice": [3, 5, 10, 20]},
             "vote": {"choice": ["majority", "soft"]}},
    "mlp": {"hidden_layer_sizes": {"choice": [[64], [128], [256], [256, 128]]},
            "alpha": {"loguniform": [1e-6, 1e-2]},
            "learning_rate_init": {"loguniform": [3e-4, 3e-3]},
            "batch_size": {"choice": [64, 128, 256]}},
    "sgd": {"loss": {"choice": ["hinge", "log_loss", "modified_huber"]},
            "alpha": {"loguniform": [1e-7, 1e-2]},
            "penalty": {"choice": ["l2", "l1", "elasticnet"]},
            "average": {"choice": [False, True]}},
}


def estimator_class(model: str):
    """The scikit-learn class a tune of ``model`` trains."""
    if model == "ksgd":
        from rpicluster.models.incremental import IncrementalKSGDClassifier

        return IncrementalKSGDClassifier
    if model == "mlp":
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier
    if model == "sgd":
        from sklearn.linear_model import SGDClassifier

        return SGDClassifier
    raise ConfigError(f"unknown model {model!r} (models tune searches: {', '.join(MODELS)})")


#: Parameters a tune sets itself: a space may not name them.
_RESERVED = {"random_state", "block_rows", "warm_start", "early_stopping", "max_iter_no_change"}


def load_space(path: str | os.PathLike) -> dict:
    """A space from a ``.toml`` or ``.json`` file (not yet checked against a model)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read search space {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            space = tomllib.loads(text)
        elif path.suffix == ".json":
            space = json.loads(text)
        else:
            raise ConfigError(f"search space {path}: unknown file type {path.suffix!r} "
                              "(known: .toml, .json)")
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"search space {path} is not valid {path.suffix[1:].upper()}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(space, dict):
        raise ConfigError(f"search space {path}: expected a table of parameters")
    return space


def check_space(model: str, space: dict | None, *, where: str = "search space") -> dict:
    """``space`` (None: the model's default) in normal form ``{name: (kind, values)}``.

    Raises
    ------
    ConfigError
        A parameter the estimator does not have, one the tune sets itself, an unknown
        distribution, a bad range, or a value the estimator refuses; named with ``where``.
    """
    cls = estimator_class(model)
    space = DEFAULT_SPACES[model] if space is None else space
    if not space:
        raise ConfigError(f"{where} is empty: name at least one parameter of {cls.__name__}")
    known = cls().get_params()
    out = {}
    for name, spec in space.items():
        if name in _RESERVED:
            raise ConfigError(f"{where}: {name} is set by tune itself; remove it from the space")
        if name not in known:
            close = [k for k in known if k.startswith(name[:3])]
            raise ConfigError(f"{where}: {cls.__name__} has no parameter {name!r} (known: "
                              f"{', '.join(sorted(known))}{'; did you mean ' + close[0] + '?' if close else ''})")
        kind, values = _normal(name, spec, where)
        for value in _extremes(kind, values):
            _check_value(cls, model, name, value, where)
        out[name] = (kind, values)
    return out


def _normal(name: str, spec, where: str) -> tuple[str, list]:
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict):
        return "choice", [spec]
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: {name} = {spec!r}: expected one of {', '.join(KINDS)} "
                          "(e.g. {loguniform = [1e-6, 1e-2]}), a list of values, or a value")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {name}.{kind} must be a non-empty list, got {values!r}")
    if kind != "choice":
        if (len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                    for v in values) or not values[0] < values[1]):
            raise ConfigError(f"{where}: {name}.{kind} must be [low, high] numbers with low < "
                              f"high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}: {name}.loguniform needs low > 0, got {values!r}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise ConfigError(f"{where}: {name}.randint needs integer bounds, got {values!r}")
    return kind, values


def _extremes(kind: str, values: list) -> list:
    return values if kind == "choice" else [values[0], values[1]]


def _check_value(cls, model: str, name: str, value, where: str) -> None:
    from rpicluster.models.incremental import check_incremental_params

    est = cls(**{name: _to_param(name, value)})
    try:
        if model == "ksgd":
            check_incremental_params(est.get_params())
        else:
            est._validate_params()  # scikit-learn's own check of its parameter constraints
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {name} = {value!r} is impossible for {cls.__name__} "
                          f"({str(exc).splitlines()[0]})") from None


def _to_param(name: str, value):
    """TOML/JSON have no tuples: a list of layer sizes becomes the tuple scikit-learn takes."""
    if name == "hidden_layer_sizes" and isinstance(value, list):
        return tuple(value)
    return value


def sample(space: dict, n: int, seed: int) -> list[dict]:
    """``n`` parameter sets drawn from a checked ``space`` (seeded; the same on every run).

    Distinct sets are preferred: draws repeat only when the space holds fewer than ``n``.
    """
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(n * 20):
        params = {name: _draw(rng, kind, values) for name, (kind, values) in space.items()}
        key = json.dumps(params, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(params)
            if len(out) == n:
                return out
    return [out[i % len(out)] for i in range(n)]  # a small discrete space: its sets repeat


def _draw(rng, kind: str, values: list):
    if kind == "choice":
        return values[int(rng.integers(len(values)))]
    low, high = values
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high + 1))


def to_params(params: dict) -> dict:
    """A sampled set as estimator keyword arguments (JSON lists back to tuples)."""
    return {k: _to_param(k, v) for k, v in params.items()}
