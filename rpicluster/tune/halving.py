"""Successive halving's schedule, as pure functions: how many candidates, rungs and resources.

The resource is training *units*: one unit is one pass over one training block (its rows). An
Inc-kSGD candidate with ``u`` units holds ``u`` block models (a block model is the paper's unit
of work; its epochs are a parameter, ``max_iter``); an MLP or SGD candidate has made ``u``
``partial_fit`` calls over the training blocks in order (``u / n_blocks`` epochs).

Rung ``i`` of ``R`` trains ``n_i = ceil(n / factor**i)`` candidates up to ``r_i = T / factor**
(R - 1 - i)`` units: the top rung gets ``T`` (the most a candidate can use, or what the budget
allows), lower rungs a ``factor`` less each. Survivors continue from the units they have, so a
rung costs ``n_i * (r_i - r_{i-1})`` units and a whole search about ``T * n / factor**(R-1) *
(1 + (R-1) * (1 - 1/factor))``.
"""

from __future__ import annotations

import dataclasses
import math

from rpicluster.errors import ConfigError

#: Candidate counts tried when none is asked for (powers of 3: a whole number of halvings).
CANDIDATES = (81, 27, 9, 3, 1)
#: The most candidates of a one-rung search (a store too small to halve).
ONE_RUNG_MOST = 9


@dataclasses.dataclass(frozen=True)
class Plan:
    """A halving schedule: ``sizes[i]`` candidates trained up to ``units[i]`` units in rung i."""

    sizes: tuple[int, ...]
    units: tuple[int, ...]
    factor: int

    @property
    def n_candidates(self) -> int:
        return self.sizes[0]

    @property
    def cost(self) -> int:
        """Units the whole search trains (survivors continue from their last rung)."""
        prev = (0,) + self.units[:-1]
        return sum(n * (u - p) for n, u, p in zip(self.sizes, self.units, prev))

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "units": list(self.units), "factor": self.factor}


def n_rungs(n_candidates: int, factor: int) -> int:
    """Rungs that bring ``n_candidates`` down to one: ``1 + ceil(log_factor(n))``."""
    return 1 + max(0, math.ceil(math.log(n_candidates) / math.log(factor) - 1e-9))


def build(n_candidates: int, top_units: int, factor: int) -> Plan:
    """The schedule of ``n_candidates`` whose top rung trains ``top_units`` units."""
    rungs = n_rungs(n_candidates, factor)
    sizes = tuple(math.ceil(n_candidates / factor ** i) for i in range(rungs))
    units, prev = [], 0
    for i in range(rungs):
        u = max(prev + 1, round(top_units / factor ** (rungs - 1 - i)))
        units.append(u)
        prev = u
    return Plan(sizes=sizes, units=tuple(units), factor=factor)


def plan(budget_units: float, max_units: int, *, factor: int = 3,
         n_candidates: int | None = None, where: str = "the store") -> Plan:
    """The schedule that spends at most ``budget_units`` with candidates of at most
    ``max_units`` units.

    Without ``n_candidates``, the most candidates of :data:`CANDIDATES` whose best one still
    gets ``max_units`` (else at least a ``factor**2``-th of it; else the most that fit). Where
    halving cannot hold more than one candidate (a store of fewer than ``factor`` training
    blocks) but the budget pays for several full trainings, one rung of that many candidates,
    at most :data:`ONE_RUNG_MOST`, each trained in full (a random search).

    Raises
    ------
    ConfigError
        A budget below one unit (one block), a factor below 2, or ``n_candidates`` needing more
        rungs than ``max_units`` (the store's blocks) can hold.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ConfigError(f"factor must be an int >= 2, got {factor!r}")
    if budget_units < 1:
        raise ConfigError(f"budget of {budget_units:.2g} blocks is smaller than one block of "
                          f"{where}; give a budget of at least one block's rows")
    max_units = int(max_units)
    if max_units < 1:
        raise ConfigError(f"{where} has no training block")
    if n_candidates is not None:
        if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) \
                or n_candidates < 1:
            raise ConfigError(f"n_candidates must be an int >= 1, got {n_candidates!r}")
        rungs = n_rungs(n_candidates, factor)
        if factor ** (rungs - 1) > max_units:
            most = n_rungs_fitting(max_units, factor)
            raise ConfigError(
                f"{where} is too small for {rungs} rungs ({n_candidates} candidates, factor "
                f"{factor}): its {max_units} training units hold at most {most} rungs, i.e. "
                f"{factor ** (most - 1)} candidates; ask for fewer candidates, a smaller factor, "
                "or ingest with a smaller --block-rows")
        return _fit(n_candidates, budget_units, max_units, factor)
    plans = [_fit(n, budget_units, max_units, factor) for n in CANDIDATES
             if factor ** (n_rungs(n, factor) - 1) <= max_units]
    plans = [p for p in plans if p.units[0] >= 1 and p.cost <= max(budget_units, 1)]
    best = _fit(1, budget_units, max_units, factor)
    for good in (lambda p: p.units[-1] >= max_units,
                 lambda p: p.units[-1] * factor ** 2 >= max_units,
                 lambda p: True):
        chosen = [p for p in plans if good(p)]
        if chosen:
            best = max(chosen, key=lambda p: (p.n_candidates, p.units[-1]))
            break
    full = min(ONE_RUNG_MOST, int(budget_units // max_units))
    if best.n_candidates == 1 and full > 1:
        return Plan(sizes=(full,), units=(max_units,), factor=factor)
    return best


def n_rungs_fitting(max_units: int, factor: int) -> int:
    """Most rungs whose lowest gets at least one unit."""
    return 1 + int(math.floor(math.log(max(1, max_units)) / math.log(factor) + 1e-9))


def _fit(n_candidates: int, budget_units: float, max_units: int, factor: int) -> Plan:
    """``n_candidates``' schedule with the largest top rung (<= ``max_units``) in budget."""
    lo, hi = 1, max_units
    best = build(n_candidates, 1, factor)
    while lo <= hi:  # cost grows with the top rung's units: bisect
        mid = (lo + hi) // 2
        p = build(n_candidates, mid, factor)
        if p.cost <= budget_units and p.units[-1] <= max_units:
            best, lo = p, mid + 1
        else:
            hi = mid - 1
    return best
