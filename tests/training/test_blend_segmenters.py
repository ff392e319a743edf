"""scripts/blend_segmenters.py: weight-space blends of two segmenters, written as sealed weights the
loader accepts, and the α pick."""

from __future__ import annotations

import pytest
import torch

from ghist_core.segmentation import load_segmenter
from ghist_core.segmentation.model import SegNet, SegNetConfig
from ghist_core.weights.resolve import save_weights
from testkit import load_repo_script

blend = load_repo_script("scripts/blend_segmenters.py")

SMALL = SegNetConfig(widths=(8, 8, 16, 16, 16), blocks=(1, 1, 1, 1, 1), head_width=8)


def _net(seed: int, cfg: SegNetConfig = SMALL) -> dict:
    torch.manual_seed(seed)
    net = SegNet(cfg)
    for m in net.modules():  # BatchNorm statistics that differ between the two parents
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(seed + 1)
    return {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}


def _save(folder, name: str, state: dict, cfg: SegNetConfig = SMALL) -> str:
    card = {"name": name, "kind": "segmentation", "architecture": cfg.to_dict(), "mpp": cfg.mpp,
            "type_names": list(cfg.type_names), "postprocess": {"np_threshold": 0.45, "type_weights": [2, 1, 1, 1]},
            "benchmark": {"consep": {"aji": 0.5}}}
    return str(save_weights(state, folder, name, card).weights_path)


def test_blend_state_mixes_floats_and_keeps_the_base_counters():
    a, b = _net(0), _net(1)
    af = {k: v.float() if v.is_floating_point() else v for k, v in a.items()}
    bf = {k: v.float() if v.is_floating_point() else v for k, v in b.items()}
    assert any(not v.is_floating_point() for v in af.values())  # the counters are there to be kept
    for alpha in (0.0, 0.5, 1.0):
        mixed = blend.blend_state(af, bf, alpha)
        for k, v in mixed.items():
            if af[k].is_floating_point():
                assert v.dtype == torch.float16
                assert torch.allclose(v.float(), ((1 - alpha) * af[k] + alpha * bf[k]).half().float())
            else:
                assert torch.equal(v, af[k])  # batch counters: the base's
    ends = blend.blend_state(af, bf, 0.0), blend.blend_state(af, bf, 1.0)
    assert all(torch.equal(ends[0][k], a[k]) and torch.equal(ends[1][k], b[k]) for k in a if a[k].is_floating_point())
    with pytest.raises(ValueError, match="differ in their tensors"):
        blend.blend_state(af, {k: v for k, v in list(bf.items())[1:]}, 0.5)
    key = next(k for k in af if af[k].ndim == 4)
    with pytest.raises(ValueError, match="has shape"):
        blend.blend_state(af, {**bf, key: torch.zeros(1)}, 0.5)


def test_written_blend_loads_with_the_base_card_and_names_its_parents(tmp_path):
    a, b = _net(0), _net(1)
    pa, pb = _save(tmp_path / "a", "seg-a", a), _save(tmp_path / "b", "seg-b", b)
    out = blend.write_blend(pa, pb, 0.25, "seg-mix", tmp_path / "out")
    seg = load_segmenter(str(out), device="cpu")  # the loader checks the seal and the sha256
    card = seg.card
    assert card["name"] == "seg-mix" and card["blend"]["alpha"] == 0.25
    assert [p["name"] for p in card["blend"]["parents"]] == ["seg-a", "seg-b"]
    assert [p["weight"] for p in card["blend"]["parents"]] == [0.75, 0.25]
    assert "benchmark" not in card  # the base's scores are not the blend's
    assert seg.post.np_threshold == 0.45 and list(seg.post.type_weights) == [2, 1, 1, 1]
    key = next(k for k in a if a[k].ndim == 4)
    from safetensors.torch import load_file

    got = load_file(str(out))[key].float()
    assert torch.allclose(got, (0.75 * a[key].float() + 0.25 * b[key].float()).half().float())


def test_blend_refuses_two_different_networks(tmp_path):
    other = SegNetConfig(widths=(8, 8, 16, 16, 32), blocks=(1, 1, 1, 1, 1), head_width=8)
    pa = _save(tmp_path / "a", "seg-a", _net(0))
    pb = _save(tmp_path / "b", "seg-b", _net(1, other), other)
    with pytest.raises(ValueError, match="different networks"):
        blend.write_blend(pa, pb, 0.5, "seg-mix", tmp_path / "out")
