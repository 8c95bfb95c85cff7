#!/usr/bin/env bash
# The GRPO trainer at real scale on one GPU: an SD3.5-Medium-architecture pipeline (2.5 B MMDiT-X, CLIP-L, CLIP-G,
# T5-XXL, 16-channel VAE) with random weights, bfloat16, LoRA r32, gradient checkpointing, 512 px, 10 steps, CFG
# 4.5 (Flow-GRPO's recipe, configs/gpu/sd35m_geneval_flow_grpo.yaml; see scripts/bench_grpo.py --gpu-recipe).
# Prints the step time, the per-epoch time split, the peak GPU memory per epoch (epoch 2 against the last) and the
# rollout throughput of diffalign's sampler against the diffusers pipeline call on the same object.
#
#   scripts/bench_sd35m_gpu.sh ARCH_DIR [OUT_DIR] [extra bench_grpo.py arguments]
#
# ARCH_DIR: SD3.5-Medium's diffusers folder, or only its JSON files (model_index.json and each component's
# config.json / scheduler_config.json): no weights are read. OUT_DIR (default ./bench_sd35m) gets log.txt,
# bench.json and the run's metrics.jsonl. Needs diffusers and open-clip-torch importable (open_clip only for its
# bundled CLIP BPE file; it is not imported).
set -euo pipefail
arch=${1:?usage: $0 ARCH_DIR [OUT_DIR] [bench_grpo.py arguments]}
shift
out=bench_sd35m
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && [ "${1#*=}" = "$1" ]; then  # not an option, not a key=value override
  out=$1
  shift
fi
mkdir -p "$out"
arch=$(realpath "$arch"); out=$(realpath "$out")
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this benchmark is for a GPU'; \
print(torch.__version__, torch.cuda.get_device_name(), f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB')"
run_dir=$(mktemp -d)
python3 scripts/bench_grpo.py --arch "$arch" --gpu-recipe --epochs 4 --reps 3 --threads 0 \
    --json "$out/bench.json" --out "$run_dir" "$@" 2>&1 | tee "$out/log.txt"
if [ -f "$run_dir/metrics.jsonl" ]; then cp "$run_dir/metrics.jsonl" "$out/metrics.jsonl"; fi  # none with --skip-grpo
rm -rf "$run_dir"
