"""Pixel-level image operations: stain separation and normalisation, tissue detection."""
