"""One code path for 1..N processes: repeat sampling of prompt groups, gather-then-slice, seeding.

The rules that make a multi-process run equal a one-process run (and avoid the reference
implementations' bugs, research/grpo_family.md §4 rows 9, 13):

* Every rank builds the same global list of ``num_prompts * K`` samples for an epoch (same seed), in a
  shuffled order, and takes its own contiguous slice. A prompt's K samples are spread over ranks.
* Each sample has a global id; its noise comes from a generator seeded by ``(seed, epoch, id)``
  (:func:`samplers.make_generators`), so no two samples share noise and the split does not matter.
* Rewards are gathered (in rank order, which restores the global order) before group statistics,
  every rank computes the same advantages, then slices its own part back.
* Gradients are averaged over ranks explicitly (:func:`all_reduce_gradients`) before clipping and
  the optimizer step, so LoRA parameters stay identical on every rank without wrapper tricks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["DistContext", "EpochAssignment", "repeat_assignment", "all_reduce_gradients", "seed_for"]


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (order matters); stable across processes and runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass
class DistContext:
    """What the math needs to know about the process group (built from an ``accelerate.Accelerator``)."""

    rank: int = 0
    world_size: int = 1
    gather_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    barrier_fn: Optional[Callable[[], None]] = None

    @classmethod
    def from_accelerator(cls, accelerator) -> "DistContext":
        if accelerator is None:
            return cls()
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.gather,
                   accelerator.wait_for_everyone)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` ``[n, ...]`` from every rank in rank order (identity on one process)."""
        if self.world_size == 1 or self.gather_fn is None:
            return tensor
        return self.gather_fn(tensor.contiguous())

    def gather_rows(self, tensor: torch.Tensor, device=None, *, chunk_rows: Optional[int] = None,
                    main_only: bool = False) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` ``[n_r, ...]`` in rank order when the ranks hold different numbers
        of rows (none at all included), on the CPU; the trailing dimensions and dtype must agree.

        The row counts travel first, then the rows padded to the largest count, ``chunk_rows`` at a time (so a
        collective holds at most ``world_size x chunk_rows`` rows; default: all at once), on ``device`` (NCCL
        needs the accelerator's). With ``main_only`` the other ranks keep nothing (an empty tensor): a large
        result (images) lives on the main process only."""
        if self.world_size == 1 or self.gather_fn is None:
            return tensor.cpu()
        device = tensor.device if device is None else device
        counts = self.gather(torch.tensor([tensor.shape[0]], device=device)).tolist()
        most = max(counts)
        step = max(1, most if chunk_rows is None else int(chunk_rows))
        keep = self.is_main or not main_only
        per_rank: List[List[torch.Tensor]] = [[] for _ in counts]  # each rank's rows, chunk by chunk
        for lo in range(0, most, step):
            width = min(step, most - lo)
            piece = tensor[lo:lo + width].to(device)
            rows = self.gather(torch.cat([piece, piece.new_zeros((width - piece.shape[0], *tensor.shape[1:]))]))
            if keep:
                rows = rows.cpu()
                for r, n in enumerate(counts):
                    per_rank[r].append(rows[r * width:r * width + max(0, min(n - lo, width))])
        if not keep or most == 0:
            return tensor.new_zeros((0, *tensor.shape[1:]), device="cpu")
        return torch.cat([rows for chunks in per_rank for rows in chunks])

    def barrier(self) -> None:
        if self.world_size > 1 and self.barrier_fn is not None:
            self.barrier_fn()


@dataclass
class EpochAssignment:
    """The samples of one epoch, globally and for this rank.

    Attributes:
        global_prompts: ``[N]`` prompts of every sample in global (shuffled) order, identical on all ranks.
        global_groups: ``[N]`` long group id of every sample (index of its prompt in the epoch).
        global_ids: ``[N]`` long global sample ids, unique across epochs (``first_id + position``; the trainers
            run them on from the previous epoch, ``epoch * N + position`` while ``N`` does not change).
        start, end: this rank's slice of the global order.
    """

    global_prompts: List[str]
    global_groups: torch.Tensor
    global_ids: torch.Tensor
    start: int
    end: int

    @property
    def prompts(self) -> List[str]:
        return self.global_prompts[self.start:self.end]

    @property
    def sample_ids(self) -> List[int]:
        return self.global_ids[self.start:self.end].tolist()

    @property
    def groups(self) -> torch.Tensor:
        return self.global_groups[self.start:self.end]


def repeat_assignment(
    epoch_prompts: Sequence[str],
    group_size: int,
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    shuffle: bool = True,
    first_id: Optional[int] = None,
) -> EpochAssignment:
    """Repeat each prompt ``group_size`` times, shuffle globally with ``(seed, epoch)``, slice for ``rank``.

    ``len(epoch_prompts) * group_size`` must be divisible by ``world_size``. The epoch's global sample ids are
    ``first_id ..`` (default ``epoch x samples per epoch``; the trainers continue from the previous epoch's last).
    """
    n = len(epoch_prompts) * group_size
    if n % world_size:
        raise ValueError(
            f"{len(epoch_prompts)} prompts x group_size {group_size} = {n} samples cannot be split evenly over "
            f"{world_size} processes; change sample.batch_size, sample.group_size or num_batches_per_epoch"
        )
    groups = np.repeat(np.arange(len(epoch_prompts)), group_size)
    order = np.random.default_rng(seed_for(seed, epoch, 17)).permutation(n) if shuffle else np.arange(n)
    groups = groups[order]
    per_rank = n // world_size
    first = epoch * n if first_id is None else first_id
    return EpochAssignment(
        global_prompts=[epoch_prompts[g] for g in groups],
        global_groups=torch.from_numpy(groups).long(),
        global_ids=torch.arange(first, first + n, dtype=torch.long),
        start=rank * per_rank,
        end=(rank + 1) * per_rank,
    )


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Average ``.grad`` of ``params`` over all ranks in one flat all-reduce (no-op on one process).

    Parameters without a gradient contribute zeros, so every rank issues the same collective.
    """
    if world_size <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n
