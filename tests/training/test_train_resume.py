"""scripts/train_segmentation.py resumes a stopped run exactly: a CPU run that spans several working
sessions (#16) must end where the unbroken run would have, not restart AdamW's moments and draw
other batches at every resume."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ghist_core.paths import REPO_DIR
from testkit import load_repo_script, nuclei_samples_from_slide, tiny_nuclei_split

train_seg = load_repo_script("scripts/train_segmentation.py")
INIT = REPO_DIR / "weights" / "nuclei-seg-stain.safetensors"


def _cfg(root, out, **kw):
    """Two epochs of two steps, with a weight average (its state must survive the resume too)."""
    return replace(train_seg.TrainConfig(), data_root=str(root), out=str(out), batch_size=4, steps_per_epoch=2,
                   max_epochs=2, device="cpu", workers=1, tune_postprocess=False, init=str(INIT), augment="stain",
                   mpp=0.5, lr=1e-3, **{"ema": 0.5, **kw})


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(demo_slide, tmp_path_factory):
    """An unbroken two-epoch run, the same run stopped after epoch 1 and resumed, and the stopped run
    resumed without its optimizer file (the old behaviour)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("resume")
    root = tiny_nuclei_split(demo_slide, tmp / "nuclei")
    train_seg.train(_cfg(root, tmp / "whole"))
    train_seg.train(_cfg(root, tmp / "split", max_steps=2))  # stops after epoch 1 (a resumable setting)
    stopped = _weights(tmp / "split")
    (tmp / "epoch1.ema.safetensors").write_bytes((tmp / "split" / "last.ema.safetensors").read_bytes())
    json_1 = json.loads((tmp / "split" / "last.json").read_text())
    for run, kw in (("plain_whole", {}), ("plain_split", {"max_steps": 2}), ("plain_split", {})):
        train_seg.train(_cfg(root, tmp / run, ema=0.0, **kw))  # without an average, as runs were before
    for name in ("last.safetensors", "last.json", "last.optim.safetensors", "last.ema.safetensors",
                 "best.safetensors", "best.json", "log.jsonl"):
        (tmp / "no_optim").mkdir(exist_ok=True)
        (tmp / "no_optim" / name).write_bytes((tmp / "split" / name).read_bytes())
    (tmp / "no_optim" / "last.optim.safetensors").unlink()
    train_seg.train(_cfg(root, tmp / "split"))
    train_seg.train(_cfg(root, tmp / "no_optim"))
    yield tmp, stopped, json_1
    torch.set_num_threads(threads)


def test_a_resumed_run_ends_where_the_unbroken_run_does(runs):
    tmp, stopped, json_1 = runs
    whole, split = _weights(tmp / "whole"), _weights(tmp / "split")
    averages = [load_file(str(tmp / run / "last.ema.safetensors")) for run in ("whole", "split")]
    assert _max_diff(*averages) == 0.0 and _max_diff(averages[0], whole) > 1e-6  # the average is not the weights
    assert json_1["state"]["epoch"] == 1 and json_1["state"]["step"] == 2 and "rng" in json_1
    assert _max_diff(stopped, whole) > 1e-4  # epoch 2 moved the weights: the comparison can fail
    assert _max_diff(split, whole) == 0.0
    logs = [[json.loads(line) for line in (tmp / run / "log.jsonl").read_text().splitlines()] for run in ("whole", "split")]
    assert [r["epoch"] for r in logs[1]] == [1, 2]
    for a, b in zip(*logs):  # same losses, same validation scores, epoch by epoch
        assert {k: v for k, v in a.items() if k != "elapsed_s"} == {k: v for k, v in b.items() if k != "elapsed_s"}
    assert _max_diff(_weights(tmp / "plain_split"), _weights(tmp / "plain_whole")) == 0.0  # and without --ema
    assert not (tmp / "plain_whole" / "last.ema.safetensors").exists()


def test_without_its_optimizer_file_a_resume_still_runs_but_not_exactly(runs):
    """Same batches (numpy's generator is in last.json), fresh AdamW moments: another path."""
    tmp, _, _ = runs
    whole, no_optim = _weights(tmp / "whole"), _weights(tmp / "no_optim")
    assert all(np.isfinite(v.float().numpy()).all() for v in no_optim.values())
    assert _max_diff(no_optim, whole) > 1e-6


def test_a_resume_says_why_it_will_not_be_exact():
    cfg = replace(train_seg.TrainConfig(), steps_per_epoch=2)
    on_boundary = {"epoch": 1, "step": 2}
    assert train_seg.resume_notes(cfg, on_boundary, 2, True, True) == []
    assert train_seg.resume_notes(cfg, on_boundary, None, True, True) == []  # weights from before the step tag
    assert "average" in train_seg.resume_notes(cfg, on_boundary, 2, True, True, average_restored=False)[0]
    notes = {
        "weights": train_seg.resume_notes(cfg, on_boundary, 4, True, True),
        "optimizer": train_seg.resume_notes(cfg, on_boundary, 2, True, False),
        "generator": train_seg.resume_notes(cfg, on_boundary, 2, False, True),
        "inside an epoch": train_seg.resume_notes(cfg, {"epoch": 1, "step": 1}, 1, True, True),
        "wall-clock": train_seg.resume_notes(replace(cfg, time_budget_s=60.0), on_boundary, 2, True, True),
    }
    for word, got in notes.items():
        assert len(got) == 1, (word, got)
    assert "step 4" in notes["weights"][0] and "AdamW" in notes["optimizer"][0]
    assert "batches" in notes["generator"][0] and "inside an epoch" in notes["inside an epoch"][0]
    assert "wall-clock" in notes["wall-clock"][0]


def test_an_optimizer_file_of_another_step_is_not_used(runs):
    tmp, _, _ = runs
    opt = torch.optim.AdamW(train_seg.SegNet(train_seg.SegNetConfig.from_dict({"mpp": 0.5})).parameters())
    path = train_seg.optimizer_path(tmp / "split" / "last.safetensors")
    assert train_seg.load_optimizer(opt, path, step=4)
    assert not train_seg.load_optimizer(opt, path, step=2)
    assert not train_seg.load_optimizer(opt, tmp / "missing.optim.safetensors", step=4)


def test_batches_smaller_than_eight_get_flips_too(demo_slide):
    """The batch's 8 symmetries of the square start at a random one when the batch is not a multiple
    of 8: four unlabelled crops a step are then flipped as often as rotated."""
    cfg = replace(train_seg.TrainConfig(), batch_size=4, device="cpu", augment="hed", mpp=0.5, crop_um=64.0)
    sample = nuclei_samples_from_slide(demo_slide, n_tiles=1, side=128)[0]  # one patch of exactly one crop
    data = train_seg.DeviceData([sample], cfg, torch.device("cpu"))
    assert data.crop == 128
    base = data.groups[0][1][0]
    views = {}
    for k in range(8):  # the eight images of one asymmetric instance map
        v = torch.rot90(base, k % 4, dims=(-2, -1))
        views[k] = torch.flip(v, dims=(-1,)) if k >= 4 else v
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        _, inst, _ = data.batch(4, rng)
        for m in inst:
            seen |= {k for k, v in views.items() if torch.equal(m, v)}
    assert seen == set(range(8))


def test_the_weight_average_is_what_is_validated_and_kept(runs):
    """With --ema, best.safetensors (what is packaged) is the average of a validated epoch, not the
    weights as trained; a decay outside (0, 1) is refused."""
    tmp, stopped, _ = runs
    best = load_file(str(tmp / "whole" / "best.safetensors"))
    averages = {1: load_file(str(tmp / "epoch1.ema.safetensors")), 2: load_file(str(tmp / "whole" / "last.ema.safetensors"))}
    trained = {1: stopped, 2: _weights(tmp / "whole")}
    best_epoch = json.loads((tmp / "whole" / "best.json").read_text())["state"]["epoch"]
    assert _max_diff(best, averages[best_epoch]) == 0.0
    assert _max_diff(best, trained[best_epoch]) > 1e-6
    net = train_seg.SegNet(train_seg.SegNetConfig.from_dict({"mpp": 0.5}))
    with pytest.raises(ValueError, match="--ema"):
        train_seg.WeightAverage(net, 1.0)
