#!/usr/bin/env bash
# One GPU lease (about 15 min in all): two fine-tunes of the bundled segmenter side by side on one
# card, from nuclei-seg-stain, differing only in the augmentation ("stain" as the incumbent was
# trained, "wide" = that plus sampled stains and 0.67-2x scale). Which one goes on to the test
# benchmark is chosen on validation only (docs/DECISIONS.md, session 14).
#   data: the CoNSeP and MoNuSeg *train* splits copied to .gpu_data/nuclei (git-ignored, carried)
#   run:  bash scripts/device_train_seg.sh BUDGET_S   (results under $OUT, or runs/ without it)
# then, on the idle card, the segmenter's CUDA speed as stated and with the scale check
# (segmentation_cuda.json: copy it to bench/results/ here; its mosaic is of CoNSeP *train* patches, the
# only ones carried, where the CPU mosaic draws from both splits). Files back: 3 per candidate + 1
# (limit 8). Worst case about 600 s: call run with timeout_s 600; the speed part is the one cut.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-270}
OUTDIR=${OUT:-runs/device}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
for v in stain wide; do
  timeout $((BUDGET + 170)) python3 scripts/train_segmentation.py --out "/tmp/seg-gpu-$v" --mpp 0.5 \
    --data-root .gpu_data/nuclei --batch-size 64 --lr 0.001 --steps-per-epoch 500 --time-budget "$BUDGET" \
    --workers 7 --augment "$v" --val-restain 3 --init weights/nuclei-seg-stain.safetensors \
    > "/tmp/seg-gpu-$v.log" 2>&1 &
done
wait
for v in stain wide; do
  d=/tmp/seg-gpu-$v
  tail -n 40 "$d.log"
  mkdir -p "$OUTDIR/$v"
  cp "$d.log" "$OUTDIR/$v/train.log"
  cp "$d/final.safetensors" "$d/final.json" "$OUTDIR/$v/" 2>/dev/null \
    || cp "$d/best.safetensors" "$d/best.json" "$OUTDIR/$v/" 2>/dev/null
done
timeout 100 python3 bench/segmentation.py --speed-only --device cuda --models nuclei-seg-stain --no-app \
  --data-root .gpu_data/nuclei --classical-mosaic-px 2048 --out "$OUTDIR/segmentation_cuda.json" 2>&1 | grep -v Warn | tail -5
ls -la "$OUTDIR"/*
