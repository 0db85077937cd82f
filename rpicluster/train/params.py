"""An Inc-kSGD run's parameters, validated once before any task is sent."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunParams:
    """The parameters of one Inc-kSGD run on a store.

    Attributes
    ----------
    n_clusters : int
        k-means clusters per block.
    block_rows : int
        The store's: its blocks are its chunks, whatever the estimator says.
    random_state : int
        The estimator's seed, resolved (None draws one, once per run).
    values : dict
        Every estimator parameter, validated, with the store's ``block_rows``: what the
        workers' kernels take, what the run directory records (a resume must match it) and what
        the block models are built with.
    """

    n_clusters: int
    block_rows: int
    random_state: int
    values: dict

    @classmethod
    def of(cls, estimator, dataset) -> RunParams:
        """Validate ``estimator``'s parameters (an IncrementalKSGDClassifier) for a run on
        ``dataset``; ValueError names a parameter that is not allowed."""
        from rpicluster.models.incremental import check_incremental_params
        from rpicluster.models.ksgd import resolve_random_state

        values = {**check_incremental_params(estimator.get_params()),
                  "block_rows": int(dataset.block_rows)}
        return cls(n_clusters=int(values["n_clusters"]), block_rows=values["block_rows"],
                   random_state=resolve_random_state(estimator.random_state), values=values)
