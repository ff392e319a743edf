#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has Python 3.12, torch, numpy, pandas, scipy, scikit-image,
# tifffile, h5py), saved to .whl/ (git-ignored) so a device run can carry them:
#   bash scripts/fetch_device_wheels.sh
#   # on the device, with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && python bench/pipeline.py --device cuda --skip-cohort --gigapixel 1
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# pinned to what this machine runs, so both sides compute with the same code
PKGS=(anndata array-api-compat legacy-api-wrap natsort zarr numcodecs donfig google-crc32c
      safetensors openslide-python openslide-bin tqdm pyyaml)
for p in "${PKGS[@]}"; do
  v=$(python3 -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  spec="$p${v:+==$v}"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .whl "$spec" || python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_34_x86_64 -d .whl "$spec"
done
du -sh .whl
