"""The runs a comparison reads and the comparison it wrote: RunInfo/load_run (a complete scan run), and
connect_comparison (the DuckDB views `atlas query` and the notebook API open on a comparison)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from pipeline.store import (
    COMPARE_VIEWS,
    COMPARISON_KIND,
    MANIFEST,
    RUN_VIEWS,
    RunError,
    create_views,
    read_manifest,
    require_run,
)

logger = logging.getLogger(__name__)


@dataclass
class RunInfo:
    path: str
    manifest: dict
    layers: dict[str, int] = field(default_factory=dict)  # name -> units, in recorded order

    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint", "")

    @property
    def record_all(self) -> bool:
        return self.manifest.get("record") == "all"

    def describe(self) -> dict:
        model = self.manifest.get("model", {})
        return {
            "path": self.path,
            "fingerprint": self.fingerprint,
            "created": self.manifest.get("created"),
            "model": model.get("spec"),
            "weights": model.get("weights"),
            "weights_sha256": model.get("weights_sha256"),
            "data": self.manifest.get("data", {}).get("path"),
            "record": self.manifest.get("record"),
            "k": self.manifest.get("k"),
        }


def load_run(path: str) -> RunInfo:
    manifest = require_run(path)
    if manifest.get("kind") == COMPARISON_KIND:
        raise RunError(f"{path} is a comparison, not a run; compare two scan runs")
    layers = {entry["name"]: int(entry["units"]) for entry in manifest.get("layers", [])}
    return RunInfo(os.path.abspath(path), manifest, layers)


def require_comparison(cmp_dir: str) -> dict:
    """The manifest of the complete comparison at `cmp_dir`; the one refusal of anything else (a folder without a
    manifest, or a scan run's), for every reader of a comparison (its views, its site)."""
    manifest = read_manifest(cmp_dir)
    if manifest is None or manifest.get("kind") != COMPARISON_KIND:
        raise RunError(f"{cmp_dir} is not a complete comparison (no comparison {MANIFEST}); run `atlas compare` first")
    return manifest


def connect_comparison(cmp_dir: str):
    """DuckDB views over a comparison: cmp_units, cmp_layers, and both runs' tables as a_topk, a_units, a_images,
    a_maxima, b_topk, ... (a run that moved or was rescanned since is left out, with a warning)."""
    import duckdb

    manifest = require_comparison(cmp_dir)
    con = duckdb.connect()
    create_views(con, "", COMPARE_VIEWS, cmp_dir)
    for side in ("a", "b"):
        described = manifest["runs"][side]
        run_manifest = read_manifest(described["path"])
        if run_manifest is None or run_manifest.get("fingerprint") != described["fingerprint"]:
            logger.warning(
                "run %s (%s) is gone or was rescanned since the comparison: no %s_* views",
                side.upper(),
                described["path"],
                side,
            )
            continue
        create_views(con, f"{side}_", RUN_VIEWS, described["path"])
    return con
