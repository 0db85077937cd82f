"""One model (or any object) shared with a cluster's tasks so that a lost worker cannot hang
or lose it.

``client.scatter(obj, broadcast=True)`` sends the object to every worker the scheduler lists,
a worker whose link was just cut included: the scheduler's replication then waits on that
worker past its removal, and the call never returns (a train whose host was cut after its last
block hung in calibration, with the run complete). Scattered data is also not recomputable: if
its one holder dies, every task that needs it fails. :func:`hold` puts the object in the graph as
a task instead: one copy travels to the scheduler and one worker, the tasks that use it fetch it
from there, and if that worker is lost the scheduler runs the task again elsewhere.
"""

from __future__ import annotations


def _held(obj):
    """The task that holds ``obj`` (it is its own result)."""
    return obj


def hold(client, obj, workers=None):
    """A future of ``obj`` on ``client``'s cluster (on one of ``workers`` when given), for tasks
    to take as an argument; recomputed on another worker if its holder is lost."""
    import uuid

    import dask

    # The object is the graph, on purpose (see the module's docstring): Dask's "large graph"
    # warning would tell every user of a big model to scatter it instead.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1PiB"}):
        return client.submit(_held, obj, pure=False, workers=workers,
                             key=f"held-{type(obj).__name__}-{uuid.uuid4().hex[:8]}")

