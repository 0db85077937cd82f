"""rpicluster.train: the Dask side of training (tasks, the job, run directories, model files).

Importing :mod:`rpicluster.train.job` registers the job as the estimators' distributed fit
(:func:`rpicluster.models.incremental.register_distributed_fit`).
"""
