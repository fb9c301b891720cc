"""Where work runs: the ``Provider`` interface and its implementations.

``get_provider(name)`` imports a provider lazily, so the manager never pays for
SkyPilot when it runs locally, and a missing extra gives one clear error.
"""

from __future__ import annotations

from optjob.specs.errors import ProviderError

from .base import AttemptState, Handle, LaunchRequest, Poll, Provider

__all__ = ["AttemptState", "Handle", "LaunchRequest", "Poll", "Provider", "get_provider"]


def get_provider(name: str, **kwargs: object) -> Provider:
    """``local`` or ``skypilot`` (any cloud)."""
    if name == "local":
        from .local import LocalProvider

        return LocalProvider(**kwargs)  # type: ignore[arg-type]
    try:
        from .skypilot import SkyPilotProvider
    except ImportError as exc:
        raise ProviderError(
            f"cloud runs need SkyPilot ({exc.name or exc}); install it with: pip install 'optjob[cloud]'",
        ) from None
    return SkyPilotProvider(**kwargs)  # type: ignore[arg-type]
