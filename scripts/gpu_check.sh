#!/usr/bin/env bash
# Every trainer, a few training steps and evaluations in fp32, fp16 and amp at real ViT-B/16 size
# (random weights), one PASS/FAIL line each; a thin wrapper around `python -m spotlighter.gpucheck`.
#   scripts/gpu_check.sh [--device cuda|cpu] [--size vit_b16|vit_l14|vit_l14_336|tiny] [--steps 3] [--batch 4]
#       [--precisions fp32,fp16,amp] [--trainers CoOp,MaPLe,...]
# Without CUDA it prints one SKIP line and exits 0 (--device cpu runs what CPU kernels support).
# Exit status 1 if any line fails. PYTHON selects the interpreter (default: python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m spotlighter.gpucheck "$@"
