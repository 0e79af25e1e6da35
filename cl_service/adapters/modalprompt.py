"""ModalPrompt (Zeng et al., EMNLP 2025, "ModalPrompt: Dual-Modality Guided Prompt for Continual Learning of Large
Multimodal Models") as an adapter family: jobs of kind ``modalprompt``.

No LoRA: the decoder, the CLIP tower and the projector stay frozen. Each task ``t`` gets ``P`` prompt rows (vectors of
the token-embedding width ``H``) and a transform MLP ``Linear(H, H) -> SiLU -> Linear(H, F)``; the task's prototype
``p_t`` is the mean of its transformed rows (``F`` wide). A job of task ``t`` adds task ``t``'s rows and transform to
the earlier tasks' (loaded from ``job.init_adapter``, frozen) and trains only those: its rows are inserted right
after BOS in every training sample (:attr:`cl_service.models.mllm.MLLM.soft_prompt`), and the loss is

    answer loss + (1 - cos(image, p_t)) + (1 - cos(text, p_t))       (each a mean over the micro-batch)

At inference every request scores the tasks learned, ``s_t = 0.5 cos(image, p_t) + 0.5 cos(text, p_t)``, and the
top-1 task's rows are inserted after its BOS (:meth:`ModalPromptFamily.choose`, :meth:`ModalPromptFamily.prompt_rows`,
answered by :meth:`cl_service.engine.Engine.answer_prompted`).

Features. The reference compares CLIP's image embedding and CLIP's text embedding of the user turn, one 768-wide
joint space. Our bases have no CLIP text tower (the tiny ones no CLIP projection either), so the features are the
base's own, those of the nearest-neighbour router (:meth:`MLLM.routing_features`): the question run through the
decoder alone, its last hidden state mean-pooled over the question's tokens (text, ``H_t`` wide), and the mean CLIP
state of the sample's images (image, ``H_v`` wide). They live in two unrelated spaces, so the prototype spans both,
``F = H_t + H_v``, and each feature sits in its own block with zeros in the other: text ``[q, 0]``, image ``[0, v]``.
Then ``cos(text, p_t) = q . p_t[:H_t] / (|q| |p_t|)`` and ``cos(image, p_t) = v . p_t[H_t:] / (|v| |p_t|)``, and the
score is, up to a constant factor, the cosine between ``[q/|q|, v/|v|]`` and ``p_t``.

The training samples' features do not depend on what trains, so the preparation pass (:meth:`ModalPromptFamily.
prepare`) computes them once with the plain base and keeps them by content: each collated row's tokens and pixels
(:func:`row_keys`), which is what the batch loss sees.

Saved (``save``): ``adapter_model.safetensors`` with every task's rows and transform so far (``prompts.<i>``
``[P, H]``, ``transforms.<i>.{0,2}.{weight,bias}``, ``i`` the task's place in the stream) and ``modalprompt_config.json``
(the tasks, ``P``, the widths, the formulas), checksummed by the adapter registry. No peft form exists for it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cl_service.adapters.family import FAMILIES, Attached, JobData
from cl_service.models.mllm import MLLM

CONFIG = "modalprompt_config.json"
WEIGHTS = "adapter_model.safetensors"
ATTR = "modalprompt"


class PromptBank(torch.nn.Module):
    """Every learned task's prompt rows (``prompts[i]`` ``[P, H]``) and transform (``transforms[i]``), in stream
    order (``tasks``). Features are ``F = text_dim + image_dim`` wide (module docstring)."""

    def __init__(self, hidden: int, text_dim: int, image_dim: int, prompts: int) -> None:
        super().__init__()
        if prompts < 1:
            raise ValueError(f"modalprompt needs at least one prompt row per task, got {prompts}")
        self.hidden, self.text_dim, self.image_dim, self.n_prompts = hidden, text_dim, image_dim, prompts
        self.tasks: list[str] = []
        self.prompts = torch.nn.ParameterList()
        self.transforms = torch.nn.ModuleList()

    @property
    def feature_dim(self) -> int:
        return self.text_dim + self.image_dim

    def add(self, task: str, rows: torch.Tensor, gen: torch.Generator | None) -> int:
        """Task ``task`` with prompt rows ``rows`` ``[P, H]`` and a fresh transform (``nn.Linear``'s init
        distribution, drawn from ``gen``; None: left uninitialised, for saved weights to fill); its index."""
        if task in self.tasks:
            raise ValueError(f"modalprompt already holds prompts for task {task!r} (tasks {self.tasks})")
        if tuple(rows.shape) != (self.n_prompts, self.hidden):
            raise ValueError(f"prompt rows must be [{self.n_prompts}, {self.hidden}], got {tuple(rows.shape)}")
        H, Fd = self.hidden, self.feature_dim
        mlp = torch.nn.Sequential(torch.nn.utils.skip_init(torch.nn.Linear, H, H), torch.nn.SiLU(),
                                  torch.nn.utils.skip_init(torch.nn.Linear, H, Fd))
        with torch.no_grad():
            for lin in (mlp[0], mlp[2]) if gen is not None else ():
                bound = 1.0 / lin.in_features ** 0.5
                for p in (lin.weight, lin.bias):
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
        self.prompts.append(torch.nn.Parameter(rows.detach().to(torch.float32).clone()))
        self.transforms.append(mlp.to(torch.float32))
        self.tasks.append(task)
        return len(self.tasks) - 1

    def prototype(self, i: int) -> torch.Tensor:
        """Task ``i``'s prototype ``[F]``: the mean of its transformed prompt rows."""
        return self.transforms[i](self.prompts[i]).mean(0)

    def prototypes(self) -> torch.Tensor:
        """Every task's prototype ``[T, F]``."""
        return torch.stack([self.prototype(i) for i in range(len(self.tasks))])

    def spec(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "prompts": self.n_prompts, "hidden": self.hidden,
                "text_dim": self.text_dim, "image_dim": self.image_dim}

    def weights(self) -> dict[str, torch.Tensor]:
        """The saved layout: ``prompts.<i>``, ``transforms.<i>.<layer>.<weight|bias>`` (CPU copies)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}


def read_config(path: str | Path) -> dict[str, Any]:
    try:
        d = json.loads((Path(path) / CONFIG).read_text())
        spec = {k: d[k] for k in ("tasks", "prompts", "hidden", "text_dim", "image_dim")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} holds no readable ModalPrompt adapter ({CONFIG}): {e}") from None
    return spec


def load_bank(path: str | Path, mllm: MLLM) -> PromptBank:
    """The prompt bank saved at ``path`` (on the CPU, float32), checked against ``mllm``'s widths."""
    spec = read_config(path)
    widths = _widths(mllm)
    if (spec["hidden"], spec["text_dim"], spec["image_dim"]) != widths:
        raise ValueError(f"{path}: ModalPrompt widths (hidden, text, image) {(spec['hidden'], spec['text_dim'], spec['image_dim'])} "
                         f"do not match this base's {widths}")
    bank = PromptBank(*widths, prompts=int(spec["prompts"]))
    for task in spec["tasks"]:  # placeholders, filled from the saved tensors below
        bank.add(task, torch.zeros(bank.n_prompts, bank.hidden), None)
    saved = load_file(str(Path(path) / WEIGHTS))
    mine = bank.state_dict()
    if set(saved) != set(mine):
        diff = sorted(set(saved) ^ set(mine))
        raise ValueError(f"{path}: ModalPrompt tensors do not match {CONFIG} ({len(diff)} differ, e.g. {diff[0]})")
    for k, t in saved.items():
        if t.shape != mine[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, expected {tuple(mine[k].shape)}")
    bank.load_state_dict(saved)
    return bank


def _widths(mllm: MLLM) -> tuple[int, int, int]:
    """``(H, H_t, H_v)``: the token-embedding width, and the widths of the text and image routing features."""
    return (mllm.model.get_input_embeddings().weight.shape[1], mllm.hidden_size,
            int(mllm.model.config.vision_config.hidden_size))


# ---------------------------------------------------------------------------------------------- the mechanism
def blocks(features: torch.Tensor, text_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing features ``[B, H_t + H_v]`` (text, then image) as the two block vectors ``[B, F]`` the prototypes
    are compared with: text ``[q, 0]`` and image ``[0, v]``."""
    text, image = features.clone(), features.clone()
    text[:, text_dim:] = 0
    image[:, :text_dim] = 0
    return text, image


def alignment_loss(features: torch.Tensor, prototype: torch.Tensor, text_dim: int) -> torch.Tensor:
    """``mean(1 - cos(image, p)) + mean(1 - cos(text, p))`` over the rows of ``features`` ``[B, F]`` (the training
    task's prototype ``p`` ``[F]``): the loss term besides the answer loss."""
    text, image = blocks(features.to(prototype.dtype), text_dim)
    p = prototype[None]
    return (1 - F.cosine_similarity(image, p, dim=-1)).mean() + (1 - F.cosine_similarity(text, p, dim=-1)).mean()


def scores(features: torch.Tensor, prototypes: torch.Tensor, text_dim: int) -> torch.Tensor:
    """``s[b, t] = 0.5 cos(image_b, p_t) + 0.5 cos(text_b, p_t)``: ``[B, T]`` for features ``[B, F]`` and
    prototypes ``[T, F]``."""
    text, image = blocks(features.to(prototypes.dtype), text_dim)
    p = prototypes[None]  # [1, T, F]
    return 0.5 * F.cosine_similarity(image[:, None], p, dim=-1) + 0.5 * F.cosine_similarity(text[:, None], p, dim=-1)


def row_keys(mllm: MLLM, batch: dict[str, torch.Tensor]) -> list[str]:
    """One key per row of a collated batch: the digest of its attended tokens and its images' pixels (what a
    sample's routing features are a function of), so that the batch loss finds the features the preparation
    pass computed for the same sample."""
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    pixels = batch["pixel_values"].detach().to("cpu", torch.float32)
    keys, at = [], 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        n = int((row == mllm.image_token_id).sum()) // mllm.tokens_per_image
        h = hashlib.sha256(row.numpy().astype(np.int64).tobytes())
        h.update(pixels[at:at + n].contiguous().numpy().tobytes())
        keys.append(h.hexdigest())
        at += n
    if at != pixels.shape[0]:
        raise ValueError(f"the batch's image tokens name {at} images but it carries {pixels.shape[0]}")
    return keys


class FeatureTable:
    """Routing features of a job's training samples by :func:`row_keys` key."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._rows: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, keys: Sequence[str], features: torch.Tensor) -> None:
        for k, f in zip(keys, features):
            at = self._index.get(k)
            if at is None:
                self._index[k] = len(self._rows)
                self._rows.append(f.detach().to(torch.float32).cpu())
            elif not torch.equal(self._rows[at], f.to(torch.float32).cpu()):
                raise ValueError("two training samples have the same tokens and pixels but different features")

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        try:
            return torch.stack([self._rows[self._index[k]] for k in keys])
        except KeyError:
            raise KeyError("a training batch holds a sample the preparation pass did not see") from None


def training_features(mllm: MLLM, data: JobData) -> FeatureTable:
    """The plain base's routing features of all of a job's samples, by row key (:func:`row_keys`)."""
    table = FeatureTable()
    with torch.no_grad():
        for i in range(0, len(data.samples), data.batch_size):
            chunk = data.samples[i:i + data.batch_size]
            batch = data.collate(chunk, train=True)
            vs = mllm.vision_states(batch["pixel_values"])  # the batch's own pixels: decoded once
            table.add(row_keys(mllm, batch), mllm.routing_features(chunk, len(chunk), vision_states=vs))
    return table


# ---------------------------------------------------------------------------------------------- the family
class ModalPromptFamily:
    """Jobs of kind ``modalprompt`` (module docstring). Option: ``prompts`` (rows per task)."""

    name = "modalprompt"
    reuses_base = True  # nothing of the base changes: release drops the bank and the soft prompt

    def prepare(self, job, mllm: MLLM, data: JobData) -> FeatureTable:
        return training_features(mllm, data)

    def attach(self, job, mllm: MLLM, table: FeatureTable) -> Attached:
        if hasattr(mllm.model, ATTR):
            raise ValueError("the model already holds ModalPrompt prompts; release them first")
        # Settings of the LoRA families would be hashed into the job's key and then ignored here: refused.
        if job.lora is not None or job.moe_experts or job.orth_lambda or job.router_pool is not None:
            raise ValueError(f"job {job.name}: a modalprompt job trains soft prompts over the frozen base, no LoRA: "
                             f"lora, moe_experts, orth_lambda and router_pool must be unset")
        unknown = sorted(set(dict(job.options)) - {"prompts"})
        if unknown or job.option("prompts") is None:
            raise ValueError(f"job {job.name}: a modalprompt job takes the option 'prompts' (rows per task) and no "
                             f"other, got {dict(job.options)}")
        prompts = int(job.option("prompts"))
        if job.init_adapter:
            bank = load_bank(job.init_adapter, mllm)
            if bank.n_prompts != prompts:
                raise ValueError(f"{job.init_adapter} holds {bank.n_prompts} prompt rows per task, the job asks "
                                 f"for {prompts}")
        else:
            bank = PromptBank(*_widths(mllm), prompts=prompts)
        # Like the reference's new prompt tokens: each row starts as a copy of a random vocabulary row.
        gen = torch.Generator().manual_seed(job.seed * 1_000_003 + len(bank.tasks))
        table_rows = mllm.model.get_input_embeddings().weight
        pick = torch.randint(table_rows.shape[0], (prompts,), generator=gen)
        cur = bank.add(job.task, table_rows.detach()[pick.to(table_rows.device)].cpu(), gen)
        for p in mllm.model.parameters():
            p.requires_grad_(False)
        bank.requires_grad_(False)
        bank.to(mllm.device)
        setattr(mllm.model, ATTR, bank)  # a submodule: the optimizer, DDP and the resume checkpoint see it
        params = [bank.prompts[cur], *bank.transforms[cur].parameters()]
        for p in params:
            p.requires_grad_(True)
        rows = bank.prompts[cur]
        mllm.soft_prompt = lambda batch: rows[None].expand(batch["input_ids"].shape[0], -1, -1)

        def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            features = table.lookup(row_keys(mllm, batch)).to(rows.device)
            return alignment_loss(features, bank.prototype(cur), bank.text_dim)

        return Attached(params, batch_loss=batch_loss)

    def save(self, job, mllm: MLLM, folder: Path, attached: Attached) -> None:
        bank: PromptBank = getattr(mllm.model, ATTR)
        save_file(bank.weights(), str(Path(folder) / WEIGHTS), metadata={"format": "pt", "kind": "modalprompt"})
        (Path(folder) / CONFIG).write_text(json.dumps({
            "method": "modalprompt", **bank.spec(), "feature_dim": bank.feature_dim, "peft_compatible": False,
            "transform": "Linear(hidden, hidden) -> SiLU -> Linear(hidden, text_dim + image_dim)",
            "prototype": "task t: mean over its prompt rows of transform_t(row)",
            "features": "text: the question run through the decoder alone, mean-pooled over its tokens, as [q, 0]; "
                        "image: the mean CLIP state of the sample's images, as [0, v]",
            "score": "0.5 cos(image, prototype_t) + 0.5 cos(text, prototype_t); the top-1 task's rows are inserted "
                     "right after BOS",
            "tensors": "prompts.<i> [prompts, hidden]; transforms.<i>.0 / .2 the two Linears; i = the task's index",
        }, indent=2))

    def release(self, mllm: MLLM) -> None:
        mllm.soft_prompt = None
        if hasattr(mllm.model, ATTR):
            delattr(mllm.model, ATTR)

    # ------------------------------------------------------------------ answering (Engine.answer_prompted)
    def bank(self, mllm: MLLM, path: str | Path, cache: dict, verify: Callable[[Path], object] | None
             ) -> tuple[PromptBank, torch.Tensor]:
        """The frozen bank saved at ``path`` on ``mllm``'s device and its prototypes ``[T, F]``, loaded once per
        publication of the folder (``cache``: the engine's dict for this family)."""
        path = Path(path).resolve()
        weights = path / WEIGHTS
        key = f"{path}@{weights.stat().st_mtime_ns}" if weights.is_file() else None  # republished: load afresh
        hit = cache.get(key) if key is not None else None
        if hit is None:
            if verify is not None:
                verify(path)  # the registry's clear error for a missing, half-written or altered adapter
            bank = load_bank(path, mllm).to(mllm.device).eval().requires_grad_(False)
            with torch.no_grad():
                hit = (bank, bank.prototypes())
            if key is not None:
                cache[key] = hit
                for old in list(cache)[:-4]:  # a copy of the keys: other threads may load into the same dict
                    cache.pop(old, None)
        return hit

    def choose(self, mllm: MLLM, path: str | Path, features: np.ndarray | torch.Tensor, cache: dict,
               verify: Callable[[Path], object] | None) -> list[str]:
        """The task whose prompts answer each request: the top-1 of :func:`scores` over the tasks the adapter
        learned, for routing features ``[B, H_t + H_v]`` (:meth:`MLLM.routing_features`)."""
        bank, prototypes = self.bank(mllm, path, cache, verify)
        feats = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=mllm.device)
        if feats.dim() != 2 or feats.shape[1] != bank.feature_dim:
            raise ValueError(f"ModalPrompt scores routing features of width {bank.feature_dim}, got {tuple(feats.shape)}")
        with torch.no_grad():
            best = scores(feats, prototypes, bank.text_dim).argmax(-1).tolist()
        return [bank.tasks[i] for i in best]

    def prompt_rows(self, mllm: MLLM, path: str | Path, tasks: Sequence[str], cache: dict,
                    verify: Callable[[Path], object] | None) -> torch.Tensor:
        """Rows ``[B, P, H]`` to insert after each request's BOS: the prompts of its task ``tasks[b]``."""
        bank, _ = self.bank(mllm, path, cache, verify)
        unknown = sorted(set(tasks) - set(bank.tasks))
        if unknown:
            raise ValueError(f"{path} holds prompts for {bank.tasks}, not for {unknown}")
        return torch.stack([bank.prompts[bank.tasks.index(t)].detach() for t in tasks])

    def describe(self, path: str | Path) -> str:
        try:
            spec = read_config(path)
        except ValueError:
            spec = {}
        return (f"a ModalPrompt adapter ({spec.get('prompts')} prompt rows per task for tasks {spec.get('tasks')}, "
                f"chosen per request by prototype similarity and inserted after BOS): soft prompts over the frozen "
                f"base, no LoRA weights, so it has no peft or merged form (its folder, described by {CONFIG}, loads "
                f"in cl-service only)")


FAMILIES.register("modalprompt", ModalPromptFamily())
