"""MARBLE under 2-process DDP (gloo on CPU): both ranks solve the same QP and keep identical parameters.

The test launches this file with ``torchrun --nproc_per_node 2`` (``accelerate launch --cpu`` would start ONE
process, research/environment.md §4.1); each rank trains 2 epochs of MARBLE full mode and saves its QP
coefficients and LoRA weights, which the test compares bitwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _worker(model: str, out: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from test_nft_trainer import REWARDS, nft_config

    from trainers.nft import NFTTrainer
    from trainers.run import make_accelerator

    acc = make_accelerator("cpu")
    assert acc.num_processes == 2, acc.num_processes
    # three rewards: two normalised gradients always give the coefficients (1/2, 1/2), on any rank
    cfg = nft_config(model, Path(out) / "run", {"num_epochs": 2, "aggregation": "marble", "marble_mode": "full"},
                     rewards=REWARDS + [{"name": "colorfulness"}])
    trainer = NFTTrainer(cfg, acc)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    torch.save({"world_size": acc.num_processes, "alpha": torch.stack(trainer.alpha_history),
                "alpha_bar": trainer.harmonizer.alpha_bar, "lora": trainer.adapter.lora_state_dict(),
                "old": trainer.old.shadow}, Path(out) / f"rank{acc.process_index}.pt")


def test_marble_ddp_two_ranks_identical(tmp_path):
    from grpo_helpers import save_tiny

    model = save_tiny(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), model, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["alpha"].shape == (2, 3)  # one QP per optimizer step, K = 3 rewards
    assert (r0["alpha"] - 1 / 3).abs().max() > 1e-3  # solutions that depend on the gradients
    assert torch.equal(r0["alpha"], r1["alpha"]) and torch.equal(r0["alpha_bar"], r1["alpha_bar"])
    for k in r0["lora"]:
        assert torch.equal(r0["lora"][k], r1["lora"][k]), k
    assert any(v.abs().sum() > 0 for k, v in r0["lora"].items() if "lora_B" in k)
    for a, b in zip(r0["old"], r1["old"]):
        assert torch.equal(a, b)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
