"""The scan's own settings checks, beside the scan (job files, `atlas scan` and ScanConfig all call them)."""

from __future__ import annotations

from pipeline.devices import DEVICES
from pipeline.ranges import check_range


def check_scan_settings(
    k: int, record: str, batch_size: int, device: str, actors: int | None = None, threads: int | None = None
) -> None:
    """The scan's own settings (ValueError naming the setting); shared by job files and `atlas scan`.
    Numeric ranges come from pipeline.ranges, the one table the model and render settings use too."""
    for name, value in (("k", k), ("batch_size", batch_size), ("actors", actors), ("threads", threads)):
        check_range(name, value)
    if record not in ("topk", "all"):
        raise ValueError(f"record must be 'topk' or 'all', got {record!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
