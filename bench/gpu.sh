#!/usr/bin/env bash
# The GPU measurements in one command, for a CUDA machine that has python3 with torch and
# transformers but neither this package nor its other dependencies (an offline GPU box):
#
#   bench/gpu.sh wheels          # on a machine with an index: the missing wheels (Python 3.12) into .whl/
#   bench/gpu.sh [OUTDIR]        # on the GPU machine, from the checkout (with .whl/ beside it):
#                                # results in OUTDIR (default bench/results/gpu)
#   ALLOW_CPU=1 PY=.venv/bin/python bench/gpu.sh /tmp/gpu   # a rehearsal of the same steps on a CPU
#
# It measures, with bench/projection.py on random layers of the real shapes (the cost depends on
# shapes only, so neither the model nor the calibration data need to travel):
#   1. SmolLM2-135M's layer at the SmolLM2 benchmarks' calibration (32 x 512 tokens), GPTQ and LoaQ
#      interleaved 5 times: LoaQ's quantization time over GPTQ's with the clean stream given;
#   2. the LLaMA-3-8B and LLaMA-3-70B layers at 128 x 2048 tokens: time per stage projected to the
#      whole model, and the measured peak device memory (the 70B layer's budget is 40 GB).
# About 4 minutes on an H100; each step writes its own JSON, so a step cut short loses only itself.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 transformers==5.24.0)

if [ "${1:-}" = wheels ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  exit 0
fi

OUTDIR=${1:-bench/results/gpu}
PY=${PY:-python3}
mkdir -p "$OUTDIR"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/loaq-site .whl/*.whl
  export PYTHONPATH=/tmp/loaq-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import loaq.engine" 2>/dev/null; then
  # Not installed: the checkout's folders as the loaq package (pyproject's package-dir).
  pkg=$(mktemp -d)
  mkdir "$pkg/loaq" && cp loaq/*.py "$pkg/loaq/"
  for d in quant models engine data evaluation stages flows store configs; do ln -s "$PWD/$d" "$pkg/loaq/$d"; done
  export PYTHONPATH=$pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
# ALLOW_CPU=1 rehearses the same steps on a CPU (projection.py scales the large shapes down there).
"$PY" -c "import os, torch; gpu = torch.cuda.is_available()
assert gpu or os.environ.get('ALLOW_CPU') == '1', 'no CUDA device (ALLOW_CPU=1 rehearses on the CPU)'
print(torch.__version__, torch.cuda.get_device_name() if gpu else 'cpu')" | tee "$OUTDIR/device.txt"
"$PY" bench/projection.py --shapes smollm2-135m --samples 32 --seqlen 512 --reps 5 \
  --out "$OUTDIR/projection_smollm2.json" | tee "$OUTDIR/log.txt"
"$PY" bench/projection.py --shapes llama3-8b --out "$OUTDIR/projection_8b.json" | tee -a "$OUTDIR/log.txt"
"$PY" bench/projection.py --shapes llama3-70b --out "$OUTDIR/projection_70b.json" | tee -a "$OUTDIR/log.txt"
