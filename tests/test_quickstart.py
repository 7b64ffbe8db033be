"""The quickstart: its commands, and both recipes end to end at 2 steps per phase (train, bundle, sample a grid)."""
import json
import tarfile

import pytest
from sample import quickstart
from sample.quickstart import main
from sample.bundle import main as bundle_main
from weights.checkpoint import read_metadata


def _commands(monkeypatch, argv):
    """The commands ``main(argv)`` would run, run by nobody."""
    calls = []
    monkeypatch.setattr(quickstart, "run", lambda cmd, what: calls.append(cmd))
    main(argv)
    return [cmd[2:] for cmd in calls]


def test_quick_runs_the_earlier_three_commands_unchanged(tmp_path, monkeypatch):
    out = tmp_path / "qs"
    a, b, c = (quickstart.shown(quickstart.CONFIGS / stage / "tiny.yaml") for stage in ("stage_a", "stage_b", "stage_c"))
    commands = _commands(monkeypatch, ["--quick", "--out", str(out)])
    assert commands[:3] == [
        ["train", "fit", "--config", a, "--trainer.default_root_dir", f"{out}/stage_a"],
        ["train", "fit", "--config", b, "--trainer.default_root_dir", f"{out}/stage_b",
         "--model.init_args.stage_a", f"{out}/stage_a/tiny"],
        ["train", "fit", "--config", c, "--trainer.default_root_dir", f"{out}/stage_c",
         "--model.init_args.compressor", f"{out}/stage_b/tiny", "--model.init_args.stage_b", f"{out}/stage_b/tiny"]]
    assert commands[3][:8] == ["sample.bundle", "--stage-a", f"{out}/stage_a/tiny", "--stage-b", f"{out}/stage_b/tiny",
                               "--stage-c", f"{out}/stage_c/tiny", "--out"]
    assert sum(minutes for _, minutes, _ in quickstart.QUICK) == pytest.approx(44.9)  # + bundle and grid: 45.5


def test_full_recipe_chains_its_phases(tmp_path, monkeypatch):
    out, shard = tmp_path / "qs", tmp_path / "shard.tar"
    shard.touch()
    commands = _commands(monkeypatch, ["--out", str(out), "--max-steps", "3", "--train", str(shard)])
    fits = [cmd for cmd in commands if cmd[:2] == ["train", "fit"]]
    assert len(fits) == 18 and all(cmd[-4:] == ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3"]
                                   for cmd in fits)
    assert all(cmd[cmd.index("--data.init_args.train") + 1] == str(shard) for cmd in fits)
    prior, prior2, prior3, prior4, prior5 = [cmd for cmd in commands if cmd[0] == "train.prior_samples"]
    for samples in (prior, prior2, prior3, prior4, prior5):  # the same captions as the Stage B that reads them
        assert samples[-4:] == ["--train", str(shard), "--steps", "3"]
    runs = [f"{cmd[cmd.index('--trainer.default_root_dir') + 1]}/{cmd[cmd.index('--run_name') + 1]}"
            for cmd in fits[1:]]  # each phase continues a run made before it
    for i, cmd in enumerate(fits[1:]):
        for flag in ("--model.init_args.init_from", "--model.init_args.compressor"):
            if flag in cmd:
                assert cmd[cmd.index(flag) + 1] in runs[:i]
    assert prior[1:5] == ["--stage-c", f"{out}/stage_c3/v2", "--out", f"{out}/prior_samples.safetensors"]
    assert prior2[1:5] == ["--stage-c", f"{out}/stage_c3/v3", "--out", f"{out}/prior_samples_v3.safetensors"]
    for fit, samples in ((fits[-9], prior), (fits[-8], prior2), (fits[-7], prior2), (fits[-6], prior2),
                         (fits[-5], prior2), (fits[-5], prior3), (fits[-4], prior2), (fits[-4], prior3),
                         (fits[-3], prior2), (fits[-3], prior3), (fits[-3], prior4),
                         (fits[-2], prior2), (fits[-2], prior3), (fits[-2], prior4),
                         (fits[-1], prior2), (fits[-1], prior3), (fits[-1], prior4), (fits[-1], prior5)):
        assert samples[2] in runs and samples[4] in fit[fit.index("--model.init_args.prior_samples") + 1]
    assert fits[1][fits[1].index("--lr_scheduler.init_args.total_steps") + 1] == "6000"
    assert 19.5 < sum(minutes for _, minutes, _ in quickstart.PHASES) / 60 < 20.5  # the docstring's "about 20 hours"


def test_refusals_come_before_any_phase(tmp_path, monkeypatch):
    monkeypatch.setattr(quickstart, "run", lambda *a: pytest.fail("ran a phase"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; choose another --out"):
        main(["--out", str(tmp_path / "taken")])
    with pytest.raises(FileNotFoundError, match="--train: data source .*missing.tar' does not exist"):
        main(["--out", str(tmp_path / "new"), "--train", str(tmp_path / "missing.tar")])
    monkeypatch.setattr(quickstart, "CONFIGS", tmp_path / "configs")
    with pytest.raises(FileNotFoundError, match="needs the configs/ folder"):
        main(["--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def _small_shard(openmoji_dir, path, n=96):
    """The first ``n`` training samples without a skin tone (which the recipe keeps at a fifth): one batch."""
    with tarfile.open(openmoji_dir / "train-000000.tar") as src, tarfile.open(path, "w") as dst:
        members = src.getmembers()
        keys = {m.name.split(".")[0] for m in members if m.name.endswith(".txt")
                and b"skin tone" not in src.extractfile(m).read()}
        keys = set(sorted(keys)[:n])
        for m in members:
            if m.name.split(".")[0] in keys:
                dst.addfile(m, src.extractfile(m))
    return path


@pytest.mark.slow
def test_full_recipe_smoke(tmp_path, openmoji_dir):
    shard = _small_shard(openmoji_dir, tmp_path / "shard.tar")
    out = main(["--out", str(tmp_path / "qs"), "--max-steps", "2", "--train", str(shard), "--prompts", "sun"])
    card = json.loads((out / "checkpoints" / "model_card.json").read_text())
    stages = card["stages"]
    assert stages["stage_c"]["stage"] == "stage_c3" and stages["stage_c"]["chain_steps"] == 8  # 4 Stage C phases
    assert stages["stage_b"]["chain_steps"] == 26  # 13 Stage B phases, the last nine on the prior's samples
    assert stages["compressor"]["source"] == str((out / "stage_b/grid8/version_0/compressor.safetensors").resolve())
    assert read_metadata(out / "prior_samples.safetensors")["steps"] == 2
    assert (out / "grid.png").exists()  # python -m sample read the bundle


@pytest.mark.slow
def test_quick_smoke(tmp_path, monkeypatch):
    out = main(["--quick", "--out", str(tmp_path / "qs"), "--max-steps", "2", "--prompts", "sun", "red apple"])
    card = json.loads((out / "checkpoints" / "model_card.json").read_text())
    assert set(card["stages"]) == {"stage_a", "stage_b", "compressor", "stage_c"}
    assert card["stages"]["stage_c"]["steps"] == 2 and card["stages"]["stage_b"]["wall_time_min"] != "not recorded"
    assert (out / "grid.png").exists()
    with pytest.raises(FileExistsError, match="not empty"):  # never reuses a non-empty folder
        main(["--out", str(out)])
    before = (out / "checkpoints" / "stage_b.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="exists"):  # never writes into a folder that holds a bundle
        bundle_main(["--stage-a", str(out / "stage_a" / "tiny"), "--stage-b", str(out / "stage_b" / "tiny"),
                     "--stage-c", str(out / "stage_c" / "tiny"), "--out", str(out / "checkpoints")])
    assert (out / "checkpoints" / "stage_b.safetensors").read_bytes() == before
