#!/usr/bin/env bash
# Make the working tree fit a device call (64 MiB: the tracked weights alone are 56 MB), and undo it.
#   bash scripts/device_carry.sh prepare   # training images -> .gpu_data/nuclei, HER2ST C2-C5 -> .gpu_data/her2st
#                                          # (git-ignored, carry it);
#                                          # the two weights a training run does not read are un-tracked
#   ... run: bash scripts/device_train_seg.sh 270, carry [".gpu_data"] ...
#   bash scripts/device_carry.sh restore   # tracked again; nothing on disk was touched
# Never commit between the two: the index then lacks those weights.
set -euo pipefail
cd "$(dirname "$0")/.."
BIG=(weights/ghist-her2st.safetensors weights/nuclei-seg.safetensors)
EXCLUDE=$(git rev-parse --git-path info/exclude)
for f in "${BIG[@]}"; do  # both steps need HEAD to hold the weights (a commit in between would drop them)
  git cat-file -e "HEAD:$f" 2>/dev/null || { echo "HEAD does not hold $f: restore it from history first" >&2; exit 1; }
done
case "${1:-}" in
  prepare)
    for f in "${BIG[@]}"; do
      git ls-files --error-unmatch "$f" >/dev/null 2>&1 || { echo "$f is already un-tracked: run restore" >&2; exit 1; }
      git diff --quiet -- "$f" && git diff --cached --quiet -- "$f" || { echo "$f has changes: commit or drop them" >&2; exit 1; }
    done
    src=${GHIST_SHARED_DATA:-../shared/data}/nuclei
    mkdir -p .gpu_data/nuclei/consep .gpu_data/nuclei/monuseg
    cp -r "$src/consep/train" "$src/consep/types.json" .gpu_data/nuclei/consep/
    cp -r "$src/monuseg/train" .gpu_data/nuclei/monuseg/
    # candidate C's unlabelled breast H&E: the HER2ST sections whose stain is a training member (C2-C5)
    her=$(dirname "$src")/her2st
    mkdir -p .gpu_data/her2st/images .gpu_data/her2st/spots .gpu_data/her2st/counts
    for s in C2 C3 C4 C5; do
      cp "$her/images/$s.jpg" .gpu_data/her2st/images/
      cp "$her/spots/${s}_selection.tsv" .gpu_data/her2st/spots/
      cp "$her/counts/$s.tsv.gz" .gpu_data/her2st/counts/
    done
    git rm --cached -q "${BIG[@]}"
    for f in "${BIG[@]}"; do grep -qx "/$f" "$EXCLUDE" 2>/dev/null || echo "/$f" >> "$EXCLUDE"; done
    echo "tracked: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes; .gpu_data: $(du -sb .gpu_data | cut -f1) bytes"
    ;;
  restore)
    git reset -q -- "${BIG[@]}"
    for f in "${BIG[@]}"; do [ -f "$EXCLUDE" ] && sed -i "\#^/$f\$#d" "$EXCLUDE"; done
    git status --short
    ;;
  *) echo "usage: $0 prepare|restore" >&2; exit 2 ;;
esac
