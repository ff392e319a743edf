"""Training: HER2ST spot packs, the single-cell reference, the GHIST and segmentation trainers."""
