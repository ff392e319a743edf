"""scripts/train_segmentation.py ``--teacher``: a frozen network's maps on each crop, before its colour
and zoom changes, ride through the zoom with the image and become the student's soft targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ghist_core.paths import REPO_DIR
from testkit import load_repo_script, nuclei_samples_from_slide, tiny_nuclei_split

train_seg = load_repo_script("scripts/train_segmentation.py")
TEACHER = REPO_DIR / "weights" / "nuclei-seg-stain.safetensors"


class ColourTeacher(torch.nn.Module):
    """A 'teacher' whose maps are functions of the pixel colours it reads (HV = the green and blue
    channels): where the soft targets come from is then visible in them."""

    def forward(self, x):
        return 4.0 * (0.6 - x[:, :1]), x[:, 1:3], torch.stack([x[:, 0], 1 - x[:, 0], x[:, 1], x[:, 2], x[:, 0]], 1)


def _data(demo_slide, augment: str = "wide"):
    from dataclasses import replace

    cfg = replace(train_seg.TrainConfig(), augment=augment, crop_um=64.0, mpp=0.5)
    return train_seg.DeviceData(nuclei_samples_from_slide(demo_slide), cfg, torch.device("cpu"))


@pytest.mark.parametrize("zoom", [0.67, 2.0])
def test_soft_targets_ride_through_the_zoom_with_the_image(demo_slide, zoom):
    """With colour changes off, the warped HV targets of a colour-reading teacher equal the zoomed
    image's own green and blue wherever the zoom stayed inside the crop: the targets line up with
    the image the student reads (bilinear on both, so exactly). Zoomed out, part of the crop is
    outside: no target there; zoomed in, none is."""
    from ghist_core.training.augment import AugmentConfig, SegAugment

    data = _data(demo_slide)
    data.augment = SegAugment(AugmentConfig.off(p_scale=1.0, scale_range=(zoom, zoom)))
    x, inst, types, soft = data.batch(6, np.random.default_rng(0), ColourTeacher())
    assert soft.shape == (6, 1 + 2 + 5 + 1) + x.shape[-2:]
    valid = soft[:, -1:] > 0.5
    assert torch.allclose(soft[:, 1:3] * valid, x[:, 1:3] * valid, atol=1e-5)
    if zoom < 1:
        assert 0.05 < float((~valid).float().mean()) < 0.95
        assert bool((x.permute(1, 0, 2, 3)[:, ~valid[:, 0]] == 1.0).all())  # where the image got its white fill
    else:
        assert bool(valid.all())
    assert inst.shape == x.shape[:1] + x.shape[-2:] and types.shape == inst.shape


def test_colour_changes_reach_the_student_not_the_targets(demo_slide):
    """Only the image is recoloured: with the stain and colour changes on and no zoom, the targets
    are the teacher's maps on the crop as sampled, which the recoloured image no longer gives."""
    from ghist_core.training.augment import AugmentConfig, SegAugment

    data = _data(demo_slide)
    data.augment = SegAugment(AugmentConfig.off(p_colour=1.0, hue=0.1, contrast=0.3, brightness=0.2))
    x, _, _, soft = data.batch(8, np.random.default_rng(1), ColourTeacher())
    assert float((soft[:, 1:3] - x[:, 1:3]).abs().mean()) > 0.01
    assert bool((soft[:, -1] == 1).all())


def test_hv_targets_survive_the_zoom_that_carries_them(demo_slide):
    """Why the teacher's HV maps may ride through the zoom as plain channels: HV values are offsets
    normalised per nucleus, so the zoomed maps of a crop are (up to interpolation and the nuclei the
    window cuts) the maps of the zoomed crop."""
    from ghist_core.training.augment import AugmentConfig, SegAugment
    from ghist_core.training.segmentation_data import hv_targets

    s = nuclei_samples_from_slide(demo_slide, n_tiles=1, origin=(900, 1500))[0]  # a crowded region (about 100 nuclei)
    inst = torch.from_numpy(s.inst[None].astype(np.int64))
    x = torch.cat([torch.from_numpy(s.rgb).permute(2, 0, 1)[None].float() / 255, hv_targets(inst),
                   torch.zeros(1, 1, *inst.shape[-2:])], 1)
    aug = SegAugment(AugmentConfig.off(p_scale=1.0, scale_range=(2.0, 2.0)))
    moved, inst_z, _ = aug.geometric(x, inst, None, np.random.default_rng(0))
    direct = hv_targets(inst_z)
    ids, cut = inst_z[0].unique(), set(inst_z[0, 0].tolist() + inst_z[0, -1].tolist() + inst_z[0, :, 0].tolist()
                                      + inst_z[0, :, -1].tolist())
    whole = torch.isin(inst_z[0], torch.tensor([i for i in ids.tolist() if i and i not in cut]))
    err = (moved[0, 3:5] - direct[0]).abs()[:, whole]
    assert int(whole.sum()) > 500 and float(err.mean()) < 0.1, float(err.mean())


def test_the_augmentations_own_symmetries_are_refused(demo_slide):
    """They would turn the HV channels as plain images (without swapping or negating them)."""
    from ghist_core.training.augment import AugmentConfig, SegAugment

    data = _data(demo_slide)
    data.augment = SegAugment(AugmentConfig.off(symmetries=True))
    with pytest.raises(ValueError, match="symmetries"):
        data.batch(4, np.random.default_rng(0), ColourTeacher())


def test_distillation_loss_is_least_where_the_student_matches_the_teacher():
    torch.manual_seed(0)
    np_logit, hv, tp = torch.randn(2, 1, 16, 16), torch.randn(2, 2, 16, 16) * 0.5, torch.randn(2, 5, 16, 16)
    soft = torch.cat([torch.sigmoid(np_logit), hv, torch.softmax(tp, 1), torch.ones_like(np_logit)], 1)
    same = train_seg.distill_losses((np_logit, hv, tp), soft)
    assert float(same["kd_hv"]) == 0.0 and abs(float(same["kd_tp"])) < 1e-5
    other = train_seg.distill_losses((np_logit + 1, hv + 0.3, tp.flip(1)), soft)
    for k in ("kd_np", "kd_hv", "kd_tp"):
        assert float(other[k]) > float(same[k]) + 1e-3, k
    masked = soft.clone()
    masked[:, -1] = 0  # nothing valid: nothing to learn
    assert all(float(v) == 0.0 for v in train_seg.distill_losses((np_logit + 1, hv, tp), masked).values())


def test_a_teacher_of_another_resolution_is_refused(tmp_path):
    from dataclasses import replace

    from safetensors.torch import save_file

    from ghist_core.segmentation.model import SegNet, SegNetConfig

    arch = SegNetConfig(widths=(4, 8, 8, 8, 8), blocks=(1, 1, 1, 1, 1), head_width=4, mpp=0.25)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in SegNet(arch).state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"architecture": arch.to_dict()}))
    with pytest.raises(ValueError, match="pixel for pixel"):
        train_seg.load_teacher(str(path), replace(arch, mpp=0.5), torch.device("cpu"))
    t = train_seg.load_teacher(str(path), arch, torch.device("cpu"))
    assert not t.training and not any(p.requires_grad for p in t.parameters())


def test_a_short_run_with_a_teacher_logs_the_distillation_terms(demo_slide, tmp_path):
    """Two steps from the bundled weights, distilling from them, on a tiny split cut from the demo
    slide: the run finishes, its log has the three distillation terms, the config records the teacher."""
    from dataclasses import replace

    root = tiny_nuclei_split(demo_slide, tmp_path / "nuclei")
    cfg = replace(train_seg.TrainConfig(), data_root=str(root), out=str(tmp_path / "run"), batch_size=4,
                  steps_per_epoch=2, max_epochs=1, device="cpu", workers=1, tune_postprocess=False,
                  init=str(TEACHER), teacher=str(TEACHER), distill_weight=1.0, augment="wide", mpp=0.5)
    result = train_seg.train(cfg)
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"kd_np", "kd_hv", "kd_tp"} <= set(rec) and all(np.isfinite(rec[k]) for k in ("kd_np", "kd_hv", "kd_tp"))
    assert result["train_config"]["teacher"] == str(TEACHER) and result["train_config"]["distill_weight"] == 1.0


def test_unlabelled_breast_regions_come_only_from_training_role_stains(shared_path):
    """The consistency crops are HER2ST sections whose stains the bank trains on: the benchmark's
    B4 and C6 stay unseen; the regions are at the working µm/px and carry no nuclei."""
    from ghist_core.training.segmentation_data import her2st_unlabelled

    regions = her2st_unlabelled(shared_path("her2st"), 2, 0.5)
    assert sorted({r.source_tile for r in regions}) == ["C2", "C3", "C4", "C5"] and len(regions) == 8
    assert all(r.rgb.shape == (256, 256, 3) and r.inst.max() == 0 and r.types is None for r in regions)
    assert all(r.rgb.std() > 5 for r in regions)  # spot-centred: tissue, not glass


def test_a_short_run_with_unlabelled_breast_crops_logs_their_consistency(demo_slide, tmp_path, shared_path):
    """Two steps with unlabelled HER2ST crops and no labelled distillation: the run logs the
    consistency terms (u_kd_*), not the labelled ones; without a teacher it is refused."""
    from dataclasses import replace

    shared_path("her2st")
    root = tiny_nuclei_split(demo_slide, tmp_path / "data" / "nuclei")
    (root.parent / "her2st").symlink_to(shared_path("her2st"))
    cfg = replace(train_seg.TrainConfig(), data_root=str(root), out=str(tmp_path / "run"), batch_size=4,
                  steps_per_epoch=2, max_epochs=1, device="cpu", workers=1, tune_postprocess=False,
                  init=str(TEACHER), teacher=str(TEACHER), augment="stain", mpp=0.5, unlabelled_her2st=2)
    train_seg.train(cfg)
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"u_kd_np", "u_kd_hv", "u_kd_tp"} <= set(rec) and "kd_np" not in rec
    assert all(np.isfinite(rec[k]) for k in ("u_kd_np", "u_kd_hv", "u_kd_tp"))
    with pytest.raises(ValueError, match="needs --teacher"):
        train_seg.train(replace(cfg, teacher="", out=str(tmp_path / "run2")))
