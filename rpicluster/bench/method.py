"""How the scaling benchmarks measure a step: an untimed warm-up, then timed repeats.

Shared by :mod:`rpicluster.bench.scaling` (inc-ksgd, random-forest) and
:mod:`rpicluster.bench.averaging` (mlp, sgd), so that every job's report states the same method.
"""

from __future__ import annotations

from rpicluster.errors import ConfigError

#: Warm-up before a step's timed runs: a reduced run of the job, the full run, or none.
WARMUPS = ("reduced", "full", "none")


def check_method(repeats: int, warmup: str) -> None:
    """Refuse a repeat count below one or an unknown warm-up (ConfigError naming the flag)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"--repeats must be an integer >= 1, got {repeats!r}")
    if warmup not in WARMUPS:
        raise ConfigError(f"--warmup {warmup!r}: expected one of {', '.join(WARMUPS)}")


def method(warmup: str, repeats: int, reduced: str) -> dict:
    """How every step was measured (the reports' method line): warm-up, repeats, statistic."""
    run = {"reduced": f"one untimed reduced run ({reduced})",
           "full": "one untimed run of the job as timed", "none": "none (cold workers)"}[warmup]
    return {"warmup": warmup, "warmup_runs": 0 if warmup == "none" else 1,
            "warmup_run": run, "repeats": repeats, "statistic": "median",
            "spread": "min and max of the timed repeats",
            "text": f"Every step: warm-up on the step's workers: {run}; then {repeats} timed "
                    f"repeat{'s' * (repeats != 1)}; measured = median (min-max) of the repeats. "
                    "One cluster serves every step; its workers are not restarted."}


#: The order of the timed runs when every step's warm-up comes first (the reports' method line).
ROUNDS = ("The warm-ups come first; then the timed runs in rounds (round r: run r of every "
          "step, in step order), so that a slow stretch of the machine hits every step alike.")


def in_rounds(out: dict) -> dict:
    """``out`` (a :func:`method`) for timed runs taken in rounds across the steps."""
    return {**out, "order": "rounds", "text": f"{out['text']} {ROUNDS}"}
