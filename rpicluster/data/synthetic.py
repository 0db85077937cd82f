"""Seeded generator of ImageNet-like deep features (post-ReLU CNN embeddings).

Why this shape
--------------
Inc-kSGD wins over one global linear model only where k-means cells hold few classes and the
classes inside a cell are separated by directions that are *local* to that cell. An isotropic
Gaussian mixture does the opposite (measured: ~65 of 100 classes per cell, Inc-kSGD lost to full
SGD). Real CNN features (ResNet penultimate layer on ImageNet) are different: images of dogs sit
far from images of vehicles, breeds of dog are close to each other and often confused, one class
has several visual modes (a "crane" the bird in flight and standing), and the features are
non-negative because they come out of a ReLU, which switches whole groups of features off for a
region of input space. This generator reproduces that geometry:

1. A latent space made of two parts: super-class coordinates (``super_rank`` dimensions) and
   detail coordinates (``detail_rank`` dimensions) shared by every super-class, as low-level
   features (texture, colour, parts) are shared across WordNet branches. Deep features are
   low-rank plus noise.
2. ``superclasses`` super-class centres, far apart (distance ~ ``super_sep``): WordNet's top
   levels. k-means cells fall inside super-classes, so a cell holds few classes.
3. Each class belongs to one super-class (classes are dealt evenly over them) and has a centre in
   the detail space (spread ~ ``class_sep``); siblings sharing a super-class are only told apart
   by their detail coordinates, which is the fine-grained confusion.
4. Each class has ``modes`` sub-clusters (a "crane" the bird and the machine): mode centres sit
   ~ ``mode_sep`` from the class centre in the detail space. The first mode lives in the class's
   super-class; each further mode lives, with probability ``mode_jump``, in another (random)
   super-class. A row is its mode's centre plus latent noise (``spread``) in the detail space.
5. Features = ReLU(W z + ``bias`` + ``noise``), W a fixed random (features x latent) map, scaled
   so pre-activations have about unit spread.

Why a global linear model is clearly imperfect here while local ones are not: a class whose modes
sit in two super-classes is a union of two far-apart regions with other super-classes between
them (not linearly separable one-vs-rest), and detail coordinates mean different classes in
different super-classes. A k-means cell sees one region, so its local linear models do not have to
compromise.

Measured with the defaults (seed 1, 60,000 train x 512 features, 200 classes, 10,000 test rows):
``MiniBatchKMeans(10)`` cells hold ~38 of the 200 classes (90 % of a cell's rows in ~32),
``MiniBatchKMeans(20)`` cells ~21 (~17); one global ``SGDClassifier`` (hinge, 5 epochs) scores
0.809 while kSGD with one ``SGDClassifier`` per cell scores 0.826 (k=10) and 0.831 (k=20). On a
smaller set (40,000 x 256, 100 classes) the two tie (0.727 against 0.715-0.721). ``mode_jump=0``
gives purer cells but the global model ties there too; ``modes=4,mode_jump=1`` mixes too many
classes per cell and the local models lose.

Knobs (``make_imagenet_like(..., **knobs)``, ``SyntheticSpec``, or ``synthetic:key=value,...``)
-------------------------------------------------------------------------------------------
rows, features, classes, seed
    Shape and seed. Same seed and knobs give the same rows, bit for bit.
superclasses
    Number of super-classes (0 = ``max(1, classes // 10)``). More super-classes with the same
    classes means fewer classes per k-means cell.
modes, mode_jump
    Sub-clusters per class, and the probability that a mode beyond the first lives in another
    super-class. Together they set how non-linear (multi-modal) each class is, and how many
    classes share a cell.
super_rank, detail_rank
    Dimensions of the super-class and detail parts of the latent space. A small
    ``detail_rank`` crowds classes of different super-classes onto the same detail
    coordinates (harder for a global model); a small ``super_rank`` with many super-classes
    lets super-classes blur into each other (more classes per cell).
super_sep, class_sep, mode_sep
    Spread of super-class centres, of class centres in the detail space, and of mode centres
    around their class centre. Lower ``class_sep`` means more confusion between siblings and lower
    accuracy for every model; lower ``super_sep`` mixes super-classes in k-means cells (more
    classes per cell, the regime where Inc-kSGD loses).
spread
    Latent noise of a row around its mode centre: the main accuracy knob.
noise
    Independent per-feature noise (in units of the pre-activation spread).
bias
    Shift before the ReLU (same units); negative values give sparser features (``bias=0``
    zeros about half of them).

Streaming
---------
Rows are generated in fixed internal chunks of :data:`CHUNK_ROWS` rows; chunk ``j`` uses its own
random stream ``SeedSequence([seed, 1, j])`` and the class structure uses ``SeedSequence([seed,
0])``. :func:`iter_blocks` therefore yields exactly the rows of :func:`make_imagenet_like`
whatever ``block_rows`` is, so a resumed ingest equals a clean one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from rpicluster.errors import ConfigError

#: Rows per internal generation chunk. Part of the data's definition: changing it changes the
#: rows for a given seed.
CHUNK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """All knobs of the generator (see the module docstring for their effect)."""

    rows: int = 10_000
    features: int = 2048
    classes: int = 1000
    seed: int = 0
    superclasses: int = 0
    modes: int = 3
    mode_jump: float = 0.5
    super_rank: int = 8
    detail_rank: int = 16
    super_sep: float = 6.0
    class_sep: float = 1.0
    mode_sep: float = 0.6
    spread: float = 0.5
    noise: float = 0.5
    bias: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rows", "features", "classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthetic: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("superclasses", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"synthetic: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("modes", "super_rank", "detail_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"synthetic: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.mode_jump <= 1:
            raise ConfigError(f"synthetic: mode_jump must be in [0, 1], got {self.mode_jump}")
        for name in ("super_sep", "class_sep", "mode_sep", "spread", "noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"synthetic: {name} must be >= 0, got {getattr(self, name)}")

    @property
    def n_superclasses(self) -> int:
        """Effective number of super-classes (resolves ``superclasses=0``)."""
        s = self.superclasses or max(1, self.classes // 10)
        return min(s, self.classes)

    @classmethod
    def from_string(cls, text: str) -> "SyntheticSpec":
        """Parse ``"rows=1000,features=64,classes=10,seed=3"`` (any knob, any order).

        Raises
        ------
        ConfigError
            For an unknown key (naming it and the known keys), a missing ``=``, or a value of
            the wrong type.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"synthetic: expected key=value, got {item!r}")
            if key not in fields:
                raise ConfigError(
                    f"synthetic: unknown key {key!r} (known keys: {', '.join(fields)})")
            kind = int if fields[key].type in ("int", int) else float
            try:
                values[key] = kind(raw.strip().replace("_", ""))
            except ValueError:
                raise ConfigError(
                    f"synthetic: {key} must be {'an integer' if kind is int else 'a number'}, "
                    f"got {raw.strip()!r}") from None
        return cls(**values)

    def make(self) -> tuple[np.ndarray, np.ndarray]:
        """Generate all rows of this spec (``make_imagenet_like`` with these knobs)."""
        return _generate(self, 0, self.rows)

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield this spec's rows in consecutive blocks of ``block_rows`` rows."""
        if block_rows < 1:
            raise ConfigError(f"synthetic: block_rows must be >= 1, got {block_rows}")
        last: dict = {}  # a chunk that straddles two blocks is drawn once
        for start in range(0, self.rows, block_rows):
            yield _generate(self, start, min(start + block_rows, self.rows), last)


def _spec(n_rows: int, n_features: int, n_classes: int, seed: int, knobs: dict) -> SyntheticSpec:
    known = {f.name for f in dataclasses.fields(SyntheticSpec)} - {
        "rows", "features", "classes", "seed"}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise ConfigError(f"synthetic: unknown knob {unknown[0]!r} "
                          f"(known knobs: {', '.join(sorted(known))})")
    return SyntheticSpec(rows=n_rows, features=n_features, classes=n_classes, seed=seed, **knobs)


def make_imagenet_like(n_rows: int, n_features: int = 2048, n_classes: int = 1000, *,
                       seed: int = 0, **knobs) -> tuple[np.ndarray, np.ndarray]:
    """Generate ImageNet-like deep features.

    Parameters
    ----------
    n_rows, n_features, n_classes : int
        Shape of X and number of classes (labels are ``0 .. n_classes-1``, about balanced).
    seed : int
        Seed; the same seed and knobs give bit-identical data.
    **knobs
        Any other field of :class:`SyntheticSpec` (``superclasses``, ``modes``, ``spread``...).

    Returns
    -------
    X : ndarray of shape (n_rows, n_features), float32, non-negative
    y : ndarray of shape (n_rows,), int64
    """
    return _spec(n_rows, n_features, n_classes, seed, knobs).make()


def iter_blocks(n_rows: int, block_rows: int, n_features: int = 2048, n_classes: int = 1000, *,
                seed: int = 0, **knobs) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(X_b, y_b)`` for consecutive row ranges of ``block_rows`` rows (the last may be
    shorter). Concatenated, they equal :func:`make_imagenet_like` with the same arguments exactly,
    whatever ``block_rows`` is.
    """
    return _spec(n_rows, n_features, n_classes, seed, knobs).iter_blocks(block_rows)


@dataclasses.dataclass(frozen=True)
class _Structure:
    mode_centres: np.ndarray   # (classes, modes, super_rank + detail_rank) float32
    projection: np.ndarray     # (super_rank + detail_rank, features) float32


@functools.lru_cache(maxsize=4)
def _structure(spec: SyntheticSpec) -> _Structure:
    """The fixed class hierarchy and projection of a spec (cached: built once per spec)."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0]))
    n_super, C, M = spec.n_superclasses, spec.classes, spec.modes
    sr, dr = spec.super_rank, spec.detail_rank
    # Gaussian vectors scaled by 1/sqrt(dim) have norm ~ the given distance.
    supers = rng.standard_normal((n_super, sr)) * (spec.super_sep / np.sqrt(sr))
    # Classes are dealt round-robin so every super-class has the same count (+-1); shuffled so
    # neighbouring class ids are not siblings.
    parent = rng.permutation(np.arange(C) % n_super)
    home = np.repeat(parent[:, None], M, axis=1)
    jump = rng.random((C, M)) < spec.mode_jump
    jump[:, 0] = False
    home[jump] = rng.integers(0, n_super, size=int(jump.sum()))
    centres = rng.standard_normal((C, 1, dr)) * (spec.class_sep / np.sqrt(dr))
    detail = centres + rng.standard_normal((C, M, dr)) * (spec.mode_sep / np.sqrt(dr))
    modes = np.concatenate([supers[home], detail], axis=2)
    # Scale the map so pre-activations have ~unit spread whatever the distances are: then `bias`
    # and `noise` keep their meaning and feature values stay O(1), like real embeddings (and
    # SGD step sizes tuned on one spec suit another).
    total = np.sqrt(spec.super_sep**2 + spec.class_sep**2 + spec.mode_sep**2 + spec.spread**2)
    projection = rng.standard_normal((sr + dr, spec.features)) / max(total, 1e-12)
    return _Structure(modes.astype(np.float32), projection.astype(np.float32))


def _chunk(spec: SyntheticSpec, index: int, structure: _Structure) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``index*CHUNK_ROWS ...`` (the tail chunk is cut to the data set's end).

    A chunk is always drawn whole and then cut, so row i does not depend on ``spec.rows``: a
    longer data set extends a shorter one with the same knobs.
    """
    n = CHUNK_ROWS
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1, index]))
    y = rng.integers(0, spec.classes, size=n, dtype=np.int64)
    mode = rng.integers(0, spec.modes, size=n)
    z = structure.mode_centres[y, mode]
    dr = spec.detail_rank
    z[:, -dr:] += rng.standard_normal((n, dr), dtype=np.float32) * np.float32(
        spec.spread / np.sqrt(dr))
    X = z @ structure.projection
    X += rng.standard_normal(X.shape, dtype=np.float32) * np.float32(spec.noise)
    X += np.float32(spec.bias)
    np.maximum(X, 0, out=X)
    keep = min(CHUNK_ROWS, spec.rows - index * CHUNK_ROWS)
    return X[:keep], y[:keep]


def _generate(spec: SyntheticSpec, start: int, stop: int,
              last: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop``, assembled from the internal chunks that cover them; ``last`` keeps
    the last chunk drawn, for the next call."""
    last = {} if last is None else last
    structure = _structure(spec)
    X = np.empty((stop - start, spec.features), dtype=np.float32)
    y = np.empty(stop - start, dtype=np.int64)
    for index in range(start // CHUNK_ROWS, -(-stop // CHUNK_ROWS)):
        lo = index * CHUNK_ROWS
        if last.get("index") != index:
            last.update(index=index, chunk=_chunk(spec, index, structure))
        Xc, yc = last["chunk"]
        a, b = max(start, lo), min(stop, lo + len(yc))
        X[a - start:b - start] = Xc[a - lo:b - lo]
        y[a - start:b - start] = yc[a - lo:b - lo]
    return X, y
