"""Pick the compute device: CUDA when present, then Apple MPS, then CPU."""

from __future__ import annotations

import torch

from ghist_core.errors import GhistError


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` to a usable device."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise GhistError("A CUDA GPU was requested but none is available on this machine; choose 'auto' or 'cpu'.")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GhistError("Apple MPS was requested but is not available on this machine; choose 'auto' or 'cpu'.")
    try:
        return torch.device(requested)
    except RuntimeError as exc:
        raise GhistError(f"Unknown device {requested!r}: use auto, cpu, cuda or mps.") from exc


def device_summary() -> dict:
    """What the app shows on the Models page."""
    info = {"cuda_available": torch.cuda.is_available(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def autocast_for(device: torch.device):
    """Mixed precision on CUDA (bf16), a no-op context elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
