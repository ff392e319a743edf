#!/usr/bin/env bash
# One GPU lease (about 15 min in all): three fine-tunes of the bundled segmenter side by side on one
# card, from nuclei-seg-stain: A "stain" (as the incumbent was trained), B "wide" (that plus sampled
# stains and 0.67-2x scale), C "stain" plus consistency on unlabelled HER2ST C2-C5 crops (the
# incumbent as teacher) and a moving weight average (the CPU recipe of sessions 17-18, the only one to
# pass the validation gate). Which one goes on to the test benchmark is chosen on validation only
# (docs/DECISIONS.md, sessions 14 and 19).
#   data: the CoNSeP and MoNuSeg *train* splits in .gpu_data/nuclei and HER2ST C2-C5 in .gpu_data/her2st
#         (git-ignored, carried: bash scripts/device_carry.sh prepare)
#   run:  bash scripts/device_train_seg.sh BUDGET_S   (results under $OUT, or runs/device without it)
# then, on the idle card, the segmenter's CUDA speed as stated and with the scale check
# (segmentation_cuda.json: copy it to bench/results/ here; its mosaic is of CoNSeP *train* patches, the
# only ones carried, where the CPU mosaic draws from both splits). Files back: one .tar.gz per
# candidate (final weights, card, log) + the speed JSON (limit 8). Worst case about 600 s: call run
# with timeout_s 600; the speed part is the one cut.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-270}
OUTDIR=${OUT:-runs/device}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
declare -A EXTRA=(
  [stain]="--augment stain"
  [wide]="--augment wide"
  [stain-u-ema]="--augment stain --teacher weights/nuclei-seg-stain.safetensors --unlabelled-her2st 100 --ema 0.999"
)
for v in stain wide stain-u-ema; do
  # shellcheck disable=SC2086
  timeout $((BUDGET + 170)) python3 scripts/train_segmentation.py --out "/tmp/seg-gpu-$v" --mpp 0.5 \
    --data-root .gpu_data/nuclei --batch-size 64 --lr 0.001 --steps-per-epoch 500 --time-budget "$BUDGET" \
    --workers 5 ${EXTRA[$v]} --val-restain 3 --init weights/nuclei-seg-stain.safetensors \
    > "/tmp/seg-gpu-$v.log" 2>&1 &
done
wait
for v in stain wide stain-u-ema; do
  d=/tmp/seg-gpu-$v
  tail -n 25 "$d.log"
  cp "$d.log" "$d/train.log"
  files=(train.log)
  for f in final.safetensors final.json; do [ -f "$d/$f" ] && files+=("$f"); done
  tar -czf "$OUTDIR/$v.tar.gz" -C "$d" "${files[@]}"
done
timeout 100 python3 bench/segmentation.py --speed-only --device cuda --models nuclei-seg-stain --no-app \
  --data-root .gpu_data/nuclei --classical-mosaic-px 2048 --out "$OUTDIR/segmentation_cuda.json" 2>&1 | grep -v Warn | tail -5
ls -la "$OUTDIR"/*
