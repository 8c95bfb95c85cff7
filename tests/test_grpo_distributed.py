"""GRPO on 2 CPU processes (gloo) equals GRPO on 1 process (issue 5, acceptance 3).

Two processes are launched with ``torchrun`` (and, in the slow suite, ``accelerate launch --multi_gpu``, the
documented user path) on a localhost rendezvous; each runs ``tests/ddp_worker.py`` on a tiny SD3 pipeline
for 2 epochs (2 ranks x sample batch 4 x 2 batches = 16 samples, groups of 4). The same run on one process
(sample batch 8 x 2 batches) is the reference. The test checks, from the files each rank writes:

* the process group really had 2 ranks (MULTI_CPU / gloo), not two independent single-process jobs;
* the LoRA parameters are bitwise identical on both ranks after training (gradients were synchronised),
  moved away from their initial value, and close to the 1-process run's;
* the group advantages of the gathered global batch equal, bitwise, the 1-process trainer's advantages
  for the same global batch and the same rewards (and the rewards gathered by the trainer come back in
  global order);
* no two samples, on the same or on different ranks, start from the same initial latent or draw the same
  first-step noise, and each sample's noise is bitwise the 1-process run's for the same global id.

research/environment.md §4.1 has the launch traps this avoids (``accelerate launch --cpu`` starts one
process; a plain ``Accelerator()`` under ``--multi_gpu`` on CPUs runs two independent jobs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch
from grpo_helpers import run_config, save_tiny

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(ddp_worker.__file__).resolve()
WORLD = 2
LAUNCH_TIMEOUT_S = 300


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(launcher: str, port: int, worker_args: list) -> list:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
                "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER), *worker_args]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD}",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(WORKER), *worker_args]
    raise ValueError(launcher)


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)  # the worker must get there through make_accelerator, not the env
    return env


def _start(launcher: str, model: str, out: Path, results: Path, extra=()) -> subprocess.Popen:
    args = ["--model", model, "--out", str(out), "--results", str(results), "--world-size", str(WORLD),
            "--batch-size", "4", "--num-batches", "2", "--num-epochs", "2", *extra]
    return subprocess.Popen(_launch_cmd(launcher, _free_port(), args), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple:
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return None, output
    return proc.returncode, output


def _run_distributed(launcher: str, model: str, tmp: Path, reference, extra=()):
    """Launch the 2-process run, compute ``reference()`` (the 1-process run) while it runs, and return
    ``(rank records, reference result)``. A launch that dies by a signal or fails to bind its port is retried
    once (research/environment.md §4.1 saw one SIGABRT in 9 gloo launches on this machine)."""
    ref = None
    for attempt in range(2):
        results = tmp / f"results-{launcher}-{attempt}"
        proc = _start(launcher, model, tmp / f"run-{launcher}-{attempt}", results, extra)
        if attempt == 0:
            ref = reference()
        rc, output = _finish(proc)
        if rc == 0:
            break
        transient = rc is not None and any(s in output for s in ("SIGABRT", "exitcode  : -6", "EADDRINUSE",
                                                                 "address already in use"))
        if attempt == 1 or not transient:
            tail = "\n".join(output.splitlines()[-60:])
            pytest.fail(f"{launcher} launch of {WORLD} processes failed (rc={rc}, None = timeout after "
                        f"{LAUNCH_TIMEOUT_S}s):\n{tail}")
        print(f"warning: {launcher} launch failed transiently (rc={rc}); retrying once")
    files = sorted(results.glob("rank*.pt"))
    assert len(files) == WORLD, \
        f"expected {WORLD} rank files, got {[f.name for f in files]}:\n{output[-3000:]}"
    records = [torch.load(f, weights_only=False) for f in files]
    return sorted(records, key=lambda r: r["group"]["rank"]), ref


def _reference_run(model: str, out: Path):
    """The same run on one process: sample batch 8 x 2 batches = the same 16-sample global batch."""
    cfg = ddp_worker.config(model, str(out), batch_size=WORLD * 4, num_batches=2)
    return ddp_worker.train_recorded(cfg)


def _assert_pairwise_distinct(x: torch.Tensor, what: str) -> None:
    flat = x.reshape(x.shape[0], -1)
    same = (flat[:, None, :] == flat[None, :, :]).all(dim=-1)
    same.fill_diagonal_(False)
    pairs = same.nonzero().tolist()
    assert not pairs, f"{what}: rows {pairs[:6]} are identical"


def _check(records, trainer1, rec1) -> None:
    # ---- 1. the process group had 2 ranks (fail loudly on two independent 1-process jobs)
    for r, rec in enumerate(records):
        g = rec["group"]
        assert g["rank"] == r and g["num_processes"] == WORLD and g["dist_world_size"] == WORLD, g
        assert g["env_world_size"] == WORLD and g["distributed_type"].endswith("MULTI_CPU"), g
        assert g["backend"] == "gloo", g
        assert rec["world_size_seen_by_trainer"] == WORLD and rec["rank_seen_by_trainer"] == r

    # ---- 2. LoRA parameters identical across ranks after training
    lora0 = records[0]["lora"]
    assert lora0 and set(lora0) == set(records[1]["lora"]) == set(rec1["lora"])
    for k, v in lora0.items():
        assert torch.equal(v, records[1]["lora"][k]), f"LoRA {k} differs between ranks after training"

    seen = []
    assert all(len(rec["epochs"]) == 2 for rec in records) and len(rec1["epochs"]) == 2
    for e in range(2):
        eps = [rec["epochs"][e] for rec in records]
        one = rec1["epochs"][e]
        # same global sample order on both sides; each rank a contiguous, disjoint slice of it
        for ep in eps:
            assert torch.equal(ep["global_ids"], one["global_ids"])
            assert torch.equal(ep["global_groups"], one["global_groups"])
            assert ep["global_prompts"] == one["global_prompts"]
            assert torch.equal(ep["sample_ids"], ep["global_ids"][ep["start"]:ep["end"]]), \
                f"epoch {e}: a rank rolled out ids {ep['sample_ids'].tolist()}, " \
                f"not its slice {ep['start']}:{ep['end']} of the global ids"
        ids = torch.cat([ep["sample_ids"] for ep in eps])
        assert torch.equal(ids, one["sample_ids"]), (ids, one["sample_ids"])
        assert len(set(eps[0]["sample_ids"].tolist()) & set(eps[1]["sample_ids"].tolist())) == 0

        # ---- 3. noise: per sample id, equal to the 1-process run's; never shared between samples
        init = torch.cat([ep["init_latents"] for ep in eps])
        noise = torch.cat([ep["first_noise"] for ep in eps])
        assert init.shape[0] == noise.shape[0] == ids.numel()
        assert torch.equal(init, one["init_latents"]), f"epoch {e}: initial latents differ from 1 process's"
        assert torch.equal(noise, one["first_noise"]), f"epoch {e}: first-step noise differs from 1 process's"
        _assert_pairwise_distinct(torch.cat([init, noise]), f"epoch {e}: initial latents / first-step noise")

        # ---- 4. group advantages of the global batch == the 1-process trainer's on the same rewards
        rewards = torch.cat([ep["local_rewards"] for ep in eps])  # rank order = global order
        for ep in eps:
            assert torch.equal(ep["gathered_rewards"], rewards), "the gather did not restore the global order"
        adv2 = torch.cat([ep["advantages"] for ep in eps])
        keep2 = torch.cat([ep["keep"] for ep in eps])
        adv1, keep1, _ = trainer1._advantages(rewards, one["assignment"])
        assert torch.equal(adv2, adv1), f"epoch {e}: advantages differ from 1 process's\n{adv2}\n{adv1}"
        assert torch.equal(keep2, keep1)
        assert adv2.abs().sum() > 0, "all advantages are 0: the comparison would be vacuous"
        if e == 0:  # same weights, same noise: the 1-process run saw the same rewards and advantages
            torch.testing.assert_close(rewards, one["local_rewards"], rtol=0, atol=1e-4)
            torch.testing.assert_close(adv2, one["advantages"], rtol=0, atol=1e-3)
        seen.extend([init, noise])
    # all samples of both epochs on both ranks: no initial latent or first-step noise is ever drawn twice
    _assert_pairwise_distinct(torch.cat(seen), "initial latents / first-step noise of both epochs")

    # ---- 5. a real update happened, the same as on one process (same global batch, same optimizer steps;
    # not bitwise: the gradient is reduced in a different order)
    moved = max(float(v.abs().max()) for k, v in lora0.items() if "lora_B" in k)  # lora_B starts at 0
    assert moved > 1e-3, "training did not change the LoRA weights"
    for k, v in rec1["lora"].items():
        torch.testing.assert_close(lora0[k], v, rtol=0, atol=1e-3, msg=f"LoRA {k}: 2-process vs 1-process")


def test_two_cpu_processes_match_one_process(tmp_path):
    model = save_tiny(tmp_path)
    records, (trainer1, rec1) = _run_distributed("torchrun", model, tmp_path,
                                                 lambda: _reference_run(model, tmp_path / "run-1proc"))
    _check(records, trainer1, rec1)
    # ---- 6. the logged loss statistics are over every rank's minibatches (they were rank 0's), so both runs log
    # the same values: the same 16 samples per epoch in minibatches of equal size
    from diffalign.logging import read_metrics

    two = next(p for p in sorted(tmp_path.glob("run-torchrun-*")) if (p / "metrics.jsonl").is_file())
    rows1 = [r for r in read_metrics(tmp_path / "run-1proc" / "metrics.jsonl") if "train/loss" in r]
    rows2 = [r for r in read_metrics(two / "metrics.jsonl") if "train/loss" in r]
    assert len(rows1) == len(rows2) == 2
    for a, b in zip(rows1, rows2):
        for k in ("train/loss", "train/policy_loss", "train/ratio_mean", "train/clip_frac", "train/approx_kl"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])
    # (on-policy, the loss's mean over all 16 samples is 0; rank 0's two minibatches alone logged about -0.06)


def test_sigterm_to_one_rank_stops_both_after_the_same_epoch(tmp_path):
    """Under diffalign.interrupt.GracefulStop (``diffalign train``) rank 1 alone gets SIGTERM in epoch 1 of 3:
    both ranks stop after epoch 1 with the checkpoint of that epoch (no rank waits alone in a collective)."""
    from diffalign.checkpoint import load_checkpoint, resolve_resume

    model = save_tiny(tmp_path)
    records, _ = _run_distributed("torchrun", model, tmp_path, lambda: None,
                                  extra=["--num-epochs", "3", "--sigterm-rank", "1"])
    assert [rec["group"]["num_processes"] for rec in records] == [WORLD, WORLD]
    assert [(rec["stopped_by"], rec["epoch"], len(rec["epochs"])) for rec in records] == [(15, 1, 1)] * WORLD
    assert all(torch.equal(v, records[1]["lora"][k]) for k, v in records[0]["lora"].items())
    run = next(p for p in sorted(tmp_path.glob("run-torchrun-*")) if (p / "checkpoints").is_dir())
    state = load_checkpoint(resolve_resume(run, "latest"), rank=1, world_size=WORLD)
    assert state.counters["epoch"] == 1 and state.rng_state is not None  # rank 1's RNG file was written too


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(tmp_path):
    """The user's path: ``accelerate launch --multi_gpu --num_processes 2`` on CPUs (about 5 s more launch
    overhead than torchrun)."""
    model = save_tiny(tmp_path)
    records, (trainer1, rec1) = _run_distributed("accelerate", model, tmp_path,
                                                 lambda: _reference_run(model, tmp_path / "run-1proc"))
    _check(records, trainer1, rec1)


def _torchrun_diffalign(command: str, config: Path, nproc: int = WORLD) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC -m diffalign COMMAND CONFIG`` on a localhost rendezvous; asserts success."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "diffalign", command, str(config)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_diffalign_eval_on_two_processes_equals_one(tmp_path):
    """``diffalign eval`` under torchrun splits the evaluation prompts over the ranks in whole sampling batches (7
    prompts in batches of 2: rank 0 samples 4, rank 1 the other 3) and gathers the rewards; the main process
    writes ``eval.json``, equal to one process's. Before, every rank evaluated every prompt and wrote the file."""
    import json

    from diffalign.config import save_config
    from trainers.run import eval_main

    model = save_tiny(tmp_path)
    results = {}
    for name in ("one", "two"):
        cfg = run_config(model, tmp_path / name, prompts={"source": "shapes", "eval_size": 7},
                         model={"path": model, "device": "cpu", "lora": {"enabled": True, "rank": 4, "alpha": 8.0}},
                         sample={"batch_size": 2}, checkpoint={"every": 0, "resume_from": None})
        if name == "one":
            assert eval_main(cfg) == 0
        else:
            save_config(cfg, tmp_path / "eval.yaml")
            proc = _torchrun_diffalign("eval", tmp_path / "eval.yaml")
            assert proc.stdout.count('"eval/reward/jpeg_compressibility"') == 1  # printed by the main process only
        results[name] = json.loads((tmp_path / name / "eval.json").read_text())
    assert results["one"]["num_processes"] == 1 and results["two"]["num_processes"] == WORLD
    assert results["two"]["num_prompts"] == 7
    one = {k: v for k, v in results["one"].items() if k != "num_processes"}
    assert {k: v for k, v in results["two"].items() if k != "num_processes"} == one


def _sample_on_one_and_two_processes(tmp_path, model, nproc=WORLD, **overrides):
    """``diffalign sample`` on one process (in-process) and under torchrun on ``nproc`` (the same config file);
    returns the two output folders."""
    from diffalign.config import save_config
    from trainers.run import sample_main

    dirs = {}
    for name in ("one", "two"):
        cfg = run_config(model, tmp_path / name, model={"path": model, "device": "cpu"},
                         checkpoint={"every": 0, "resume_from": None}, **overrides)
        if name == "one":
            assert sample_main(cfg) == 0
        else:
            save_config(cfg, tmp_path / "sample.yaml")
            proc = _torchrun_diffalign("sample", tmp_path / "sample.yaml", nproc)
            assert proc.stdout.count("wrote ") == proc.stdout.count(".png")  # only the main process writes
        dirs[name] = tmp_path / name
    return dirs


def test_diffalign_sample_on_two_processes_equals_one(tmp_path):
    """Plain ``diffalign sample`` under torchrun: 7 prompts in batches of 2 (rank 0 samples 4, rank 1 3), the
    images and reward rows gathered in prompt order; the main process writes the same grid (byte for byte) and
    the same rewards as one process, with ``num_processes`` recorded. Before, it refused to run on 2."""
    import json

    dirs = _sample_on_one_and_two_processes(
        tmp_path, save_tiny(tmp_path), prompts={"source": "shapes", "eval_size": 7}, sample={"batch_size": 2},
        eval_rewards=[{"name": "colorfulness"}])
    one, two = (json.loads((dirs[k] / "samples_rewards.json").read_text()) for k in ("one", "two"))
    assert one.pop("num_processes") == 1 and two.pop("num_processes") == WORLD
    assert len(two["rewards"]) == 7 and two["names"] == ["jpeg_compressibility", "colorfulness"]
    assert two == one
    assert (dirs["two"] / "samples.png").read_bytes() == (dirs["one"] / "samples.png").read_bytes()


def test_guided_sample_on_three_processes_equals_one(tmp_path):
    """``diffalign sample`` with guidance under torchrun on 3 processes: 4 prompts in batches of 2 (ranks 0 and 1
    sample two each, rank 2 none), DOIT keeping every particle (``select: all``, 2 images per prompt) beside
    best-of-N and the unguided sampler, with a judge whose transform ranks within its batch (judged one sampling
    batch at a time on any number of processes). Per-image rewards, judge scores, evaluation counts and grids
    equal one process's (a prompt keeps its noise on any rank); only the wall times differ."""
    import json

    dirs = _sample_on_one_and_two_processes(
        tmp_path, save_tiny(tmp_path), nproc=3, prompts={"source": "shapes", "eval_size": 4},
        sample={"batch_size": 2}, eval_rewards=[{"name": "colorfulness", "transform": "rank"}],
        guidance={"method": "doob", "compare": ["none", "best_of_n"], "num_particles": 2, "num_candidates": 2,
                  "select": "all", "lookahead": "rollout", "keep_simulated": True})
    one, two = (json.loads((dirs[k] / "guidance_rewards.json").read_text()) for k in ("one", "two"))
    assert one.pop("num_processes") == 1 and two.pop("num_processes") == 3
    for rec in (one, two):
        for m in rec["methods"].values():
            assert m.pop("wall_s") > 0
    assert [len(two["methods"][m]["rewards"]) for m in ("none", "best_of_n", "doob")] == [4, 4, 8]
    assert two["methods"]["doob"]["reward_evals"] > two["methods"]["best_of_n"]["reward_evals"] > 0
    assert two == one
    for m in ("none", "best_of_n", "doob"):
        assert (dirs["two"] / f"samples_{m}.png").read_bytes() == (dirs["one"] / f"samples_{m}.png").read_bytes()


def test_commands_run_one_after_another_in_a_launched_process(tmp_path):
    """A Python caller under torchrun may run ``eval_main``, ``sample_main`` and ``eval_main`` in one process: the
    commands share the first one's process group, which ``_finish`` ends only at exit (ending it after each command
    failed the next one's first collective, and a new group cannot be formed on the same rendezvous)."""
    from diffalign.config import save_config

    model = save_tiny(tmp_path)
    cfg = run_config(model, tmp_path / "run", model={"path": model, "device": "cpu"}, sample={"batch_size": 2},
                     prompts={"source": "shapes", "eval_size": 3}, checkpoint={"every": 0, "resume_from": None})
    save_config(cfg, tmp_path / "run.yaml")
    script = tmp_path / "three.py"
    script.write_text(
        "import os, pathlib\n"
        "from diffalign.config import RunConfig, load_config\n"
        "from trainers.run import eval_main, sample_main\n"
        f"cfg = load_config(RunConfig, {str(tmp_path / 'run.yaml')!r})\n"
        "codes = (eval_main(cfg), sample_main(cfg), eval_main(cfg))\n"
        # one file per rank: the ranks' stdout lines interleave
        f"pathlib.Path({str(tmp_path)!r}, 'done-' + os.environ['RANK']).write_text('done %d %d %d' % codes)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)]
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this checkout's package
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(tmp_path / f"done-{r}").read_text() for r in range(WORLD)] == ["done 0 0 0"] * WORLD
