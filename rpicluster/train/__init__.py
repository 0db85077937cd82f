"""rpicluster.train: the Dask side of training (tasks, the job, run directories, model files).

Importing it registers the job as the estimators' distributed fit
(:func:`rpicluster.models.incremental.register_distributed_fit`).
"""

from rpicluster.models.incremental import register_distributed_fit


def _fit_on_cluster(estimator, dataset, client) -> None:
    from rpicluster.train.job import train

    train(estimator, dataset, client)


register_distributed_fit(_fit_on_cluster)
