"""How shared CLIP states travel between serving processes (Router -> Ingress -> Expert)."""

from __future__ import annotations

from typing import Any


def pack_states(t: Any) -> tuple:
    """Per-request CLIP states as they travel Router -> Ingress -> Expert: a CPU numpy buffer (bf16 viewed as
    int16) and the dtype name. The ingress never unpickles a torch tensor and no CUDA tensor leaves the
    replica that made it."""
    import torch

    t = t.detach().to("cpu").contiguous()
    name = str(t.dtype).removeprefix("torch.")
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), name


def unpack_states(parts: list, device: Any) -> Any:
    """The batch's states from :func:`pack_states` parts, on ``device``; None when any request has none."""
    if not parts or any(p is None for p in parts):
        return None
    import numpy as np
    import torch

    names = {name for _, name in parts}
    if len(names) != 1:
        raise ValueError(f"vision states of mixed dtypes {sorted(names)}")
    name = names.pop()
    t = torch.from_numpy(np.concatenate([a for a, _ in parts]))  # a fresh, writable array
    if name == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device)
