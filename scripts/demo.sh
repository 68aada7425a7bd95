#!/usr/bin/env bash
# The main job on the default model: RTN int4 g128 of SmolLM2-135M, WikiText-2 perplexity before/after.
# WINDOWS=16 (default) scores the first 16 of the 148 2048-token windows (~4 min on 2 cores);
# WINDOWS=all scores the whole test split (~30 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
W=${WINDOWS:-16}
extra=()
[ "$W" != "all" ] && extra=(--max-windows "$W")
python3 -m lowbit quantize smollm2-135m --w-format int4 --w-granularity g128 \
  --eval wikitext2 --eval-fp "${extra[@]}" --out out/smollm2-135m-w4g128 --json results/demo.json
