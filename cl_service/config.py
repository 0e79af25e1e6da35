"""Typed configs of the workloads. One ``RunCfg`` is shared by ``clsvc run`` and ``workloads/run_stream.py``.

YAML is loaded strictly (unknown keys are errors); ``key.sub=value`` overrides apply on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, Sequence

from cl_service import _cfgload
from cl_service.adapters.lora import LoraCfg
from cl_service.train.loop import TrainCfg
from cl_service.tracking import TrackingCfg


@dataclass(frozen=True)
class DataCfg:
    """Where the task stream comes from."""

    benchmark: str = "dcl-mini"
    """Built-in benchmark generated when ``path`` is not set (``dcl-mini`` | ``acl-mini`` | ``acl-glyphs``; the
    procedural ``proc-5`` | ``proc-10`` | ``proc-20`` | ``proc-50`` | ``proc-100`` streams for cost measurements)."""
    path: str | None = None
    """A shard dataset from ``clsvc data ingest``/``synth``; its stream order is used."""
    train_per_task: int = 300
    """Generated training samples per task (built-in benchmarks only)."""
    test_per_task: int = 100
    """Generated test samples per task (built-in benchmarks only)."""
    train_limit: int | None = None
    """Cap on training samples per task (seeded choice); None = all."""
    test_limit: int | None = None
    """Cap on test samples per task evaluated at each stage; None = all."""
    tasks: tuple[str, ...] = ()
    """Restrict the stream to these tasks (in the dataset's order); empty = all."""
    order: tuple[str, ...] = ()
    """The order the tasks are learned in: a permutation of the stream's tasks (after ``tasks``), e.g.
    ``[Fin, Sci, AD, Med, RS]``; empty = the dataset's own order. A study runs one stream per order
    (``clsvc study``); an expert does not depend on it, the router and the sequential methods do."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, train_per_task=(1, None), test_per_task=(1, None), train_limit=(1, None),
                               test_limit=(1, None))
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"data.order {list(self.order)} names a task twice")
        if self.order and self.tasks and set(self.order) != set(self.tasks):
            raise ValueError(f"data.order {list(self.order)} is not a permutation of data.tasks {list(self.tasks)}")

    def stream(self, tasks: Sequence[str]) -> list[str]:
        """The run's stream from the dataset's ``tasks`` (its own order): restricted to ``self.tasks``, then put
        in ``self.order``. Raises ``ValueError`` naming the tasks when either does not fit the dataset."""
        kept = [t for t in tasks if not self.tasks or t in self.tasks]
        if self.tasks and len(kept) != len(self.tasks):
            raise ValueError(f"data.tasks {list(self.tasks)} not all in the dataset's stream {list(tasks)}")
        if not self.order:
            return kept
        if sorted(self.order) != sorted(kept):
            missing, extra = sorted(set(kept) - set(self.order)), sorted(set(self.order) - set(kept))
            raise ValueError(f"data.order {list(self.order)} is not a permutation of the stream's tasks {kept}"
                             + (f" (missing {missing})" if missing else "") + (f" (not in it: {extra})" if extra else ""))
        return list(self.order)


@dataclass(frozen=True)
class BaseCfg:
    """The frozen base MLLM."""

    profile: str = "tiny"
    """Model profile; with ``path`` unset the profile's pre-trained base in the model store is used (built if missing)."""
    path: str | None = None
    """A local checkpoint in the Hugging Face LLaVA layout (real base models plug in here)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype of the base wherever it is loaded (training workers, evaluators, serving). ``auto``:
    ``bfloat16`` when the run trains on GPUs (``ray.use_gpu``), else the checkpoint's own (float32 for the
    tiny profile's base)."""
    prompt_style: Literal["auto", "clsvc", "llava-hf", "mllm-cl"] = "auto"
    """How questions become prompts and images become pixels. ``clsvc``: our tiny bases' format
    (``"\\n" + question + "\\nAnswer:"``, images resized to a square); ``llava-hf``: the checkpoint's own chat
    template and ``AutoProcessor`` (shortest-edge resize + centre crop); ``mllm-cl``: the reference code's
    vicuna_v1 conversation (system prompt, ``USER: <image>\n... ASSISTANT:``) with images padded to a square
    in CLIP's mean colour. ``auto``: ``clsvc`` for bases built by cl-service (``clsvc_model.json``),
    ``llava-hf`` for other checkpoints."""


@dataclass(frozen=True)
class ExpertCfg:
    """Per-task LoRA experts (and the single sequential LoRA of the lora_ft baselines)."""

    lora: LoraCfg = field(default_factory=LoraCfg)
    train: TrainCfg = field(default_factory=TrainCfg)


@dataclass(frozen=True)
class RouterCfg:
    """The MLLM router (base + its own LoRA) and the prototype router."""

    samples_per_task: int = 20
    """Few-shot training samples per seen task (paper: 20)."""
    mode: Literal["retrain", "continue"] = "retrain"
    """Retrain the router from the base at each stage, or continue from the previous stage's router."""
    lora: LoraCfg = field(default_factory=LoraCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    max_new_tokens: int = 4
    """Router generation length (the paper allows up to 16; one letter is expected). Pools past 26 experts
    (two-letter labels) decode at least as many tokens as their longest label takes, whatever is set here."""
    augment: int = 0
    """Look-jittered copies of each router training sample (:mod:`cl_service.data.augment`), for the MLLM
    router and the feature routers alike: on a non-IID stream it keeps the router from keying on the
    training look (acl-glyphs, then acl-mini, shifted GUI test at the end of the stream: 16% routed right
    without, 96% with one copy)."""
    swap_images: int = 0
    """MLLM router only: copies of each router training sample carrying an image of another seen task, with
    its own question and target (:func:`cl_service.data.augment.with_swapped_images`). For streams whose
    questions name their task, so the router keys on the question where the test look shifts. On in
    ``acl_mini.yaml`` with 240 router steps per stage; with 120 (on acl-glyphs, then acl-mini) the router
    could not tell two tasks that both ask "How many ..." apart and sent every VP item to OCR."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, samples_per_task=(1, None), max_new_tokens=(1, None), augment=(0, None),
                               swap_images=(0, None))


@dataclass(frozen=True)
class ReplayCfg:
    """The replay variants ``<method>_replay`` of the sequential methods (``clsvc ls methods``): each stage's
    training data plus a fixed, seeded choice of every earlier task's training samples."""

    samples_per_task: int = 20
    """Replay samples per earlier task (0: none), unless ``fraction`` is set."""
    fraction: float | None = None
    """When set: per earlier task, this share of the new task's training-set size (after ``data.train_limit``; at
    least one sample) instead of ``samples_per_task``."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, samples_per_task=(0, None), fraction=(0, None, "open"))


@dataclass(frozen=True)
class OLoraCfg:
    lambda_orth: float = 0.5
    """``olora``: weight of the orthogonality penalty between a new task's LoRA A block and earlier ones."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, lambda_orth=(0, None))


@dataclass(frozen=True)
class MoELoraCfg:
    """``moelora``: LoRA experts per adapted Linear, mixed per token by a softmax gate; ``expert.lora.rank`` is
    split over them (rank r / experts each); trained sequentially over the stream with ``expert.train``."""

    experts: int = 4
    """LoRA experts per adapted Linear."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, experts=(1, None))


@dataclass(frozen=True)
class ClMoECfg:
    """``clmoe``: CL-MoE as the reference code runs it — a MoE-LoRA of ``experts`` experts per adapted Linear
    (``expert.lora.rank`` split over them), warm-started task to task, trained with ``expert.train``. ``paper``
    adds the paper's dual router and momentum update (not in the reference code)."""

    experts: int = 5
    """LoRA experts per adapted Linear (the reference: 5 of rank 32, ``expert.lora.rank=160``)."""
    paper: bool = False
    """Add the paper's instance- and task-level dual router and the momentum update of the experts between tasks."""
    beta: float = 0.5
    """``paper``: weight of the instance-level gate; the task-level gate gets ``1 - beta``."""
    momentum: float = 0.7
    """``paper``: after each task, an expert keeps this share of its previous weights (``1 - momentum`` for the
    previous task's experts that the new task does not use)."""
    top_k: int = 2
    """``paper``: a task's experts are, per Linear, the ``top_k`` its tokens' gates use most."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, experts=(1, None), beta=(0, 1), momentum=(0, 1), top_k=(1, None))
        if self.paper and self.top_k > self.experts:
            raise ValueError(f"clmoe.top_k={self.top_k} exceeds clmoe.experts={self.experts}")
        if not self.paper:
            default = {f.name: f.default for f in fields(ClMoECfg)}
            set_ = [k for k in ("beta", "momentum", "top_k") if getattr(self, k) != default[k]]
            if set_:
                raise ValueError(f"clmoe.{', clmoe.'.join(set_)}: used only with clmoe.paper=true")


@dataclass(frozen=True)
class ModalPromptCfg:
    """``modalprompt``: ModalPrompt — per task ``prompts`` soft prompt rows (inserted after BOS) and a transform MLP
    whose output gives the task's prototype; the base stays frozen, no LoRA. Each request gets the prompts of the
    task whose prototype its image and question features match best. Trained with ``modalprompt.train``."""

    prompts: int = 20
    """Prompt rows (token-embedding-wide vectors) per task (the reference: 20)."""
    train: TrainCfg = field(default_factory=TrainCfg)
    """How each task's prompt rows and transform train. The reference trains 10 epochs per task at lr 2e-4
    (``modalprompt.train.lr=2e-4``; its 2025 snapshot put the prompts in the projector's learning-rate group,
    so they trained at 2e-5)."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, prompts=(1, None))


@dataclass(frozen=True)
class HiDeCfg:
    """``hide``: HiDe-LLaVA — one LoRA expert per task (only the new task's trained), per-task image and text anchors;
    at inference every adapted decoder layer but the last applies the fused expert (sum of the A's times sum of
    the B's) and the last layer the experts weighted per request by anchor similarity, ``softmax(s / 0.1)`` as in the
    reference (docs/methods.md)."""

    rank: int | None = None
    """Rank of each task's expert; None: ``expert.lora.rank`` split evenly over the stream's tasks (the reference:
    rank 160 over 5 tasks = 32 each), refused when it does not divide. Its scale is ``expert.lora``'s
    ``alpha / rank``."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, rank=(1, None))


@dataclass(frozen=True)
class DiscoCfg:
    """``disco``: DISCO (non-federated) — one LoRA subspace per task (only the new task's trained), per-task text and
    image prototypes; at inference every adapted decoder Linear adds the subspaces' updates weighted per request
    by the softmax of the text-prototype cosines at temperature 0.05, as in the reference (docs/methods.md)."""

    rank: int | None = None
    """Rank of each task's subspace; None: ``expert.lora.rank`` split evenly over the stream's tasks (the reference:
    rank 160 over 5 tasks = 32 each), refused when it does not divide. Its scale is ``expert.lora``'s
    ``alpha / rank``. Equal to ``hide.rank``, the two methods train the same per-task jobs (once per run)."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, rank=(1, None))


@dataclass(frozen=True)
class SefeCfg:
    """``sefe``: SEFE's RegLoRA as the MLLM-CL reference code runs it. Each task trains a fresh LoRA block on the model
    merged so far (earlier tasks' blocks frozen) with a penalty on the key positions of the earlier blocks, and stays
    merged after the task; the stage's adapter is the merged model as one peft LoRA of stacked blocks
    (docs/methods.md). Trained with ``expert.train``; the first task is a plain LoRA."""

    rank: int | None = None
    """Rank of each task's LoRA block; None: ``expert.lora.rank`` (the reference: 32)."""
    alpha: float | None = None
    """LoRA alpha of each block; None: ``2 * rank`` when ``rank`` is set (the reference's ratio: 64 for rank 32),
    else ``expert.lora.alpha``."""
    key_fraction: float = 0.02
    """Share of every adapted matrix's entries that a task's block marks as key positions: its largest ``|B A|``
    (the reference: 2%)."""
    reg_weight: float = 2.5e3
    """Weight of the penalty ``mean over adapted matrices of mean |(B A)[key positions]|`` of the new block (the
    reference: 2.5e3)."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, rank=(1, None), alpha=(0, None, "open"), key_fraction=(0, 1, "open"),
                               reg_weight=(0, None))


@dataclass(frozen=True)
class KeepLoraCfg:
    """``keeplora``: KeepLoRA as its authors' LLaVA code runs it. Each task's LoRA block has a frozen ``A``: the top
    directions of the task's mean gradient outside a protected subspace (the pretrained weights' principal
    directions, then earlier tasks' gradient directions); only ``B`` trains, and the block stays merged after the
    task (docs/methods.md). Trained with ``expert.train`` (weight decay 0) unless ``lr`` is set."""

    rank: int | None = None
    """Rank of each task's LoRA block; None: ``expert.lora.rank`` (the reference: 32)."""
    alpha: float | None = None
    """LoRA alpha of each block; None: ``2 * rank`` when ``rank`` is set (the reference's ratio), else
    ``expert.lora.alpha``."""
    lr: float | None = None
    """Learning rate of the blocks' ``B`` (and the projector copy); None: ``expert.train.lr`` (the reference:
    2e-4)."""
    grad_fraction: float = 0.2
    """Share of a task's training samples (seeded choice, at least one) whose mean gradient sets the block's ``A``
    and, after the task, extends the protected subspace (the reference: 20%)."""
    base_energy: float = 0.6
    """Share of each pretrained weight's energy (squared singular values) its protected subspace holds before the
    first task (the reference: 0.6)."""
    task_energy: float = 0.99
    """Share of each learned task's gradient energy the protected subspace holds after the task (the reference:
    0.99)."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, rank=(1, None), alpha=(0, None, "open"), lr=(0, None, "open"),
                               grad_fraction=(0, 1, "open"), base_energy=(0, 1, "open"), task_energy=(0, 1, "open"))


@dataclass(frozen=True)
class EvalCfg:
    """How the (method, stage) evaluation units of a run are computed."""

    batch_size: int = 64
    """Test items per generation batch."""
    max_new_tokens: int = 8
    """Longest generated answer (greedy decoding)."""
    num_workers: int | None = None
    """Evaluator actors (Ray), each holding the base once and loading adapters as needed. 0: evaluate in the
    driver's own process (always so with ``ray.num_workers=0``). None (auto): one per GPU of the cluster
    when ``eval.use_gpu``, else 0."""
    use_gpu: bool | None = None
    """Evaluate on GPUs (each actor's base on its GPU; in the driver: ``cuda``). None: as ``ray.use_gpu``."""
    num_gpus: float = 1.0
    """GPUs reserved per evaluator actor; fractions (0.5) let two share one GPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per evaluator actor."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, batch_size=(1, None), max_new_tokens=(1, None), num_workers=(0, None),
                               num_gpus=(0, None, "open"), cpus_per_worker=(0, None))
        if self.threads < 0:
            raise ValueError(f"threads={self.threads!r} is out of range (expected >= 0)")
    threads: int = 0
    """Torch threads of the evaluating process (the Ray job's driver, idle while workers train); 0 = every CPU
    this process may use. A ``ray job submit`` driver otherwise inherits Ray's ``OMP_NUM_THREADS=1``."""


@dataclass(frozen=True)
class RayCfg:
    """How training jobs run. ``num_workers=0`` runs them in the calling process (no Ray)."""

    num_workers: int = 1
    """Ray Train workers per training job (data-parallel); 0 = train in the calling process, without Ray."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker (also its torch threads)."""
    use_gpu: bool = False
    """Train on GPUs: each worker's base and adapter on its GPU (``ray.train.torch.get_device()``), NCCL;
    also turns on the GPU defaults of ``base.dtype`` and the ``auto`` options of ``expert/router.train``."""
    gpus_per_worker: float = 1.0
    """GPUs reserved per training worker with ``use_gpu``; 0.5 lets a worker share its GPU with an evaluator
    actor (``eval.num_gpus=0.5``), so both keep the base resident on a one-GPU machine."""
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """``deepspeed`` = DeepSpeed ZeRO-2."""
    parallel_experts: bool = False
    """Train the independent experts of different tasks at the same time (one Ray Train run each)."""
    persistent_workers: bool = True
    """One Ray Train worker group for the whole run, handed each stage's jobs (a group start costs ~15 s per stage
    on 2 CPUs, ~40 s on a GPU node); it holds its resources between stages. Used by ``clsvc run`` unless
    ``parallel_experts``, or evaluator actors need the group's resources between stages (then a group per stage,
    as with ``false``); sweeps always start a group per stage. Results are the same either way."""
    max_failures: int = 2
    """Worker group failures a stage survives (-1: any number): the group restarts and each unfinished job resumes
    from its last resume point (Ray Train's ``FailureConfig``; with ``persistent_workers`` the driver counts them,
    also those of a group that failed between stages)."""
    checkpoint_every: int = 50
    """Steps between a job's resume points."""
    storage_path: str | None = None
    """Storage every training worker reaches (local folder, NFS mount, or s3://...): each job's resume points and
    its finished adapter on its way back to the driver's results folder, in a folder named after the job
    (``jobs/<name>-<job key>-...``), so that a rerun finds them; default: ``<out>/ray`` (one machine)."""
    stall_timeout_s: float = 1800.0
    """Seconds without progress after which the driver gives up, with a ``TimeoutError``: on a training run whose
    workers report nothing (no optimizer step, resume point or finished adapter; a worker group that cannot be
    scheduled reports nothing either), which is cancelled with its workers; on an evaluator actor whose base runs
    no forward pass (or that does not start, or take an adapter folder, within it). Not a bound on how long a job
    or an evaluation may take. Finished adapters and the last resume point stay in ``storage_path``: the same
    command run again resumes. Also how long a persistent worker group waits for its next stage before it ends
    (the next stage then starts a new one)."""
    poll_interval_s: float = 0.5
    """How often Ray Train's controller polls its workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's default
    2 s): a finished worker group is noticed up to one interval late, at every stage."""

    def __post_init__(self) -> None:
        _cfgload.check_ranges(self, num_workers=(0, None), cpus_per_worker=(0, None, "open"), gpus_per_worker=(0, None, "open"),
                               max_failures=(-1, None), checkpoint_every=(0, None),
                               stall_timeout_s=(0, None, "open"),
                               poll_interval_s=(0, None, "open"))


@dataclass(frozen=True)
class RunCfg:
    """One continual-learning run over a task stream."""

    name: str = "run"
    """The run's name (the metrics' benchmark label when the dataset names none)."""
    seed: int = 0
    """Seeds the generated data, the sample choices, the adapters' initialisation and the data order."""
    methods: tuple[str, ...] = ("mrlora", "mrlora_proto", "lora_ft", "lora_ft_replay", "oracle", "zero_shot")
    """CL methods to run and compare (``clsvc ls methods``)."""
    out: str = "runs/dcl-mini"
    """The results folder; rerunning with the same folder resumes (finished work is verified and skipped)."""
    data: DataCfg = field(default_factory=DataCfg)
    base: BaseCfg = field(default_factory=BaseCfg)
    expert: ExpertCfg = field(default_factory=ExpertCfg)
    router: RouterCfg = field(default_factory=RouterCfg)
    replay: ReplayCfg = field(default_factory=ReplayCfg)
    olora: OLoraCfg = field(default_factory=OLoraCfg)
    moelora: MoELoraCfg = field(default_factory=MoELoraCfg)
    clmoe: ClMoECfg = field(default_factory=ClMoECfg)
    modalprompt: ModalPromptCfg = field(default_factory=ModalPromptCfg)
    hide: HiDeCfg = field(default_factory=HiDeCfg)
    disco: DiscoCfg = field(default_factory=DiscoCfg)
    sefe: SefeCfg = field(default_factory=SefeCfg)
    keeplora: KeepLoraCfg = field(default_factory=KeepLoraCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    ray: RayCfg = field(default_factory=RayCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    """Scalars to watch while the run goes (TensorBoard by default; not part of any job key)."""


def load_run_cfg(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunCfg:
    return _cfgload.load(RunCfg, path, overrides)
