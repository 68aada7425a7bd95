#!/usr/bin/env bash
# Set-up + the main job on the default model: data-free QAT of SmolLM2-135M to int3 g128 (no training data:
# the float model writes 128 x 256 tokens itself, then tiled + end-to-end distillation), WikiText-2 perplexity
# of the float model and of the quantized one.
#   JOB=dfqat (default)  under an hour on 2 CPU cores (~10 GiB), minutes on a GPU; checkpointed under runs/: rerun to resume
#   JOB=rtn              round-to-nearest int4 g128 instead (~4 min): a quick check of the install
#   MODEL=stories260k    the tiny model (int3 g32, TinyStories held-out text), a minute or two
#   WINDOWS=16 (default) scores the first 16 2048-token windows (of 148 for WikiText-2); WINDOWS=all the whole split
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
JOB=${JOB:-dfqat}
MODEL=${MODEL:-smollm2-135m}
W=${WINDOWS:-16}
extra=()
[ "$W" != "all" ] && extra=(--max-windows "$W")
if [ "$MODEL" = stories260k ]; then
  eval_set=tinystories; gran=g32; lrs=()
else  # the SmolLM2 learning rates of BENCHMARKS.md
  eval_set=wikitext2; gran=g128
  lrs=(--opt dfqat_lr=3e-4 --opt dfqat_q_lr=3e-4 --opt dfqat_e2e_lr=1e-4 --opt dfqat_e2e_q_lr=1e-4)
fi
case "$JOB" in
  dfqat)
    python3 -m lowbit quantize "$MODEL" --method dfqat --w-format int3 --w-granularity "$gran" \
      --nsamples 128 --calib-seqlen 256 "${lrs[@]}" --opt dfqat_ckpt="runs/demo-$MODEL-dfqat" \
      --eval "$eval_set" --eval-fp "${extra[@]}" --out "out/$MODEL-dfqat-w3$gran" --json "results/demo-$MODEL-dfqat.json" ;;
  rtn)
    python3 -m lowbit quantize "$MODEL" --w-format int4 --w-granularity "$gran" \
      --eval "$eval_set" --eval-fp "${extra[@]}" --out "out/$MODEL-w4$gran" --json "results/demo-$MODEL-rtn.json" ;;
  *) echo "demo.sh: unknown JOB=$JOB (use dfqat or rtn)" >&2; exit 2 ;;
esac
