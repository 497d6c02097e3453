#!/usr/bin/env bash
# One GPU, at most 9 minutes: is rbridge fast there, and does the 1B preset go through end to end?
#
#   bash benchmarks/gpu_check.sh          (from the repository root, on a machine with one NVIDIA GPU)
#
# 1. Training: every preset from 2M to 1B, bf16, a few dozen steps each through ProxyTrainer:
#    tokens/s and MFU against the GPU's data-sheet peak (benchmarks/proxy_throughput.py).
# 2. Scoring: a 150M proxy (a 135M-class model; random weights, throughput does not depend on them)
#    on the 200 GSM8K traces of specs/traces, whole process, rbridge score against lm-eval
#    (benchmarks/score_throughput.py --whole-process), skipped when lm-eval is not installed.
# 3. A 2-candidate plan (benchmarks/gpu_plan.yaml, runs_per_gpu: 4): four local processes share the GPU.
# 4. The 1B preset end to end on the GPU (benchmarks/big_proxy.py --device cuda): build, train at
#    micro_batch_size 1, checkpoint, SIGKILL, resume, score 20 traces, export, rbridge score the export;
#    peak host and GPU memory, checkpoint size, seconds per step, and live vs exported scores.
#
# Needs python3 with torch (CUDA), transformers and accelerate; rbridge's other dependencies are
# installed from wheels in .whl/ when that folder exists (a machine without network access: download
# them elsewhere with `pip download --only-binary=:all: --python-version 3.12 -d .whl optuna sqlmodel
# pydantic pyyaml pyarrow zstandard lm-eval`). Everything printed is also written to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rbridge-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }

stamp "setup"
python3 -m venv --system-site-packages /tmp/rbridge-venv && . /tmp/rbridge-venv/bin/activate
if [ -d .whl ]; then pip install -q --no-index --find-links .whl .whl/*.whl; fi
pip install -q --no-deps --no-build-isolation -e . || pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
export RBRIDGE_CACHE=/tmp/rbridge-gpu-cache

stamp "1. training throughput and MFU, bf16"
timeout 150 python3 benchmarks/proxy_throughput.py --presets 2M 8M 20M 60M 150M 400M 1B --threads 4 \
    --precisions bf16 --variants rbridge --batch-size 32 --seconds 1 --steps 24
timeout 40 python3 benchmarks/proxy_throughput.py --presets 60M --threads 4 --precisions bf16 \
    --variants rbridge hf-loss foreach-adamw --batch-size 32 --seconds 1 --steps 24

stamp "3. a 2-candidate plan, runs_per_gpu: 4"
timeout 100 rbridge plan benchmarks/gpu_plan.yaml --store /tmp/rbridge-gpu-check.db
rbridge status --store /tmp/rbridge-gpu-check.db | head -40

stamp "2. scoring, whole process, against lm-eval"
tok=$(dirname "$(ls -d $RBRIDGE_CACHE/tokenizers/*/tokenizer.json | head -1)")
if python3 -c "import lm_eval" 2>/dev/null; then
    timeout 100 python3 benchmarks/score_throughput.py --whole-process --proxy 150M --model "$tok" --limit 200
else
    echo "lm-eval is not installed: scoring compared with nothing (carry its wheels in .whl/)"
fi

stamp "4. the 1B preset end to end: train, checkpoint, kill, resume, score, export, rescore"
timeout 240 python3 benchmarks/big_proxy.py --preset 1B --device cuda --steps 4 --kill-at 2 \
    --micro-batch-size 1 --traces 20 --workdir /tmp/rbridge-big-proxy-1B
stamp "done"
