#!/usr/bin/env python
"""``diffalign sample`` on one process against N processes: the same files, and how much sooner.

Runs ``python -m diffalign sample CONFIG output_dir=OUT/one OVERRIDES`` and then the same command under
``torchrun --nproc_per_node N`` (``output_dir=OUT/n``), each process with ``--threads`` threads, and prints both
wall times (the whole command: model loading included), the speed-up, and whether the outputs agree: every
``.png`` byte for byte, and the json files (``samples_rewards.json`` / ``guidance_rewards.json``) up to the
fields that must differ (``num_processes``, ``wall_s``). Exits 1 when they do not agree.

    python scripts/bench_sample_processes.py configs/shapes/flow_grpo.yaml --processes 2 -- \\
        checkpoint.resume_from=null prompts.eval_size=32 sample.batch_size=8 guidance.method=doob \\
        guidance.num_particles=4 guidance.num_candidates=4 guidance.lookahead=rollout guidance.keep_simulated=true \\
        "guidance.compare=[best_of_n]"

On 2 CPU cores (one thread per process) a run of N processes can at best be N times sooner; on N GPUs, about N
times sooner when the prompts fill whole batches on every GPU (``sample.batch_size`` x N divides the prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: json fields that differ between a run on one process and on several by design
VARYING = ("num_processes", "wall_s")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip(value):
    """``value`` without the :data:`VARYING` fields, at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _run(cmd, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed (rc={proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}"
                         f"\n{proc.stderr[-3000:]}")
    return wall


def differences(one: Path, many: Path) -> list:
    """What differs between two output folders (empty: the same images and records)."""
    found = []
    names = sorted({p.name for p in one.iterdir() if p.is_file()} | {p.name for p in many.iterdir() if p.is_file()})
    for name in names:
        a, b = one / name, many / name
        if not (a.is_file() and b.is_file()):
            found.append(f"{name}: only in {'one' if a.is_file() else 'many'}")
        elif name.endswith(".png") and a.read_bytes() != b.read_bytes():
            found.append(f"{name}: the images differ")
        elif name.endswith(".json") and _strip(json.loads(a.read_text())) != _strip(json.loads(b.read_text())):
            found.append(f"{name}: the records differ")
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for both runs (after --)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_intermixed_args(argv)  # the overrides may follow the options (after --)
    if args.processes < 2:
        raise SystemExit(f"--processes must be at least 2 (the baseline is one process), got {args.processes}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_sample_"))
    base = [str(Path(args.config).resolve()), *args.overrides]
    t_one = _run([sys.executable, "-m", "diffalign", "sample", *base, f"output_dir={out / 'one'}"], args.threads)
    t_many = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                   f"--nproc_per_node={args.processes}", "--master_addr", "127.0.0.1", "--master_port",
                   str(_free_port()), "-m", "diffalign", "sample", *base, f"output_dir={out / 'many'}"],
                  args.threads)
    for side in ("one", "many"):
        if not (out / side).is_dir():
            raise SystemExit(f"the {side} run wrote no files to {out / side} (check the command's overrides)")
    diff = differences(out / "one", out / "many")
    print(f"one process: {t_one:.1f} s; {args.processes} processes: {t_many:.1f} s; "
          f"speed-up {t_one / t_many:.2f}x ({args.threads} thread(s) per process)")
    print("outputs: the same images and records" if not diff else "outputs DIFFER:\n  " + "\n  ".join(diff))
    print(f"files in {out}")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
