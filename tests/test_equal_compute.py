"""``python -m benchmarks.equal_compute``: refusals before any work, and a toy budget end to end (slow)."""
import json

import pytest

from benchmarks.equal_compute import main
from weights.checkpoint import read_metadata

TINY_C = dict(width=32, depth=1, heads=2, c_text=384, dropout=0.0)
TINY_BASELINE = dict(preset="tiny", widths=[16, 32], blocks=[1, 1], heads=[0, 2], c_cond=16)


@pytest.mark.parametrize("argv, error, message", [
    (["--budgets", "1,2", "--sides", "stage_c,decoder"], SystemExit, None),  # unknown side
    (["--budgets", "2,1"], SystemExit, None),  # not increasing
    (["--budgets", "0,1"], SystemExit, None),  # not positive
    (["--budgets", "1", "--stage-b", "no/such/stage_b.safetensors"], FileNotFoundError, "--stage-b"),
    (["--budgets", "1", "--previewer", "no/such/previewer.safetensors"], FileNotFoundError, "--previewer none"),
    (["--budgets", "1", "--stage-b", "README.md"], ValueError, "--stage-b-cost"),  # no recorded Stage B compute
    (["--budgets", "1", "--stage-b-cost", "90"], SystemExit, None),
])
def test_bad_input_is_refused_before_any_work(tmp_path, argv, error, message, capsys):
    with pytest.raises(error, match=message):
        main(argv + ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()
    if error is SystemExit:
        assert "argument --" in capsys.readouterr().err  # argparse names the flag


def test_existing_results_need_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "equal_compute.md").write_text("earlier results\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--budgets", "1", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert (tmp_path / "out" / "equal_compute.md").read_text() == "earlier results\n"


@pytest.mark.slow
def test_toy_budget_end_to_end_and_resume(tmp_path, tiny_bundle, openmoji_dir):
    common = [
        "--unit", "pflop", "--work", str(tmp_path / "work"), "--data-dir", str(openmoji_dir),
        "--stage-b", str(tiny_bundle / "stage_b.safetensors"), "--stage-a", str(tiny_bundle / "stage_a.safetensors"),
        "--compressor", str(tiny_bundle / "compressor.safetensors"), "--stage-b-cost", "1.5,0.001",
        "--previewer", "none", "--val-every", "2",
        "--train-arg=--data.init_args.batch_size=4", "--train-arg=--data.init_args.val_batch_size=4",
        "--train-arg=--data.init_args.image_size=64", "--train-arg=--data.init_args.num_workers=0",
        "--train-arg=--trainer.limit_val_batches=1", "--train-arg=--model.init_args.sample_steps=2",
        "--stage-c-arg=--model.init_args.size=" + json.dumps(TINY_C), "--stage-c-arg=--model.init_args.stage_b=null",
        "--baseline-arg=--model.init_args.size=" + json.dumps(TINY_BASELINE),
        "--prompt-sets", "val", "--eval-limit", "4", "--gallery-limit", "6",
        "--eval-arg=--prior-steps=2", "--eval-arg=--decoder-steps=2", "--eval-arg=--size=64",
        "--latency-batches", "1,2", "--latency-steps", "2,2"]
    # a counted step of either side is far above 1e-12 PFLOP: both budgets are crossed by the first counted step
    report = main(["--budgets", "1e-12,2e-12", "--out", str(tmp_path / "out"), *common])
    out = tmp_path / "out"
    assert all((out / f"equal_compute.{ext}").is_file() for ext in ("json", "csv", "md", "png"))
    assert [(p["side"], p["budget"]) for p in report["points"]] == [
        ("stage_c", 1e-12), ("stage_c", 2e-12), ("baseline", 1e-12), ("baseline", 2e-12)]
    for p in report["points"]:
        assert p["train_pflop"] >= p["budget"] and p["val_top5"] is not None and p["fid"] is not None
        assert p["steps"] >= 1
    assert [r["batch"] for r in report["sampling"] if r["pipeline"] == "baseline"] == [1, 2]
    assert report["stage_b_cost"]["minutes"] == 1.5 and len(report["verdict"]) == 6
    assert "| baseline | 2e-12 |" in (out / "equal_compute.md").read_text()

    # resumed with a third budget point of 3 steps' FLOPs: the baseline continues from its checkpoint and the
    # state it saved (steps and seconds counted so far), the first two snapshots and their scores are kept
    first = read_metadata(tmp_path / "work" / "baseline" / "snapshots" / "budget_1.safetensors")
    assert first["train_steps"] == 1 and first["train_flops"] == first["flops_per_step"] > 0
    third_budget = 3 * first["flops_per_step"] / 1e15
    more = main(["--budgets", f"1e-12,2e-12,{third_budget!r}", "--sides", "baseline", "--out", str(tmp_path / "out2"),
                 *common])
    third = read_metadata(tmp_path / "work" / "baseline" / "snapshots" / "budget_2.safetensors")
    assert read_metadata(tmp_path / "work" / "baseline" / "snapshots" / "budget_1.safetensors") == first
    assert third["train_steps"] == 3 and third["global_step"] > first["global_step"]
    assert third["train_seconds"] > first["train_seconds"]
    assert [p["budget"] for p in more["points"]] == [1e-12, 2e-12, third_budget]
