#!/usr/bin/env bash
# One command for one H100/H200-class GPU: Qwen2.5-Coder-0.5B-Instruct (pip-shipped GGUF) trains
# on Search-R1 search on FanOutQA + the Wikipedia-summaries BM25 index. Format warm-up, EM before
# and after, then a GRPO arm and a GRPO + LLDS arm from the same warm model, EM after each
# (tools/real_run.py; configs/real_model.py holds the sizes). Writes $OUT/summary.{json,md}.
#
#   bash tools/accelerator_run.sh [OUT [real_run flags...]]   # OUT defaults to /tmp/llds_accel
#   bash tools/accelerator_run.sh /tmp/a --steps=16 --eval_limit=64 --eval_batch=64
#
# Needs: `pip install -e .` with a CUDA jax (`pip install -U "jax[cuda12]"`) and the assets of
# tools/fetch_assets.py (PyPI wheels; run it once where PyPI is reachable, then point
# LLDS_ASSETS at the copy). Measured once on one H200 (docs/real-model.md): a steady RL step
# takes 4.5 s, but that run passed 8 minutes because every new batch width recompiled the update
# (~35 s each); update widths and the rollout's cache now only grow.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/llds_accel}"
shift || true  # the rest goes to tools/real_run.py
MODEL="${MODEL:-qwen05b}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
MODEL="$MODEL" "$PY" - <<'PY'
import os
from configs import real_model
from llds_jax import assets
assets.asset_paths(require=[real_model.MODELS[os.environ["MODEL"]], "wiki_index",
                            "fanoutqa_train", "fanoutqa_test"])  # names a missing asset + fix
PY
# The stages compile the same programs again (four evaluations, two arms): a persistent cache
# turns the repeats into loads.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}"
"$PY" -c "import jax; print('devices:', jax.devices())"
start=$(date +%s)
set -o pipefail
"$PY" tools/real_run.py --model="$MODEL" --outdir="$OUT" --steps="${STEPS:-40}" \
    --eval_limit="${EVAL_LIMIT:-100}" "$@" 2>&1 | tee "$OUT/log.txt"
echo "accelerator_run: $(( $(date +%s) - start )) s in all; summary in $OUT/summary.md"
