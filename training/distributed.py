"""Process-group plumbing for data-parallel training under ``torchrun``.

    torchrun --standalone --nproc_per_node 2 .venv/bin/ragrec train --config C --out D

torchrun starts one process per rank and sets RANK, WORLD_SIZE and LOCAL_RANK (plus
MASTER_ADDR/PORT) in each one's environment. ``process_group`` joins the group (gloo on CPU,
NCCL on CUDA with one GPU per process, ``cuda:LOCAL_RANK``) for the duration of a run.
With WORLD_SIZE unset or 1 no group is created and every helper here returns its input or
does nothing, so a single process runs the code it always ran.

The data-parallel recipe the trainers follow: every rank draws the same seeded global batch
plan, takes its contiguous 1/world slice of each global batch (``shard_batch``) and weights
its mean loss by ``Shard.weight``, so the average of the ranks' gradients is the gradient of
the global batch's mean loss.

Only rank 0 touches the run directory (it writes every file and, for ``--resume``, reads
the checkpoint and broadcasts it), so other machines need not see it. Limits: a failing
rank ends the run (torchrun stops the others); ranks waiting while rank 0 evaluates are
bound by the backend's collective timeout (default 30 min for gloo, 10 min for NCCL).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.data.batches import Batch

log = logging.getLogger(__name__)

T = TypeVar("T")


# ------------------------------------------------------------------ who am I


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # GPU index on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> World:
    """The world torchrun describes in the environment (a single process when it does not)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local)


def world() -> World:
    """This process's place in the joined group; World() (rank 0 of 1) outside one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=env_world().local_rank)


def active() -> bool:
    """True inside a process group of more than one rank."""
    return world().size > 1


def is_main() -> bool:
    """Rank 0 of the joined group, or, before/after one, of torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_world().is_main


# ------------------------------------------------------------------ set-up and teardown


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block and leave it afterwards.

    A no-op (yields the current world) with WORLD_SIZE unset or 1, or when the caller has
    already joined a group. device: the device the run asked for; its type picks the backend.
    """
    env = env_world()
    if env.size == 1 or dist.is_initialized():
        yield world()
        return
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    log.info("joined process group: rank %d of %d (%s)", env.rank, env.size, backend)
    try:
        yield world()
        # A DDP wrapper lives in reference cycles: collect it while its process group exists (freed
        # later, at exit, its reducer can abort the process), then leave the group together.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (cuda:LOCAL_RANK) when data-parallel on CUDA."""
    if device.type == "cuda" and active():
        return torch.device("cuda", world().local_rank)
    return device


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when data-parallel; return it unchanged otherwise.

    DDP broadcasts rank 0's parameters at construction, so the ranks start identical.
    """
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    if active():
        dist.barrier()


# ------------------------------------------------------------------ sharing values


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank. Tensors inside must be on the CPU."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_on_main(fn: Callable[[], T]) -> T:
    """Call ``fn`` on rank 0 only and hand its (picklable, CPU) result to every rank."""
    if not active():
        return fn()
    return broadcast_object(fn() if is_main() else None)


def broadcast_tensors(tensors: Sequence[torch.Tensor] | None, device: torch.device, src: int = 0
                      ) -> list[torch.Tensor]:
    """Rank ``src``'s tensors, on ``device``, on every rank (the others pass None).

    Shapes and dtypes travel first as one small object, then each tensor with the backend's
    own broadcast, so large arrays (bank keys) are not pickled.
    """
    if not active():
        assert tensors is not None
        return [t.to(device) for t in tensors]
    rank = dist.get_rank()
    meta = broadcast_object([(tuple(t.shape), t.dtype) for t in tensors] if rank == src else None, src=src)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for i, (shape, dtype) in enumerate(meta):
        if rank == src:
            assert tensors is not None
            buf = tensors[i].detach().to(comm).contiguous()
        else:
            buf = torch.empty(shape, dtype=dtype, device=comm)
        dist.broadcast(buf, src=src)
        out.append(buf.to(device))
    return out


def computed_on_main(fn: Callable[[], Sequence[torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """``fn()``'s tensors, computed on rank 0 only and broadcast to every rank (on ``device``).

    For work that must happen once per run, not once per rank (encoding a memory bank).
    """
    if not active():
        return list(fn())
    return broadcast_tensors(fn() if is_main() else None, device)


def sync_from_main(module: nn.Module | None = None, rng: np.random.Generator | None = None) -> None:
    """Overwrite this rank's ``module`` state (parameters and buffers) and ``rng`` state with rank 0's."""
    if not active():
        return
    if module is not None:
        state = list(module.state_dict().values())
        for t, got in zip(state, broadcast_tensors(state if is_main() else None, state[0].device), strict=True):
            t.copy_(got)
    if rng is not None:
        rng.bit_generator.state = broadcast_object(rng.bit_generator.state)


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every rank's arrays concatenated in rank order, one result per argument (for bookkeeping
    every rank must apply identically, such as per-entry usefulness updates)."""
    if not active():
        return arrays
    parts = gather_objects(arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Key-wise sum of every rank's ``values`` (keys may differ between ranks)."""
    if not active():
        return dict(values)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (a one-element list outside a group)."""
    if not active():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` in one flat buffer, in place.

    For models that are not wrapped in DDP. A parameter that got a gradient on some ranks but
    not on this one counts as zero here; one that got none anywhere keeps ``grad=None`` (so the
    optimizer skips it, as it would in one process).
    """
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    params = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of different lengths, with a gradient.

    Backward sums every rank's gradient for the gathered rows (each rank's loss may depend on
    all of them) and returns this rank's block: with an identical loss computed on every rank,
    that is world x the gradient, which DDP's averaging divides back out.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        rank = dist.get_rank()
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([part[:c] for part, c in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def gather_rows(x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order: (counts[r], ...) per rank -> (sum(counts), ...).

    counts: the row count of every rank, known to all (no collective is spent learning them).
    The result carries gradient back to each rank's own rows (see ``_GatherRows``).
    """
    if not active():
        return x
    counts = tuple(int(c) for c in counts)
    if len(counts) != dist.get_world_size() or counts[dist.get_rank()] != len(x):
        raise ValueError(f"counts {counts} do not match this rank's {len(x)} rows")
    if max(counts) == 0:
        return x
    return _GatherRows.apply(x, counts)


# ------------------------------------------------------------------ sharding a batch


def shard_bounds(n: int, world_size: int) -> np.ndarray:
    """(world + 1,) boundaries: rank r owns examples [b[r], b[r+1]) of a batch of n (sizes differ by <= 1)."""
    return np.arange(world_size + 1, dtype=np.int64) * n // world_size


@dataclass
class Shard:
    batch: Batch  # this rank's examples, with only the windows they use
    lo: int  # its slice [lo, hi) of the global batch's examples
    hi: int
    n_global: int  # examples in the global batch
    world_size: int

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @property
    def weight(self) -> float:
        """Factor on this rank's mean loss: averaging world gradients of
        (world · n_r / N) · mean_r gives the gradient of the global mean, even for uneven slices."""
        return self.world_size * self.size / self.n_global


def shard_batch(batch: Batch, rank: int, world_size: int) -> Shard:
    """Rank ``rank``'s contiguous slice of a global batch's examples.

    The batch is returned as is for world_size 1. A window whose examples straddle two slices
    is encoded by both ranks (at most world - 1 extra passes per batch). A rank whose slice
    is empty (a last batch smaller than the world) gets the batch's first example as a
    placeholder with weight 0: every rank still runs forward and backward, as DDP requires.
    """
    n = len(batch.rows)
    if world_size == 1:
        return Shard(batch, 0, n, n, 1)
    if n == 0:
        raise ValueError("cannot shard an empty batch")
    bounds = shard_bounds(n, world_size)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    take = slice(lo, hi) if hi > lo else slice(0, 1)
    units, local = np.unique(batch.rows[take], return_inverse=True)
    windows = batch.windows[units]
    width = int((windows > 0).sum(axis=1).max())
    local_batch = Batch(windows=windows[:, :width], rows=local.astype(np.int64), cols=batch.cols[take],
                        sample_index=batch.sample_index[take])
    return Shard(local_batch, lo, hi, n, world_size)
