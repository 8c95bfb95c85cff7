"""Worker for the multi-process GRPO test (tests/test_grpo_distributed.py); also usable in-process.

Run under ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``::

    python tests/ddp_worker.py --model TINY_SD3_DIR --out RUN_DIR --results RESULTS_DIR --world-size N \
        --batch-size 4 --num-batches 2

Each rank builds the GRPO trainer on the model, trains with the recording hooks of :func:`instrument`
and writes ``RESULTS_DIR/rank{r}.pt`` with what the test compares: the process group it saw, the LoRA
weights after training, and per epoch its samples' initial latents and first-step noise (by global
sample id), its local rewards, the rewards gathered by the trainer's own gather, and the advantages the
trainer computed for its slice.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # grpo_helpers, also when imported elsewhere


def config(model: str, out: str, *, batch_size: int, num_batches: int, num_epochs: int = 2):
    """The run both the N-process and the 1-process side use; only the per-process batch differs.

    One optimizer step per epoch (train minibatch = sample batch, accumulation over all of this process'
    minibatches), so both sides take the same number of steps on the same global batch.
    """
    from grpo_helpers import run_config

    return run_config(
        model, out,
        sample={"batch_size": batch_size, "num_batches_per_epoch": num_batches, "group_size": 4},
        train={"num_epochs": num_epochs, "batch_size": batch_size,
               "gradient_accumulation_steps": num_batches},
        checkpoint={"every": 0, "keep_last": 1, "resume_from": None},
    )


@contextlib.contextmanager
def instrument(trainer) -> Dict:
    """Record per epoch what the distributed test compares (see the module docstring).

    Wraps ``trainers.common.sample_batch`` (initial latents, and the first noise each rollout draws,
    captured at ``samplers.steps.randn``) and ``trainer._advantages`` (inputs and outputs). Everything is
    restored on exit.
    """
    import samplers.steps as steps_mod
    import trainers.common as common

    record: Dict[str, List] = {"epochs": []}
    orig_sample_batch, orig_randn = common.sample_batch, steps_mod.randn
    orig_adv = trainer._advantages
    pending: Dict[str, List] = {"ids": [], "init": [], "noise": []}

    def sample_batch(adapter, prompts, sample_ids, **kw):
        sample_ids = list(sample_ids)
        first: List[torch.Tensor] = []

        def randn(shape, generator, device):
            z = orig_randn(shape, generator, device)
            if not first:
                first.append(z.detach().cpu().clone())
            return z

        steps_mod.randn = randn
        try:
            traj, cond, images, schedule = orig_sample_batch(adapter, prompts, sample_ids, **kw)
        finally:
            steps_mod.randn = orig_randn
        if not first:  # a deterministic rollout (evaluation): nothing to compare
            return traj, cond, images, schedule
        pending["ids"].extend(sample_ids)
        pending["init"].append(traj.latents[:, 0].detach().cpu().clone())
        pending["noise"].append(first[0])
        return traj, cond, images, schedule

    def advantages(local_rewards, assignment):
        # the same gather the trainer uses, issued on every rank, so the test can check its order
        gathered = trainer.dist.gather(local_rewards.to(trainer.device)).cpu()
        adv, keep, stats = orig_adv(local_rewards, assignment)
        record["epochs"].append({
            "sample_ids": torch.tensor(pending["ids"], dtype=torch.long),
            "init_latents": torch.cat(pending["init"]),
            "first_noise": torch.cat(pending["noise"]),
            "local_rewards": local_rewards.detach().cpu().clone(),
            "gathered_rewards": gathered,
            "advantages": adv.detach().cpu().clone(),
            "keep": keep.detach().cpu().clone(),
            "global_ids": assignment.global_ids.clone(),
            "global_groups": assignment.global_groups.clone(),
            "global_prompts": list(assignment.global_prompts),
            "start": assignment.start,
            "end": assignment.end,
            "assignment": assignment,
        })
        for v in pending.values():
            v.clear()
        return adv, keep, stats

    common.sample_batch = sample_batch
    trainer._advantages = advantages
    try:
        yield record
    finally:
        common.sample_batch = orig_sample_batch
        steps_mod.randn = orig_randn
        trainer._advantages = orig_adv


def train_recorded(cfg, accelerator=None, sigterm_rank=None):
    """Set up and train a GRPO trainer under :func:`instrument`; returns ``(trainer, record)``.

    ``sigterm_rank``: train under :class:`diffalign.interrupt.GracefulStop` (as ``diffalign train`` does), and
    that rank sends itself SIGTERM in its first epoch (after sampling); ``record["stopped_by"]`` / ``["epoch"]``
    say where each rank stopped."""
    import signal

    from diffalign.interrupt import GracefulStop
    from trainers.grpo import GRPOTrainer

    trainer = GRPOTrainer(cfg, accelerator)
    trainer.setup()
    stop = GracefulStop(announce=False) if sigterm_rank is not None else contextlib.nullcontext()
    with instrument(trainer) as record, stop:
        if sigterm_rank == trainer.dist.rank:
            recorded = trainer._advantages

            def advantages(*args):
                if not record["epochs"]:
                    signal.raise_signal(signal.SIGTERM)
                return recorded(*args)

            trainer._advantages = advantages
        try:
            trainer.train()
        finally:
            trainer.cleanup()
    record["lora"] = {k: v.detach().cpu().clone() for k, v in trainer.adapter.lora_state_dict().items()}
    record.update(stopped_by=getattr(trainer, "stopped_by", None), epoch=trainer.epoch)
    return trainer, record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="run output dir (per rank: the trainer writes from rank 0)")
    p.add_argument("--results", required=True)
    p.add_argument("--world-size", type=int, required=True, help="expected number of processes")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--num-epochs", type=int, default=2)
    p.add_argument("--sigterm-rank", type=int, default=None, help="this rank sends itself SIGTERM in epoch 1")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from accelerate.utils import DistributedType

    from trainers.run import make_accelerator

    acc = make_accelerator("cpu")
    import torch.distributed as dist

    group = {
        "rank": acc.process_index,
        "num_processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "env_world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    if acc.num_processes != args.world_size or (args.world_size > 1 and acc.distributed_type
                                                != DistributedType.MULTI_CPU):
        raise SystemExit(f"expected {args.world_size} processes under MULTI_CPU, got {group}")

    cfg = config(args.model, args.out, batch_size=args.batch_size, num_batches=args.num_batches,
                 num_epochs=args.num_epochs)
    trainer, record = train_recorded(cfg, acc, sigterm_rank=args.sigterm_rank)
    for ep in record["epochs"]:
        ep.pop("assignment")  # plain tensors and lists only in the file
    record.update(group=group, seconds=time.perf_counter() - t0,
                  world_size_seen_by_trainer=trainer.dist.world_size, rank_seen_by_trainer=trainer.dist.rank)
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"rank{acc.process_index}.pt")
    torch.save(record, path + ".tmp")
    os.replace(path + ".tmp", path)
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
