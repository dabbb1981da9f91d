"""What the teacher filter and negative mining share: loading the teacher, checking columns, and splitting work
across ``torch.distributed`` ranks (each rank computes its contiguous share, the parts are all-gathered so every rank
holds the same result)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def _load_model(model: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(model))
    return model


def _as_dataset(data: Any) -> Any:
    from datasets import Dataset

    if isinstance(data, Dataset):
        return data
    rows = [dict(row) for row in data]
    if not rows:
        raise ValueError("no rows given")
    return Dataset.from_list(rows)


def _check_columns(columns: Sequence[str], *needed: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise KeyError(f"column(s) {missing} not in the data (it has {list(columns)})")


# ---- ranks -----------------------------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(length: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` slice of ``length`` items that ``rank`` handles (sizes differ by at most 1)."""
    return length * rank // world, length * (rank + 1) // world


def _all_gather_rows(part: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Concatenate every rank's ``part`` (``sizes[r]`` rows from rank ``r``) in rank order, on every rank.

    Parts are padded to the largest size for ``all_gather`` (which needs equal shapes); the sizes are known to every
    rank (they come from :func:`_share`), so they are not exchanged. With NCCL the tensors travel through the GPU.
    """
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    width = max(sizes)
    padded = np.zeros((width, *part.shape[1:]), dtype=part.dtype)
    padded[: len(part)] = part
    local = torch.from_numpy(padded).to(device)
    gathered = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(gathered, local)
    return np.concatenate([g[:size].cpu().numpy() for g, size in zip(gathered, sizes)])


def _sharded(length: int, compute: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """``compute(start, stop)`` over ``[0, length)``, split across ranks when distributed; same result on every rank."""
    rank, world = _world()
    if world == 1:
        return compute(0, length)
    start, stop = _share(length, rank, world)
    sizes = [b - a for a, b in (_share(length, r, world) for r in range(world))]
    return _all_gather_rows(compute(start, stop), sizes)
