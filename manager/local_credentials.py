"""Whether credentials for a cloud or a bucket exist on this machine: environment variables and
files only, never a network call (the dry run's "what it could not verify").

Finding them says they are there, not that they work: nothing is exchanged with the cloud. Where
each cloud's SDK and CLI look (their documented defaults and the variables that move them):

- aws (boto3, the aws CLI, SkyPilot): ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_WEB_IDENTITY_TOKEN_FILE``,
  ``~/.aws/credentials`` (``AWS_SHARED_CREDENTIALS_FILE``), ``~/.aws/config`` (``AWS_CONFIG_FILE``; SSO)
- gcp (google-auth, gcloud): ``GOOGLE_APPLICATION_CREDENTIALS``, ``~/.config/gcloud/`` (``CLOUDSDK_CONFIG``)
  ``application_default_credentials.json`` or ``credentials.db``
- azure (azure-identity, the az CLI): ``AZURE_CLIENT_ID`` with ``AZURE_TENANT_ID``, ``~/.azure/``
  (``AZURE_CONFIG_DIR``) ``azureProfile.json`` or ``msal_token_cache.json``; for blobs also
  ``AZURE_STORAGE_CONNECTION_STRING`` / ``AZURE_STORAGE_KEY``
- lambda (SkyPilot): ``~/.lambda_cloud/lambda_keys``
- runpod (SkyPilot): ``RUNPOD_API_KEY``, ``~/.runpod/config.toml``
- kubernetes: ``KUBECONFIG``, ``~/.kube/config``
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def _file(path: str | Path | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    return str(p) if p.is_file() else None


def cloud_credentials(cloud: str, env: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where credentials for ``cloud`` were found (``env AWS_ACCESS_KEY_ID``, a file's path), or None.
    An unknown cloud is None too."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home

    def var(*names: str) -> str | None:
        found = [n for n in names if env.get(n)]
        return f"env {' and '.join(found)}" if len(found) == len(names) else None

    def files(*paths: str | Path | None) -> str | None:
        return next((f for f in map(_file, paths) if f), None)

    if cloud == "aws":
        return (var("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") or var("AWS_PROFILE")
                or var("AWS_WEB_IDENTITY_TOKEN_FILE")
                or files(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials",
                         env.get("AWS_CONFIG_FILE") or home / ".aws" / "config"))
    if cloud == "gcp":
        gcloud = Path(env.get("CLOUDSDK_CONFIG") or home / ".config" / "gcloud")
        return files(env.get("GOOGLE_APPLICATION_CREDENTIALS"), gcloud / "application_default_credentials.json",
                     gcloud / "credentials.db")
    if cloud == "azure":
        azure = Path(env.get("AZURE_CONFIG_DIR") or home / ".azure")
        return var("AZURE_CLIENT_ID", "AZURE_TENANT_ID") or files(azure / "azureProfile.json",
                                                                  azure / "msal_token_cache.json")
    if cloud == "lambda":
        return files(home / ".lambda_cloud" / "lambda_keys")
    if cloud == "runpod":
        return var("RUNPOD_API_KEY") or files(home / ".runpod" / "config.toml")
    if cloud == "kubernetes":
        return files(*(env.get("KUBECONFIG") or "").split(os.pathsep), home / ".kube" / "config")
    return None


#: The cloud whose credentials a bucket scheme uses.
SCHEME_CLOUD = {"s3": "aws", "gs": "gcp", "az": "azure"}


def bucket_credentials(scheme: str, env: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where credentials for an ``s3``/``gs``/``az`` bucket were found, or None."""
    env = os.environ if env is None else env
    if scheme == "az":
        for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN"):
            if env.get(name):
                return f"env {name}"
    cloud = SCHEME_CLOUD.get(scheme)
    return cloud_credentials(cloud, env, home) if cloud else None
