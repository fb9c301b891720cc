"""How numbers read to a person, the same on the console and in the report: durations and money."""

from __future__ import annotations


def duration(seconds: float | None, *, tenths: bool = False, missing: str = "-") -> str:
    """``42s`` (``41.7s`` with ``tenths``), ``1m05s``, ``2h03m``; ``missing`` for None."""
    if seconds is None:
        return missing
    if seconds < 60:
        return f"{seconds:.1f}s" if tenths else f"{int(seconds)}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def money(x: float | None) -> str:
    if x is None:
        return "-"
    return f"${x:,.4f}" if x < 1 else f"${x:,.2f}"
