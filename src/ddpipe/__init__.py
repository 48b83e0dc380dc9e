"""ddpipe: dataset distillation as resumable pipelines.

The library (this package) is plain PyTorch / pyarrow / fsspec code with no orchestrator import;
``ddpipe.tasks`` and ``ddpipe.flows`` (the repository's ``tasks/`` and ``flows/`` folders) wrap it in
Prefect.
"""

__version__ = "0.1.0"
