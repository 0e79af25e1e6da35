"""Which data a results folder was computed on: a folder is never resumed on other data.

A run's folder holds the dataset it generated (``<out>/data``, a built-in benchmark) or names the one it read
(``data.path``, with the dataset's manifest digest, :func:`cl_service.digest.dataset_digest`, in
``config.resolved.json``). A rerun of the folder with other data is refused, naming the values that differ:
otherwise the generated data would be reused whatever ``data.benchmark``, ``data.train_per_task``,
``data.test_per_task`` and ``seed`` now say, and results of two datasets would be mixed in one report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cl_service.data.shards import MANIFEST

RESOLVED = "config.resolved.json"


class DataMismatch(ValueError):
    """The results folder was computed on other data than the config names."""


def generated_params(cfg: Any) -> dict[str, Any]:
    """The parameters that decide a built-in benchmark's generated data, by their dotted config names."""
    return {"data.benchmark": cfg.data.benchmark, "data.train_per_task": cfg.data.train_per_task,
            "data.test_per_task": cfg.data.test_per_task, "seed": cfg.seed}


def manifest_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a generated dataset's manifest says of :func:`generated_params`: its ``benchmark`` and ``seed``, and
    the per-task counts of each split (every task gets the same number)."""
    out: dict[str, Any] = {}
    if "benchmark" in manifest:
        out["data.benchmark"] = manifest["benchmark"]
    counts = manifest.get("counts") or {}
    for split, key in (("train", "data.train_per_task"), ("test", "data.test_per_task")):
        n = {c.get(split) for c in counts.values()}
        if len(n) == 1 and None not in n:
            out[key] = n.pop()
    if "seed" in manifest:
        out["seed"] = manifest["seed"]
    return out


def check_origin(out: Path, cfg: Any, data_digest: str | None = None) -> None:
    """Raise :class:`DataMismatch` when ``out`` holds results of other data than ``cfg`` names.

    Generated data: ``<out>/data``'s manifest against :func:`generated_params`. Read data (``data.path``, whose
    digest is ``data_digest``): the digest the folder's last run recorded. A folder whose last run read a dataset
    is not resumed on generated data, nor the reverse; a folder written before runs recorded the digest (and
    read a dataset) cannot be checked, and its adapters and records do not match the new keys anyway."""
    prev = _read_json(out / RESOLVED)
    prev_data = ((prev or {}).get("config") or {}).get("data") or {}
    prev_path = prev_data.get("path")
    diffs: list[str] = []
    if not cfg.data.path:
        manifest = _read_json(out / "data" / MANIFEST)
        if manifest is not None:
            have, want = manifest_params(manifest), generated_params(cfg)
            diffs += [f"{k} {have[k]!r} in the folder, {want[k]!r} now" for k in want if k in have and have[k] != want[k]]
        if prev_path:
            diffs.append(f"data.path {prev_path} in the folder, unset now (built-in {cfg.data.benchmark})")
    elif prev is not None:
        recorded = prev.get("data_digest")
        if recorded is not None and recorded != data_digest:
            diffs.append(f"dataset manifest digest {recorded} in the folder ({prev.get('dataset')}), "
                         f"{data_digest} now ({cfg.data.path})")
        elif recorded is None and not prev_path:
            diffs.append(f"data.path unset in the folder (built-in {prev_data.get('benchmark')}), "
                         f"{cfg.data.path} now")
    if diffs:
        raise DataMismatch(f"results folder {out} was computed on other data: " + "; ".join(diffs)
                           + f". Use another results folder (--out / out=), or delete {out} to start over.")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None
