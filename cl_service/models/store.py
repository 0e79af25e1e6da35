"""The local model store: pre-trained bases by profile name, built once and reused.

Store folder: ``$CLSVC_MODEL_STORE``, else ``$CLSVC_HOME/models`` (:func:`cl_service._home.clsvc_home`). A base
is a folder in the Hugging Face LLaVA layout (:meth:`cl_service.models.mllm.MLLM.save`) plus ``base.json`` — the
recipe it was built with and its training summary. A base is *valid* when ``base.json`` records the same recipe
(model dims, pre-training settings, seed, and the fingerprint of the corpus the code generates:
:func:`~cl_service.models.pretrain.corpus_fingerprint`) and the weights are there; :func:`build_base` reuses a valid
base and rebuilds anything else. Concurrent builders of one base wait on a file lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from cl_service._atomic import atomic_write_text, remove_leftovers, replace_dir
from cl_service._home import clsvc_home
from cl_service.models.config import PROFILES, ModelCfg
from cl_service.models.pretrain import PRETRAIN, PretrainCfg, build_pretrained, corpus_fingerprint

BASE_META = "base.json"


def store_dir() -> Path:
    """Where bases live: ``$CLSVC_MODEL_STORE`` or ``$CLSVC_HOME/models``."""
    env = os.environ.get("CLSVC_MODEL_STORE")
    return Path(env).expanduser() if env else clsvc_home() / "models"


def base_path(name: str) -> Path:
    """Folder of the base named ``name`` (a profile name for built bases)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid base name {name!r}")
    return store_dir() / name


def _recipe(model_cfg: ModelCfg, cfg: PretrainCfg, seed: int) -> dict:
    return {"model": dataclasses.asdict(model_cfg), "pretrain": dataclasses.asdict(cfg), "seed": seed,
            "corpus": corpus_fingerprint(seed=seed, names=cfg.tokenizer_benchmarks)}


def _differs(meta: dict, recipe: dict) -> list[str]:
    """The recipe keys whose value ``base.json`` (``meta``) records otherwise (compared as JSON)."""
    return [k for k in recipe if meta.get(k) != json.loads(json.dumps(recipe[k]))]


def _stale_because(path: Path, recipe: dict) -> str | None:
    """Why the base at ``path`` is not the one ``recipe`` builds (None when there is no readable base.json)."""
    try:
        m = json.loads((path / BASE_META).read_text())
    except (OSError, ValueError):
        return None
    keys = _differs(m, recipe)
    if keys == ["corpus"]:
        return (f"built {m.get('built', '?')} from another corpus (fingerprint {m.get('corpus') or 'not recorded'}, "
                f"now {recipe['corpus']}): the data or tokenizer code changed")
    return f"built {m.get('built', '?')} with another recipe ({', '.join(keys)})" if keys else None


def is_valid_base(path: str | Path, recipe: dict | None = None) -> bool:
    """``path`` holds a complete base (and, with ``recipe``, one built by that recipe)."""
    path = Path(path)
    meta = path / BASE_META
    if not meta.is_file() or not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return False
    if recipe is None:
        return True
    try:
        m = json.loads(meta.read_text())
    except ValueError:
        return False
    return not _differs(m, recipe)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_base(profile: str, out: str | Path | None = None, steps: int | None = None, seed: int = 0,
               progress: bool = True, log: Callable[[str], None] = print, device: str | None = None) -> Path:
    """Pre-train ``profile``'s base into ``out`` (default :func:`base_path` of the profile); idempotent.

    ``steps`` overrides the profile's recipe (:data:`cl_service.models.pretrain.PRETRAIN`). An existing
    base built by the same recipe is reused as is (where it was trained does not matter: ``device``
    defaults to CUDA when present). Returns the base folder.
    """
    model_cfg = PROFILES.get(profile)
    if model_cfg.path:
        raise ValueError(f"profile {profile!r} is a checkpoint at {model_cfg.path}; nothing to build")
    cfg = PRETRAIN.get(profile)
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=int(steps))
    out = Path(out) if out is not None else base_path(profile)
    recipe = _recipe(model_cfg, cfg, seed)
    with _lock(out):
        if is_valid_base(out, recipe):
            log(f"base {profile}: reusing {out}")
            return out
        why = _stale_because(out, recipe)
        if why:
            log(f"base {profile}: rebuilding {out}, {why}")
        remove_leftovers(out)  # what a killed build left (never at ``out``: a base lands there by one rename)
        t0 = time.perf_counter()
        mllm, summary = build_pretrained(model_cfg, cfg, seed=seed, progress=progress, log=log, device=device)
        summary.update(recipe)
        summary["built"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        stage = out.with_name(f".{out.name}.build-{os.getpid()}")
        mllm.save(stage)
        atomic_write_text(stage / BASE_META, json.dumps(summary, indent=2, sort_keys=True))
        replace_dir(stage, out)  # weights and base.json appear together: a reader sees no base or a whole one
        log(f"base {profile}: built in {time.perf_counter() - t0:.0f} s (final loss {summary['final_loss']:.3f}) -> {out}")
        return out


def ensure_base(profile: str = "tiny", log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """The folder of ``profile``'s base: a checkpoint profile's ``path``, else the store's base (built
    with the default recipe when missing or stale)."""
    model_cfg = PROFILES.get(profile)
    if model_cfg.path:
        return Path(model_cfg.path)
    return build_base(profile, progress=progress, log=log)
