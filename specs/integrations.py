"""``notify:`` and ``tracking:``: where the manager reports a job besides the terminal and its
report (a webhook when it ends; an MLflow tracking server). Both run on the manager, never on the
node: the workload does not see them (``job.json`` leaves them out)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from .base import StrictModel

_URL = re.compile(r"^https?://[^\s/?#]+(?:[/?#]\S*)?$")


def _http_url(v: str, what: str) -> str:
    if not _URL.match(v):
        raise ValueError(f"{what} must be an http:// or https:// URL")
    return v


class NotifySpec(StrictModel):
    """``notify: {webhook: https://hooks.example.com/...}``: when the job ends — succeeded, failed,
    stopped at its budget cap, cancelled — the manager POSTs a JSON summary there (with a ``text``
    line, so a Slack incoming webhook shows it as is). A webhook that fails never fails the job."""

    webhook: str = Field(min_length=8, max_length=2048)
    """The URL to POST the summary to (http or https)."""

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, v: str) -> str:
        return _http_url(v, "webhook")


class TrackingSpec(StrictModel):
    """``tracking: {mlflow: http://mlflow.example.com:5000}``: every step's metrics, the hpo trials and
    the report go to an MLflow run (experiment ``optjob``, run named after the job) when it ends.
    Needs ``pip install mlflow`` on the machine that runs ``optjob apply``."""

    mlflow: str = Field(min_length=1, max_length=2048)
    """The MLflow tracking URI (http(s)://host:port, or a local folder / ``file:`` URI)."""
    experiment: str = Field("optjob", min_length=1, max_length=256)
    """The MLflow experiment the runs go to."""
