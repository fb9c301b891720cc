"""The user config, ``$OPTJOB_HOME/config.yaml``: defaults every spec gets where it says nothing
(``resources.cloud``, ``resources.region``, ``storage.artifacts``, ``budget``, ``teardown``).

    resources: {cloud: aws, region: us-east-1}
    storage: {artifacts: s3://my-bucket/optjob}
    budget: {max_usd: 20}
    teardown: always

The spec wins field by field; ``--set`` and ``--name`` count as the spec. The file is validated as
strictly as a spec (``specs.layers.UserDefaults``): an unknown key is an error naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import paths

if TYPE_CHECKING:
    from optjob.specs.layers import Layers

CONFIG_FILE = "config.yaml"


def config_file() -> Path:
    return paths.home() / CONFIG_FILE


def spec_layers(sets: Sequence[str] = (), name: str | None = None) -> Layers:
    """What goes over (``--set``, ``--name``) and under (the user config, if there is one) a spec."""
    from optjob.specs.layers import Layers

    f = config_file()
    return Layers(tuple(sets), name, f if f.exists() or f.is_symlink() else None)
