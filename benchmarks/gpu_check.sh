#!/usr/bin/env bash
# One GPU, at most 9 minutes: is rbridge fast there, and does the 1B preset go through end to end?
#
#   bash benchmarks/gpu_check.sh [PHASE ...]   (from the repository root, on a machine with one NVIDIA GPU)
#
# PHASE: 1, 1b, 2, 3 or 4 (default: all, in the order 1 1b 4 3 2); setup always runs.
#
# 1. Training: every preset from 2M to 1B, bf16, a few dozen steps each through ProxyTrainer:
#    tokens/s and MFU against the GPU's data-sheet peak (benchmarks/proxy_throughput.py).
# 1b. rbridge's trainer at auto, fp32 and bf16 against a plain PyTorch loop (fp32, bf16 autocast) on the
#    GPU, and against the alternatives it chose between (transformers' loss, multi-tensor AdamW).
# 2. Scoring: a 150M proxy (a 135M-class model; random weights, throughput does not depend on them)
#    on the 200 GSM8K traces of specs/traces, whole process, rbridge score against lm-eval
#    (benchmarks/score_throughput.py --whole-process), skipped when lm-eval is not installed.
# 3. A 2-candidate plan (benchmarks/gpu_plan.yaml, runs_per_gpu: 4): four local processes share the GPU.
# 4. The 1B preset end to end on the GPU (benchmarks/big_proxy.py --device cuda): build, train at
#    micro_batch_size 1, checkpoint, SIGKILL, resume, score 20 traces, export, rbridge score the export;
#    peak host and GPU memory, checkpoint size, seconds per step, and live vs exported scores.
#
# Needs python3 with torch (CUDA). rbridge's other dependencies, and versions of transformers,
# accelerate and huggingface_hub that match a CPU install's, come from wheels in .whl/ when that
# folder exists (a machine without network access), installed with --no-deps into /tmp/site, which
# goes first on PYTHONPATH: a python3 that is itself a virtual environment (as on some GPU images)
# would not pass its torch to a `venv --system-site-packages`. Make .whl where pip has network access with
# `bash benchmarks/gpu_wheels.sh` (the packages that image lacked; 29 wheels, 43 MB).
# Every phase has its own time limit, so one that fails or hangs leaves the others their time.
# Everything printed is also written to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rbridge-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
PHASES=" ${*:-1 1b 4 3 2} "
want() { [[ "$PHASES" == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

stamp "setup"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "WARNING: Running pip as"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, accelerate, huggingface_hub, optuna, sqlmodel, pydantic, rbridge.cli
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'hub', huggingface_hub.__version__, 'optuna', optuna.__version__,
      torch.cuda.get_device_name())"
nproc; free -g | head -2; df -h /tmp | tail -1
export RBRIDGE_CACHE=/tmp/rbridge-gpu-cache

if want 1; then
    stamp "1. training throughput and MFU, bf16, every preset"
    timeout 110 python3 benchmarks/proxy_throughput.py --presets 2M 8M 60M 150M 400M 1B --threads 4 \
        --precisions bf16 --variants rbridge --batch-size 32 --seconds 1 --steps 24
fi
if want 1b; then
    stamp "1b. rbridge at auto, fp32 and bf16 against a plain loop and the alternatives"
    timeout 120 python3 benchmarks/proxy_throughput.py --presets 8M 60M 400M --threads 4 --precisions auto fp32 bf16 \
        --variants rbridge plain hf-loss foreach-adamw --batch-size 32 --seconds 1 --steps 24
fi

if want 4; then
    stamp "4. the 1B preset end to end: train, checkpoint, kill, resume, score, export, rescore"
    # 40 steps: a GPU step of 2 x 256 tokens takes about 0.1 s, and child A must still be training when killed
    timeout 190 python3 benchmarks/big_proxy.py --preset 1B --device cuda --steps 40 --kill-at 2 \
        --micro-batch-size 1 --traces 20 --workdir /tmp/rbridge-big-proxy-1B
fi

if want 3; then
    stamp "3. a 2-candidate plan, runs_per_gpu: 4"
    timeout 90 rbridge plan benchmarks/gpu_plan.yaml --store /tmp/rbridge-gpu-check.db
    rbridge status --store /tmp/rbridge-gpu-check.db | head -40
fi

if want 2; then
    stamp "2. scoring, whole process, against lm-eval"
    tok=$(ls -d $RBRIDGE_CACHE/tokenizers/*/tokenizer.json /tmp/rbridge-big-proxy-1B/cache/tokenizers/*/tokenizer.json \
          2>/dev/null | head -1)
    if [ -z "$tok" ]; then  # no plan ran: a tokenizer of the plan's own kind, trained on the reasoning corpus
        python3 -c "from pathlib import Path; from rbridge.data import train_tokenizer
from rbridge.data.sources import SourceConfig
train_tokenizer([SourceConfig(name='cot', path=Path('specs/data/cot.jsonl.gz'))], 8192, Path('$RBRIDGE_CACHE'))"
        tok=$(ls -d $RBRIDGE_CACHE/tokenizers/*/tokenizer.json | head -1)
    fi
    if python3 -c "import lm_eval.models.huggingface" 2>/dev/null; then
        timeout 100 python3 benchmarks/score_throughput.py --whole-process --proxy 150M --model "$(dirname "$tok")" \
            --limit 200
    else
        python3 -c "import lm_eval.models.huggingface" 2>&1 | tail -2
        echo "lm-eval does not import: scoring compared with nothing (carry its wheels in .whl/)"
    fi
fi
stamp "done"
