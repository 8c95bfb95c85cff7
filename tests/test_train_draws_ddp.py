"""Training draws are per sample, so 2 processes train like 1 (DiffusionNFT, and GRPO with random timesteps).

The trainers' training-time randomness (GRPO's ``timestep_selection=random`` steps; DiffusionNFT's timesteps and
forward noise) comes from one stream per global sample id (``trainers.common.TRAIN_SEED_STREAM``), not from a
per-rank generator whose draws follow the local sample order. The test launches this file with ``torchrun
--nproc_per_node 2`` (``accelerate launch --cpu`` would start ONE process, research/environment.md §4.1); each
rank trains two runs with one optimizer step per epoch on the same global batch as a 1-process run the test
computes in-process, and rank 0 saves its weights:

* DiffusionNFT with MARBLE full mode (its QP coefficients are compared too);
* GRPO with ``timestep_selection=random`` and ``shuffle=true``;
* GRPO with ``drop_zero_std_groups`` on a reward that ties some groups, where the ranks keep different numbers
  of samples (epoch 2: 4 and 2): the kept samples are weighed over the global update, not per rank.

Before per-sample streams the two sides differed by about the whole update (0.04 against update size 0.02).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GLOBAL_SAMPLES = 8
DROP_WORD = "circle"


def _configs(model: str, out: Path, world_size: int):
    """The two runs, with the per-process batch that makes the same global batch on ``world_size`` ranks."""
    from grpo_helpers import run_config
    from test_nft_trainer import REWARDS

    per = GLOBAL_SAMPLES // world_size
    no_ckpt = {"every": 0, "keep_last": 1, "resume_from": None}
    nft = run_config(model, out / "nft", trainer="nft", rewards=REWARDS, checkpoint=no_ckpt,
                     sample={"step": "flow_euler", "noise_level": 0.0, "group_size": 2, "batch_size": per,
                             "num_batches_per_epoch": 1},
                     train={"num_epochs": 2, "batch_size": per, "gradient_accumulation_steps": 1,
                            "kl_weight": 1e-2, "aggregation": "marble", "marble_mode": "full"})
    # the SDE window leaves the last step deterministic: its std is ~100x smaller, so its log-prob gradient
    # (~1/std^2) turns the batch-size-dependent rounding of the forward pass into visible differences; and a
    # smooth reward: JPEG size is a step function of the 8-bit pixels, so the first epoch's rounding difference
    # (~5e-6) flipped some of the second epoch's rewards and moved the result by ~40% of a step
    grpo = run_config(model, out / "grpo", rewards=[{"name": "colorfulness"}],
                      sample={"batch_size": per, "num_batches_per_epoch": 1, "group_size": 4, "window": [0, 3]},
                      train={"num_epochs": 2, "batch_size": per // 2, "gradient_accumulation_steps": 2,
                             "timestep_selection": "random", "timestep_fraction": 0.5, "shuffle": True},
                      checkpoint=no_ckpt)
    # drop_zero_std_groups with groups of 2 and a reward that ties the groups of some prompts: the ranks keep
    # different numbers of samples, and every kept sample of the global update must still weigh alike
    drop = run_config(model, out / "grpo_drop", rewards=[{"name": "plugins.reward_plugins:brightness_if",
                                                          "kwargs": {"word": DROP_WORD}}],
                      sample={"batch_size": per, "num_batches_per_epoch": 1, "group_size": 2, "window": [0, 3]},
                      train={"num_epochs": 2, "batch_size": per // 2, "gradient_accumulation_steps": 2,
                             "shuffle": True, "drop_zero_std_groups": True},
                      checkpoint=no_ckpt)
    return {"nft": nft, "grpo": grpo, "grpo_drop": drop}


def _train_all(model: str, out: Path, accelerator=None) -> dict:
    from trainers.grpo import GRPOTrainer
    from trainers.nft import NFTTrainer

    world = accelerator.num_processes if accelerator is not None else 1
    results = {}
    for name, cfg in _configs(model, out, world).items():
        trainer = (NFTTrainer if name == "nft" else GRPOTrainer)(cfg, accelerator)
        kept_local = []
        if name == "grpo_drop":  # record this rank's kept count per epoch (the test needs the ranks to differ)
            window_kept = trainer._window_kept

            def spy(minibatches, keep, accum):
                kept_local.append(int(keep.sum()))
                return window_kept(minibatches, keep, accum)

            trainer._window_kept = spy
        trainer.setup()
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        rec = {"lora": {k: v.detach().cpu().clone() for k, v in trainer.adapter.lora_state_dict().items()},
               "updates": trainer.global_step}
        if name == "nft":
            rec["alpha"] = torch.stack(trainer.alpha_history)
        if name == "grpo_drop":
            rec["kept_local"] = kept_local
        results[name] = rec
    return results


def _worker(model: str, out: str) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from trainers.run import make_accelerator

    acc = make_accelerator("cpu")
    assert acc.num_processes == 2, acc.num_processes
    results = _train_all(model, Path(out) / "two", acc)
    results["world_size"] = acc.num_processes
    torch.save(results, Path(out) / f"rank{acc.process_index}.pt")


def test_two_processes_train_like_one(tmp_path):
    from grpo_helpers import save_tiny

    model = save_tiny(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), model, str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = _train_all(model, tmp_path / "one")  # the 1-process reference, while the 2 ranks run
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert two[0]["world_size"] == two[1]["world_size"] == 2
    for name in ("nft", "grpo", "grpo_drop"):
        assert one[name]["updates"] == two[0][name]["updates"] == 2, name  # one optimizer step per epoch
        lora1, lora2 = one[name]["lora"], two[0][name]["lora"]
        moved = max(float(v.abs().max()) for k, v in lora1.items() if "lora_B" in k)  # lora_B starts at 0
        assert moved > 1e-3, f"{name}: training did not change the LoRA weights"
        for k, v in lora1.items():
            assert torch.equal(two[1][name]["lora"][k], lora2[k]), f"{name} {k}: ranks differ"
            # not bitwise: the gradient is summed in another order; a different draw moves it by ~moved
            torch.testing.assert_close(lora2[k], v, rtol=0, atol=moved * 1e-3, msg=f"{name} {k}: 2 vs 1 process")
    torch.testing.assert_close(two[0]["nft"]["alpha"], one["nft"]["alpha"], rtol=0, atol=1e-4)
    # the drop run tests something only if the ranks kept different numbers of samples in some epoch
    assert two[0]["grpo_drop"]["kept_local"] != two[1]["grpo_drop"]["kept_local"], two[0]["grpo_drop"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
