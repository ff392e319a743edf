"""Packaging a segmentation run (scripts/package_segmentation.py): the card's commands rebuild the
runs, the card is sealed, and a benchmark of other weights is refused."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, replace

import pytest

from testkit import load_repo_script

train_seg = load_repo_script("scripts/train_segmentation.py")
package = load_repo_script("scripts/package_segmentation.py")


@pytest.mark.parametrize("overrides", [
    {},
    {"batch_size": 8, "lr": 4e-4, "steps_per_epoch": 200, "max_epochs": 1000, "time_budget_s": 5400.0,
     "device": "cpu", "workers": 1, "augment": "stain", "val_restain": 3, "type_weights": "balanced"},
    {"max_steps": 7, "tune_postprocess": False, "arch": {"widths": [8, 16, 32, 64, 128]}, "mpp": 0.25},
    {"augment": "wide", "val_restain": 3, "init": "weights/nuclei-seg-stain.safetensors"},
    {"augment": "wide", "teacher": "weights/nuclei-seg-stain.safetensors", "distill_weight": 1.0},
    {"augment": "stain", "teacher": "weights/nuclei-seg-stain.safetensors", "unlabelled_her2st": 100,
     "unlabelled_weight": 0.5, "unlabelled_batch": 4},
    {"augment": "stain", "teacher": "weights/nuclei-seg-stain.safetensors", "unlabelled_her2st": 100,
     "unlabelled_batch": 4, "ema": 0.999},
], ids=["defaults", "stain fine-tune", "smoke", "wide", "distilled", "unlabelled her2st", "weight average"])
def test_card_command_rebuilds_the_run_config(overrides):
    cfg = replace(train_seg.TrainConfig(), **overrides)
    cmd = package.run_command(asdict(cfg), "runs/x", "weights/nuclei-seg.safetensors")
    argv = [cfg.data_root if t == "<nuclei>" else t for t in shlex.split(cmd)[2:]]
    back = train_seg.parse_config(argv)
    assert asdict(back) == {**asdict(cfg), "out": "runs/x", "init": "weights/nuclei-seg.safetensors"}


def _fake_run(path, finished: bool, epoch: int = 3):
    path.mkdir()
    cfg = asdict(replace(train_seg.TrainConfig(), augment="stain", device="cpu", max_epochs=40))
    state = {"epoch": epoch, "step": epoch * 100, "elapsed_s": 123.4, "best_aji": 0.4, "log": []}
    (path / ("result.json" if finished else "last.json")).write_text(json.dumps({"train_config": cfg, "state": state}))
    if finished:
        (path / "final.safetensors").write_bytes(b"not really weights")
        (path / "final.json").write_text(json.dumps({
            "mpp": 0.5, "type_names": ["other"], "architecture": {"widths": [8]},
            "postprocess": {"np_threshold": 0.5}, "validation": {"aji": 0.41}}))
    return path


def test_package_writes_a_sealed_card_with_the_chain(tmp_path):
    from ghist_core.io.hashing import sha256_file
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR
    from ghist_core.weights.card import check_seal

    first = _fake_run(tmp_path / "r1", finished=False, epoch=12)
    second = _fake_run(tmp_path / "r2", finished=True)
    out = tmp_path / "weights"
    out.mkdir()
    package.main(["--name", "seg-test", "--base", str(BUNDLED_WEIGHTS_DIR / "nuclei-seg.json"),
                  "--runs", str(first), str(second), "--out-dir", str(out)])
    card = json.loads((out / "seg-test.json").read_text())
    check_seal(card, "seg-test.json")  # raises unless sealed and unchanged
    assert card["sha256"] == sha256_file(out / "seg-test.safetensors") == sha256_file(second / "final.safetensors")
    base = json.loads((BUNDLED_WEIGHTS_DIR / "nuclei-seg.json").read_text())
    assert card["command"][:len(base["command"])] == base["command"]
    assert "--init weights/nuclei-seg.safetensors" in card["command"][-2]
    assert "--init runs/r1/last.safetensors" in card["command"][-1]
    stages = card["training"]["fine_tune"]
    assert [s["finished"] for s in stages] == [False, True] and "stopped at epoch 12 of 40" in stages[0]["note"]
    assert card["stain_bank"]["train_members"] and "synthetic-pink" in card["stain_bank"]["benchmark_members (never trained on)"]

    # a benchmark that scored other weights is refused
    (tmp_path / "bench.json").write_text(json.dumps({"weights_sha256": {"seg-test": "0" * 64}}))
    with pytest.raises(SystemExit, match="scored other weights"):
        package.main(["--name", "seg-test", "--base", str(BUNDLED_WEIGHTS_DIR / "nuclei-seg.json"),
                      "--runs", str(second), "--out-dir", str(out), "--bench", str(tmp_path / "bench.json")])


def test_bench_rows_copy_only_this_model_and_only_blocks_that_scored_it():
    sha = "a" * 64
    summary = {"nuclei-seg": {"worst_aji": 0.2}, "nuclei-seg-stain": {"worst_aji": 0.3},
               "nuclei-seg-stain_ttn": {"worst_aji": 0.35}, "goal:nuclei-seg": {}, "goal:nuclei-seg-stain": {}}
    bench = {"accuracy": {"nuclei-seg": {"consep": {"aji": 0.5, "pooled": {}}}, "weights_sha256": {"nuclei-seg": sha}},
             "stain_shift": {"weights_sha256": {"nuclei-seg": sha}, "datasets": {"consep": {"summary": summary}}}}
    rows = package.bench_rows(bench, "nuclei-seg", sha)
    assert rows["accuracy"] == {"consep": {"aji": 0.5}}
    assert set(rows["stain_shift"]["consep"]) == {"nuclei-seg", "goal:nuclei-seg"}  # not nuclei-seg-stain's rows
    with pytest.raises(SystemExit, match="accuracy"):
        package.bench_rows(bench, "nuclei-seg", "b" * 64)


def test_refresh_bench_renews_only_the_rows_of_a_bundled_card(tmp_path):
    from ghist_core.io.hashing import sha256_file
    from ghist_core.weights.card import check_seal, seal_card

    (tmp_path / "seg-x.safetensors").write_bytes(b"weights of seg-x")
    sha = sha256_file(tmp_path / "seg-x.safetensors")
    card_path = tmp_path / "seg-x.json"
    old = seal_card({"name": "seg-x", "kind": "segmentation", "metrics": {"speed_mpx_per_s": {"cpu": 0.1}},
                     "benchmark": {"accuracy": {"consep": {"aji": 0.1}}}}, sha)
    card_path.write_text(json.dumps(old, indent=1) + "\n")
    speed = {"cpu": {"seg-x": {"mpx_per_s": 1.6, "batch_size": 1}, "weights_sha256": {"seg-x": sha},
                     "app": {"seg-x": {"segmentation_mpx_per_s": 2.1, "whole_run_mpx_per_s": 1.5}}, "device": "cpu"}}
    bench = {"weights_sha256": {"seg-x": sha}, "speed": speed,
             "accuracy": {"seg-x": {"consep": {"aji": 0.5, "pooled": {}}}, "weights_sha256": {"seg-x": sha}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    package.main(["--refresh-bench", str(card_path), "--bench", str(tmp_path / "bench.json")])
    new = json.loads(card_path.read_text())
    check_seal(new, "seg-x.json")
    assert new["benchmark"]["accuracy"] == {"consep": {"aji": 0.5}}
    assert new["metrics"]["speed_mpx_per_s"]["cpu"]["app_whole_run"] == 1.5
    assert {k: v for k, v in new.items() if k not in ("benchmark", "metrics", "card_sha256", "integrity")} == \
        {k: v for k, v in old.items() if k not in ("benchmark", "metrics", "card_sha256", "integrity")}

    (tmp_path / "seg-x.safetensors").write_bytes(b"other weights")  # the card no longer describes the file
    with pytest.raises(SystemExit, match="does not match"):
        package.main(["--refresh-bench", str(card_path), "--bench", str(tmp_path / "bench.json")])
    with pytest.raises(SystemExit):
        package.main(["--refresh-bench", str(card_path)])  # --bench is required


def test_type_merge_goes_into_the_card_only_as_adopted_for_these_weights(tmp_path):
    """``--type-merge``: the adopted merge and its record land in a re-sealed card; a result for other
    weights or one its rule did not adopt is refused, and the card is left as it was."""
    import shutil

    from ghist_core.io.hashing import sha256_file
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR
    from ghist_core.weights.card import check_seal

    for suffix in (".safetensors", ".json"):
        shutil.copyfile(BUNDLED_WEIGHTS_DIR / f"nuclei-seg-stain{suffix}", tmp_path / f"nuclei-seg-stain{suffix}")
    card_path = tmp_path / "nuclei-seg-stain.json"
    sha = sha256_file(tmp_path / "nuclei-seg-stain.safetensors")
    result = {"rule": "docs/DECISIONS.md, session 17 (x)", "weights_sha256": sha, "chosen": {"other": "inflammatory"},
              "reason": "a remainder class",
              "validation": {"images": 3, "tiles": ["t1"]}, "verdict": {"adopt": True},
              "test": {"unmerged": {"per_type_f1": {"other": 0.1}}, "merged": {"per_type_f1": {"inflammatory": 0.5}}}}
    before = card_path.read_text()
    for bad in ({**result, "weights_sha256": "0" * 64}, {**result, "verdict": {"adopt": False}}):
        (tmp_path / "r.json").write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            package.main(["--type-merge", str(card_path), str(tmp_path / "r.json")])
        assert card_path.read_text() == before
    (tmp_path / "r.json").write_text(json.dumps(result))
    package.main(["--type-merge", str(card_path), str(tmp_path / "r.json")])
    card = json.loads(card_path.read_text())
    check_seal(card, card_path.name)
    assert card["type_merge"]["merge"] == {"other": "inflammatory"} and card["sha256"] == sha
    assert card["type_merge"]["reason"] == "a remainder class" and "type_merge" not in card["postprocess"]
    from ghist_core.segmentation import load_segmenter
    assert load_segmenter(str(tmp_path / "nuclei-seg-stain.safetensors"), device="cpu").post.type_merge == \
        {"other": "inflammatory"}


def test_a_run_resumes_only_with_its_own_settings():
    """Resuming with another augmentation or loss is refused (the checkpoint would continue as a
    different run); how long it runs may change; a setting the checkpoint predates counts as its default."""
    cfg = replace(train_seg.TrainConfig(), augment="stain", teacher="w.safetensors", unlabelled_her2st=100)
    saved = asdict(cfg)
    assert train_seg.config_changes(saved, replace(cfg, max_epochs=60, time_budget_s=10.0, workers=2)) == []
    assert train_seg.config_changes(saved, replace(cfg, unlabelled_her2st=0, lr=0.1)) == ["lr", "unlabelled_her2st"]
    old = {k: v for k, v in asdict(train_seg.TrainConfig()).items() if not k.startswith("unlabelled")}
    assert train_seg.config_changes(old, train_seg.TrainConfig()) == []
    assert train_seg.config_changes(old, replace(train_seg.TrainConfig(), unlabelled_her2st=5)) == ["unlabelled_her2st"]
    assert package.run_command(old, "runs/x", "").count("unlabelled") == 0  # an old run's command stays as it was
