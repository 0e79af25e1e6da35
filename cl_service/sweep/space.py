"""A sweep's search space (SPACE.yaml): dotted ``RunCfg`` keys -> grid values, distributions or ties.

```yaml
# clsvc sweep --config workloads/configs/sweep_dcl_mini.yaml --space workloads/configs/space_rank_router.yaml
space:
  router.samples_per_task: [2, 5, 10]          # a list = grid values
  expert.lora.rank: [2, 4, 8]
  expert.lora.alpha: "2*expert.lora.rank"      # tied (or {tie: expert.lora.rank, scale: 2}); "2*rank" if unambiguous
  expert.train.lr: {loguniform: [1.0e-4, 1.0e-2]}   # random search: also uniform, randint [a, b], choice [...]
  methods: [[mrlora], [mrlora_proto]]          # router kind
sweep: {num_samples: 1, seeds: [0], metric: acc_seen, mode: max, max_concurrent_trials: null,
        asha: {grace_period: 2, reduction_factor: 2}}
```
The space expands here, deterministically (random draws from ``sweep.sample_seed``), into trials with
stable ids — so a restarted sweep knows which trials are done. Trials are the product of the grid values
(the last key varies fastest), repeated ``num_samples`` times with fresh random draws. A trial runs its
configuration at every seed of ``seeds`` (in lockstep, :func:`cl_service.sweep.trial.run_trial`): the scheduler
decides on the mean over seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cl_service import _cfgload
from cl_service._cfgload import ConfigError
from cl_service.config import RunCfg

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
FORBIDDEN = {"out": "each trial gets its own folder under the sweep's --out",
             "seed": "use sweep.seeds (each trial runs at every seed)",
             "data.path": "the sweep prepares one dataset for all trials (set it in the config file)"}
METRICS = ("acc_seen", "acc_task", "router_acc")


@dataclass(frozen=True)
class AshaCfg:
    """Asynchronous successive halving over stages (Tune ``ASHAScheduler``, ``time_attr=training_iteration``)."""

    grace_period: int = 2
    """Stages every trial runs before it may be stopped (stage 1 has a single expert: nothing to route)."""
    reduction_factor: float = 2.0
    """At each rung only the top 1/reduction_factor of the trials seen there continue."""


@dataclass(frozen=True)
class SweepSettings:
    """How the space is searched."""

    num_samples: int = 1
    """Random draws of the distributions (each combined with every grid point); 1 for a pure grid."""
    seeds: tuple[int, ...] = (0,)
    """Run seeds (``RunCfg.seed``): a trial runs its configuration at every seed; ASHA decides on the mean over
    seeds of the stage metric, and the report gives each configuration's mean with its interval."""
    sample_seed: int = 0
    """Seeds the random draws, so a restarted sweep draws the same trials."""
    metric: Literal["acc_seen", "acc_task", "router_acc"] = "acc_seen"
    """Per-stage metric reported to Tune: mean accuracy over the tasks seen so far (``acc_seen``), on the
    newest task (``acc_task``), or mean router accuracy over seen tasks (``router_acc``) — of the trial's
    first method."""
    mode: Literal["max", "min"] = "max"
    asha: AshaCfg | None = field(default_factory=AshaCfg)
    """Early stopping; ``null`` runs every trial to the end (FIFO)."""
    max_concurrent_trials: int | None = None
    """None = from the cluster's CPUs/GPUs divided by one trial's Ray Train workers."""
    trial_cpus: float = 0.0
    """CPUs reserved by each trial's driver (routing and evaluation run there between training runs)."""
    time_budget_s: float = 4 * 3600.0
    """Upper bound on the whole sweep (Tune ``time_budget_s``)."""


@dataclass(frozen=True)
class Dim:
    """One swept key: ``kind`` grid | fixed | choice | uniform | loguniform | randint | tie."""

    key: str
    kind: str
    values: tuple = ()
    tie: str | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class Space:
    dims: tuple[Dim, ...]
    settings: SweepSettings

    @property
    def has_random(self) -> bool:
        return any(d.kind in DISTRIBUTIONS for d in self.dims)

    def swept_keys(self) -> list[str]:
        """Keys whose value differs between trials (for tables and plots)."""
        return [d.key for d in self.dims if d.kind not in ("fixed",) and not (d.kind == "grid" and len(d.values) == 1)]


@dataclass(frozen=True)
class TrialSpec:
    """One trial: overrides of the sweep's base config, run at each of its seeds. ``id`` is stable across
    restarts."""

    id: str
    index: int
    params: dict[str, Any]
    seeds: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "index": self.index, "params": self.params, "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialSpec":
        return cls(d["id"], int(d["index"]), dict(d["params"]), tuple(int(s) for s in d["seeds"]))

    def label(self) -> str:
        short = {k.split(".")[-1] if k.count(".") else k: v for k, v in self.params.items()}
        seeds = f"seed={self.seeds[0]}" if len(self.seeds) == 1 else f"seeds={_short(self.seeds)}"
        return " ".join(f"{k}={_short(v)}" for k, v in short.items()) + f" {seeds}"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def trial_id(params: dict[str, Any], seeds: tuple[int, ...]) -> str:
    # one seed: the id trials had when each seed was a trial of its own
    blob = json.dumps({"params": params, "seed": seeds[0]} if len(seeds) == 1 else
                      {"params": params, "seeds": list(seeds)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------ config keys
def _field_type(key: str) -> Any:
    """The declared type of dotted ``key`` in ``RunCfg``; a :class:`ConfigError` naming the known keys."""
    tp: Any = RunCfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"space key {key!r}: {'.'.join(parts[:i])!r} is not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(f"space key {key!r}: unknown key {part!r}; known under "
                              f"'{'.'.join(parts[:i]) or '<top>'}': {sorted(hints)}")
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                tp = inner[0]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"space key {key!r} is a section; sweep one of its keys ({sorted(typing.get_type_hints(tp))})")
    return tp


def _coerce(key: str, value: Any) -> Any:
    return _cfgload._coerce(_field_type(key), value, key)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of nested ``data`` with ``key`` (dotted) set to ``value``."""
    import copy

    data = copy.deepcopy(data)
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------------------------- parse
_TIE = re.compile(r"^\s*([0-9.eE+-]+)\s*\*\s*([A-Za-z_][\w.]*)\s*$")


def _parse_dim(key: str, raw: Any) -> Dim:
    if key in FORBIDDEN:
        raise ConfigError(f"space key {key!r} cannot be swept: {FORBIDDEN[key]}")
    _field_type(key)
    if isinstance(raw, str) and _TIE.match(raw):
        scale, target = _TIE.match(raw).groups()
        return Dim(key, "tie", tie=target, scale=float(scale))
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"space key {key!r}: an empty list of grid values")
        return Dim(key, "grid", tuple(_coerce(key, v) for v in raw))
    if isinstance(raw, dict):
        if "tie" in raw:
            extra = set(raw) - {"tie", "scale"}
            if extra:
                raise ConfigError(f"space key {key!r}: unknown option(s) {sorted(extra)} of tie (known: tie, scale)")
            try:
                scale = float(raw.get("scale", 1.0))
            except (TypeError, ValueError):
                raise ConfigError(f"space key {key!r}: tie scale must be a number, got {raw.get('scale')!r}") from None
            return Dim(key, "tie", tie=str(raw["tie"]), scale=scale)
        if len(raw) != 1 or next(iter(raw)) not in DISTRIBUTIONS + ("grid",):
            raise ConfigError(f"space key {key!r}: {raw!r} is not a distribution; use one of "
                              f"{list(DISTRIBUTIONS) + ['grid', 'tie']} (e.g. {{loguniform: [1.0e-4, 1.0e-2]}})")
        kind, args = next(iter(raw.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space key {key!r}: {kind} expects a non-empty list, got {args!r}")
        if kind in ("grid", "choice"):
            return Dim(key, kind, tuple(_coerce(key, v) for v in args))
        if len(args) != 2:
            raise ConfigError(f"space key {key!r}: {kind} expects [low, high], got {args!r}")
        try:
            low, high = (int(a) if kind == "randint" else float(a) for a in args)
        except (TypeError, ValueError):
            raise ConfigError(f"space key {key!r}: {kind} bounds must be numbers, got {args!r}") from None
        if kind == "randint" and any(isinstance(a, float) and not float(a).is_integer() for a in args):
            raise ConfigError(f"space key {key!r}: randint bounds must be integers, got {args!r}")
        if (low > high) if kind == "randint" else (low >= high):
            raise ConfigError(f"space key {key!r}: {kind} needs low < high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"space key {key!r}: loguniform needs low > 0, got {args!r}")
        _coerce(key, low + 0.37 * (high - low) if kind != "randint" else low)  # e.g. uniform on an int key
        return Dim(key, kind, (low, high))
    return Dim(key, "fixed", (_coerce(key, raw),))


def _resolve_ties(dims: list[Dim]) -> list[Dim]:
    keys = {d.key for d in dims}
    out = []
    for d in dims:
        if d.kind != "tie":
            out.append(d)
            continue
        target = d.tie
        if target not in keys:
            cands = [k for k in keys if k.endswith("." + target) and k != d.key]
            if len(cands) != 1:
                raise ConfigError(f"space key {d.key!r}: tie target {target!r} "
                                  + ("is ambiguous: " + ", ".join(sorted(cands)) if cands
                                     else f"is not a swept key (swept: {sorted(keys)})"))
            target = cands[0]
        if target == d.key:
            raise ConfigError(f"space key {d.key!r} is tied to itself")
        tdim = next(x for x in dims if x.key == target)
        if tdim.kind == "tie":
            raise ConfigError(f"space key {d.key!r}: tie target {target!r} is itself tied")
        out.append(dataclasses.replace(d, tie=target))
    return out


def parse_space(data: dict[str, Any]) -> Space:
    """Validate a SPACE mapping (``space:`` + ``sweep:``); errors name the offending key."""
    if not isinstance(data, dict):
        raise ConfigError("space file: top level must be a mapping with 'space' (and optional 'sweep')")
    unknown = set(data) - {"space", "sweep"}
    if unknown:
        raise ConfigError(f"space file: unknown top-level key(s) {sorted(unknown)}; known: ['space', 'sweep']")
    raw = data.get("space")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("space file: 'space' must map dotted config keys to values, e.g. {expert.lora.rank: [2, 4]}")
    dims = _resolve_ties([_parse_dim(str(k), v) for k, v in raw.items()])
    settings = _cfgload.from_dict(SweepSettings, data.get("sweep") or {}, prefix="sweep.")
    if settings.num_samples < 1:
        raise ConfigError("sweep.num_samples must be >= 1")
    if not settings.seeds:
        raise ConfigError("sweep.seeds must list at least one seed")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise ConfigError(f"sweep.seeds has duplicates: {list(settings.seeds)}")
    space = Space(tuple(dims), settings)
    if settings.num_samples > 1 and not space.has_random:
        raise ConfigError("sweep.num_samples > 1 with a pure grid repeats identical trials; use sweep.seeds")
    if settings.asha is not None and (settings.asha.grace_period < 1 or settings.asha.reduction_factor <= 1):
        raise ConfigError("sweep.asha needs grace_period >= 1 and reduction_factor > 1")
    if settings.max_concurrent_trials is not None and settings.max_concurrent_trials < 1:
        raise ConfigError("sweep.max_concurrent_trials must be >= 1 (or null = from the resources)")
    return space


def with_seeds(space: Space, seeds: typing.Sequence[int] | None) -> Space:
    """``space`` with ``sweep.seeds`` replaced (``clsvc sweep --seeds``); None keeps the file's."""
    if seeds is None:
        return space
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {list(seeds)}: at least one seed, each listed once")
    return Space(space.dims, dataclasses.replace(space.settings, seeds=tuple(int(s) for s in seeds)))


def load_space(path: str | Path) -> Space:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"space file {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    try:
        return parse_space(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------- expand
def _draw(d: Dim, rng: random.Random) -> Any:
    if d.kind == "choice":
        return d.values[rng.randrange(len(d.values))]
    low, high = d.values
    if d.kind == "uniform":
        v = rng.uniform(low, high)
    elif d.kind == "loguniform":
        v = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:  # randint, both ends included
        v = rng.randint(low, high)
    return _coerce(d.key, v)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def expand(space: Space, base: dict[str, Any] | None = None) -> list[TrialSpec]:
    """Every trial of the sweep, in launch order; each trial's config is validated against ``base``."""
    grid = [d for d in space.dims if d.kind == "grid"]
    rng = random.Random(space.settings.sample_seed)
    trials: list[TrialSpec] = []
    seen: set[str] = set()
    for _ in range(space.settings.num_samples):
        for combo in itertools.product(*(d.values for d in grid)):
            params: dict[str, Any] = {}
            chosen = dict(zip((d.key for d in grid), combo))
            for d in space.dims:
                if d.kind == "grid":
                    params[d.key] = _plain(chosen[d.key])
                elif d.kind == "fixed":
                    params[d.key] = _plain(d.values[0])
                elif d.kind in DISTRIBUTIONS:
                    params[d.key] = _plain(_draw(d, rng))
            for d in space.dims:
                if d.kind == "tie":
                    params[d.key] = _coerce(d.key, d.scale * params[d.tie])
            params = {d.key: params[d.key] for d in space.dims}  # the space's key order
            seeds = tuple(int(s) for s in space.settings.seeds)
            tid = trial_id(params, seeds)
            if tid in seen:
                continue
            seen.add(tid)
            trials.append(TrialSpec(tid, len(trials), params, seeds))
    if base is not None:
        for t in trials:
            trial_cfg(base, t, "/tmp/validate")  # fails on a combination the config rejects
    return trials


def trial_cfg(base: dict[str, Any], spec: TrialSpec, out: str | Path, data_path: str | None = None,
              base_path: str | None = None, seed: int | None = None) -> RunCfg:
    """The ``RunCfg`` of the trial's run at ``seed`` (default its first): the sweep's config with the trial's values,
    the seed and the run's output folder."""
    data = base
    for k, v in spec.params.items():
        data = set_dotted(data, k, v)
    data = set_dotted(set_dotted(data, "seed", spec.seeds[0] if seed is None else seed), "out", str(out))
    if data_path:
        data = set_dotted(data, "data.path", str(data_path))
    if base_path:
        data = set_dotted(data, "base.path", str(base_path))
    try:
        return _cfgload.from_dict(RunCfg, data)
    except ConfigError as e:
        raise ConfigError(f"trial {spec.label()}: {e}") from None


def load_base(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """The sweep's base config as a plain dict (validated once as a ``RunCfg``)."""
    cfg = _cfgload.load(RunCfg, path, overrides)
    return _cfgload.to_dict(cfg)
