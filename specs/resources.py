"""``resources:``, ``budget:``, ``storage:`` and ``teardown:``."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from .base import StrictModel
from .shorthand import parse_accelerators, parse_hours, parse_size_gb, parse_usd

Cloud = Literal["local", "aws", "gcp", "azure", "lambda", "runpod", "kubernetes", "any"]

def _num_or_text(example: str) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "examples": [example]}]})


Usd = Annotated[float, BeforeValidator(parse_usd), Field(ge=0.0), _num_or_text("$25")]
Hours = Annotated[float, BeforeValidator(parse_hours), Field(gt=0.0), _num_or_text("4h")]
SizeGb = Annotated[float, BeforeValidator(parse_size_gb), Field(gt=0.0), _num_or_text("24GB")]
_ACC_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string", "examples": ["A100:1"]},
            {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}},
            {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object"}]}},
            {"type": "null"},
        ]
    }
)
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ACC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


class ResourcesSpec(StrictModel):
    cloud: Cloud = "local"
    """Where to run: local, a cloud SkyPilot knows, kubernetes, or any (cheapest)."""
    accelerators: Annotated[list[dict[str, int]] | None, BeforeValidator(parse_accelerators), _ACC_SCHEMA] = None
    """``"A100:1"``, ``{H100: 8}``, or a list meaning any of them; omitted = CPU only."""
    spot: bool | Literal["auto"] = False
    """Use spot capacity: true, false, or auto (spot, falling back to on-demand)."""
    region: str | None = None
    """Cloud region, e.g. us-east-1 (default: any)."""
    zone: str | None = None
    """Zone within the region (default: any)."""
    nodes: int = Field(1, ge=1, le=1024)
    """Number of nodes (multi-node runs use torchrun)."""
    cpus: int | None = Field(None, ge=1, le=65536)
    """Minimum vCPUs per node."""
    memory: SizeGb | None = None
    """Minimum memory per node, e.g. '32GB'."""
    disk_gb: SizeGb | None = None
    """Disk per node."""
    hourly_usd: Usd | None = None
    """Price per node-hour to charge where no catalog has one (local, on-prem)."""
    max_hourly_usd: Usd | None = None
    """Skip offers that cost more than this per hour (all nodes)."""
    autostop_minutes: int = Field(10, ge=1, le=10080)
    """Node-side guard: a cluster idle this long tears itself down."""
    image: str | None = Field(None, min_length=1, max_length=512, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    """A prebuilt container image with optjob[workload] installed (docker image name): the node's
    setup is skipped and the workload runs with the image's python3."""

    @field_validator("accelerators")
    @classmethod
    def _accelerators(cls, v: list[dict[str, int]] | None) -> list[dict[str, int]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list; omit accelerators for CPU only")
        for item in v:
            for name, count in item.items():
                if not _ACC_NAME.match(name):
                    raise ValueError(f"accelerator name {name!r} is not valid")
                if not 1 <= count <= 1024:
                    raise ValueError(f"accelerator count for {name} must be 1..1024")
        return v

    @field_validator("region", "zone")
    @classmethod
    def _region(cls, v: str | None) -> str | None:
        if v is not None and not _REGION.match(v):
            raise ValueError(f"{v!r} is not a region/zone name (lowercase letters, digits, dashes)")
        return v

    @property
    def accelerator_choices(self) -> list[tuple[str, int]]:
        """Any-of list as (name, count) pairs; empty for CPU."""
        return [(k, n) for item in self.accelerators or [] for k, n in item.items()]


class BudgetSpec(StrictModel):
    """``{max_usd, max_hours}``, or one shorthand: ``budget: "$25"`` (or a number: dollars), ``"4h"``."""

    max_usd: Usd | None = None
    """Hard cap on spend across every attempt of this job, e.g. '$25'."""
    max_hours: Hours | None = None
    """Hard cap on wall time across attempts, e.g. '4h'."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return {"max_usd": value}
        if isinstance(value, str):
            text = value.strip().lower()
            return {"max_hours": value} if text[-1:] in ("h", "m", "s") else {"max_usd": value}
        return value


#: Bucket URL schemes and the clouds they belong to (the node reaches them with that cloud's SDK).
STORAGE_SCHEMES = {"s3": "aws", "gs": "gcp", "az": "azure"}
#: Bucket names: S3 / GCS (3-63 chars, dots allowed) and Azure containers (3-63, no dots) share this shape.
_BUCKET_URL = re.compile(r"^(s3|gs|az)://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/[^\s]*)?$")


def storage_example(cloud: str) -> str:
    """The bucket URL that fits ``cloud``: what a message asking for storage should name."""
    by_cloud = {"aws": "s3://bucket/prefix", "gcp": "gs://bucket/prefix", "azure": "az://container/prefix"}
    return by_cloud.get(cloud, "s3://bucket/prefix, gs://bucket/prefix or az://container/prefix")


class StorageSpec(StrictModel):
    artifacts: str | None = Field(None, min_length=1, max_length=2048)
    """s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or a local folder (default: the job's
    folder under OPTJOB_HOME)."""
    endpoint_url: str | None = Field(None, min_length=1, max_length=512)
    """The storage service's endpoint, for an S3-compatible store (R2, MinIO), an Azure account
    (https://ACCOUNT.blob.core.windows.net) or an emulator; default: the cloud's own."""

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\x00" in v:
            raise ValueError("contains a NUL byte")
        if "://" in v and not _BUCKET_URL.match(v):
            raise ValueError("only s3://bucket/prefix, gs://bucket/prefix, az://container/prefix URLs "
                             "(or a local folder) are supported")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", v):
            raise ValueError(f"{v!r} is not an http(s):// URL")
        return v

    @model_validator(mode="after")
    def _endpoint_needs_bucket(self) -> StorageSpec:
        if self.endpoint_url is not None and not self.is_remote:
            raise ValueError("endpoint_url is for a bucket URL (s3://, gs://, az://) in artifacts")
        return self

    @property
    def scheme(self) -> str | None:
        """``s3``, ``gs`` or ``az`` for a bucket; None for a folder or no storage."""
        if not self.artifacts or "://" not in self.artifacts:
            return None
        scheme = self.artifacts.split("://", 1)[0]
        return scheme if scheme in STORAGE_SCHEMES else None

    @property
    def is_remote(self) -> bool:
        return self.scheme is not None


Teardown = Literal["always", "on_success", "never"]


