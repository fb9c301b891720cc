"""The workload that runs on the node: torch and transformers, one module per step.

Entry point: ``python -m optjob.steps run JOB_DIR`` (see ``runner``). It reads
``JOB_DIR/job.json``, runs the pipeline, and reports JSON-lines events
(``events``). Importing this package itself imports no torch, so the manager can
use ``optjob.steps.events`` and ``optjob.steps.layout``.
"""
