#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine without network access whose image has Python 3.12,
# a CUDA torch, numpy, scipy, matplotlib, pyarrow, pandas, rich, click, pyyaml, httpx and the like, but not
# rbridge's other dependencies, nor the versions of transformers, accelerate and huggingface_hub a CPU
# install of rbridge gets (an older transformers there would test other code than users run).
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]      (default 3.12; writes .whl/, which git should ignore)
#
# Each package is fetched without its dependencies (--no-deps), pinned to what this checkout's own
# environment has where it has it, so that gpu_check.sh installs exactly these with --no-deps too: the set is
# what `import rbridge.cli, lm_eval.models.huggingface` loaded, less what such an image already holds
# (an NVIDIA H200 image of 2026-12: see docs/SPEED.md, "On a GPU"). lm-eval and its import-time needs are
# only for the scoring comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
pkgs=(optuna alembic mako colorlog sqlalchemy greenlet sqlmodel pydantic pydantic-core annotated-types
      typing-inspection zstandard transformers huggingface-hub accelerate kernels httpx2 httpcore2 truststore
      trio outcome sniffio pysocks chardet lm-eval datasets dill multiprocess pytz)
pinned=()
for p in "${pkgs[@]}"; do
    v=$(python3 -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$p")
    pinned+=("$p${v:+==$v}")
done
mkdir -p .whl
plat=()
for n in 17 24 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${plat[@]}" -d .whl "${pinned[@]}"
ls .whl | wc -l | xargs echo "wheels in .whl:"
du -sh .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo "note: add /.whl/ to .git/info/exclude (or .gitignore) so it is not committed"
