"""Bad input to checkpoint I/O and the tools (converter, bundle, evaluations, comparison, benchmarks,
quickstart): a one-line error naming the problem and the fix, raised before any expensive work, and
nothing written or changed.

Output checks come before any checkpoint is read, so most cases here pass checkpoints that do not
exist: an error about the output proves the order.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weights.checkpoint import (load_safetensors, read_metadata, read_weights, save_safetensors, tensor_digest,
                                fingerprint)
from stages.stage_a import StageA
from weights.loaders import load_stage_a

from .conftest import ROOT, assert_error, assert_cli_error, run_cli, run_main
from sample.__main__ import main as sample_main
from stages.stage_b import StageB, StageBConfig
from semantic_compressor import SemanticCompressor
from pipeline.decoders import load_semantic_decoder
from sample import quickstart
from sample.bundle import main as bundle_main
from weights.convert import main as convert_main
from sample.evaluate import main as evaluate_main
from sample.compare import main as compare_main
from sample.evaluate_stage_a import main as evaluate_stage_a_main
from sample.evaluate_stage_b import main as evaluate_stage_b_main
from benchmarks.__main__ import main as benchmarks_main
from benchmarks.report import main as report_main
from sample.quickstart import main as quickstart_main
from sample.sweep import main as sweep

SHIPPED = ROOT / "checkpoints" / "tiny"


def _stage_a() -> StageA:
    return StageA(dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64))


@pytest.fixture
def export(tmp_path) -> Path:
    """A tiny Stage A export, as the training modules write it (with its checksum)."""
    a = _stage_a()
    return save_safetensors(a, tmp_path / "ckpt" / "stage_a.safetensors", "stage_a", a.config.to_dict())


def _raises(exc, call, *fragments: str) -> str:
    """``call()`` raises ``exc``; its message is one line holding every fragment (case-insensitive)."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


# -- unreadable checkpoint files -------------------------------------------------------------------

def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _pickle_named_safetensors(p: Path) -> None:
    torch.save({"w": torch.zeros(3)}, p)


@pytest.mark.parametrize("damage,fragments", [
    (_empty, ("is empty", "re-export or re-download")),
    (_truncated, ("not a readable safetensors file", "re-export or re-download")),
    (_pickle_named_safetensors, ("not a readable safetensors file", "re-export or re-download")),
], ids=["empty", "truncated", "mislabelled"])
def test_broken_safetensors_is_named(export, unchanged, damage, fragments):
    damage(export)
    with unchanged(export.parent):
        message = _raises(ValueError, lambda: load_stage_a(str(export)), *fragments)
    assert str(export) in message


def test_flipped_bytes_fail_the_checksum(export, unchanged):
    data = bytearray(export.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes: the header still parses
    export.write_bytes(bytes(data))
    with unchanged(export.parent):
        _raises(ValueError, lambda: read_weights(export, "stage_a"), str(export), "corrupt: checksum mismatch",
                "re-export or re-download")


def test_exports_without_a_checksum_still_load(tmp_path):
    """Older exports and converted released weights carry no checksum: they load as before."""
    a = _stage_a()
    old = tmp_path / "old.safetensors"
    save_file(a.state_dict(), str(old), metadata={"stage": "stage_a", "config": json.dumps(a.config.to_dict())})
    loaded = load_stage_a(str(old))
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), a.state_dict().values()))
    assert "checksum" in read_metadata(save_safetensors(a, tmp_path / "new.safetensors", "stage_a",
                                                        a.config.to_dict()))


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.safetensors")), ids=lambda p: p.name)
def test_a_flipped_byte_in_a_shipped_checkpoint_is_caught(path, tmp_path, unchanged):
    """Every shipped export carries a checksum of its tensors: one flipped bit in the middle of its data
    stops loading with the file named."""
    with unchanged(SHIPPED):
        state, meta = load_safetensors(path)
        assert meta.get("checksum") == tensor_digest(state), f"{path.name} carries no (or a wrong) checksum"
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors follow the 8-byte length and the JSON header
    data[start + (len(data) - start) // 2] ^= 0x01
    flipped = tmp_path / path.name
    flipped.write_bytes(bytes(data))
    _raises(ValueError, lambda: load_safetensors(flipped), str(flipped), "corrupt: checksum mismatch",
            "re-export or re-download")


def test_pickle_refused_by_weights_only_loading(tmp_path, unchanged):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hook": Path("x")}, ckpt)  # a pathlib object: not plain weights
    with unchanged(tmp_path):
        _raises(ValueError, lambda: load_stage_a(str(ckpt)), str(ckpt), "weights-only loading refuses")


def test_a_folder_without_an_export_is_named(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    _raises(FileNotFoundError, lambda: load_stage_a(str(folder)), str(folder), "is a folder",
            "pass the checkpoint file itself")


def test_another_stage_is_named(export):
    _raises(ValueError, lambda: read_weights(export, "stage_c"), "holds a stage_a model, not a stage_c",
            "pass the stage_c checkpoint")


def test_unreadable_metadata_is_named(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"stage": "stage_c", "latent_scale": "{oops"})
    _raises(ValueError, lambda: read_metadata(bad), str(bad), "unreadable metadata latent_scale")


def test_sampler_names_a_truncated_stage_c(export, tmp_path, capsys, unchanged):
    """The sampler's metadata reader (``load_prior``) goes through the one checked reader."""
    stage_c = tmp_path / "stage_c.safetensors"
    stage_c.write_bytes(export.read_bytes()[:40])
    with unchanged(tmp_path):
        code, err = run_main(sample_main, ["sun", "--stage-c", str(stage_c), "--out", str(tmp_path / "x.png"),
                                           "--quiet"], capsys)
    assert code == 2
    assert_error(code, err, str(stage_c), "not a readable safetensors file")


# -- paths a checkpoint records work from any working directory -------------------------------------

def _stage_b_recording(root: Path, record: str) -> Path:
    """A tiny Stage B under ``root/runs/b`` whose Stage A record is ``record`` (relative to ``root``)."""
    a = _stage_a()
    save_safetensors(a, root / record, "stage_a", a.config.to_dict())
    b = StageB(StageBConfig(widths=(16, 32), blocks=(1, 1), heads=(0, 2), inject_semantic=(False, True),
                            c_cond=16, c_text=None, dropout=0.0))
    return save_safetensors(b, root / "runs" / "b" / "model.safetensors", "stage_b", b.config.to_dict(),
                            extra={"stage_a_path": record, "stage_a_fingerprint": fingerprint(a)})


def test_relative_stage_a_record_resolves_from_any_cwd(tmp_path, monkeypatch):
    """Older exports recorded Stage A relative to where training ran (the shipped Stage B too)."""
    b = _stage_b_recording(tmp_path / "repo", "runs/a/model.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    decoder = load_semantic_decoder(b)
    assert decoder.stage_a.config.codebook_size == 64


def test_missing_recorded_stage_a_is_named(tmp_path, monkeypatch):
    b = _stage_b_recording(tmp_path / "repo", "runs/a/model.safetensors")
    (tmp_path / "repo" / "runs" / "a" / "model.safetensors").unlink()
    monkeypatch.chdir(tmp_path)
    _raises(FileNotFoundError, lambda: load_semantic_decoder(b), "runs/a/model.safetensors",
            "pass that file explicitly")


def test_quickstart_finds_its_configs_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _, _, args in quickstart.PHASES + quickstart.QUICK:  # every --config, found from here
        words = quickstart.expand(args, tmp_path / "out")
        configs = [Path(w) for flag, w in zip(words, words[1:]) if flag == "--config"]
        assert all(path.is_absolute() and path.is_file() for path in configs)
    monkeypatch.setattr(quickstart, "CONFIGS", tmp_path / "configs")
    _raises(FileNotFoundError, lambda: quickstart.config_file("stage_a/tiny.yaml"), str(tmp_path / "configs"),
            "needs the configs/ folder of a source checkout")


# -- outputs are checked before any work; nothing is overwritten -------------------------------------

NOWHERE = "missing.safetensors"  # never read: the output check comes first


def _bundle_args(out: Path) -> list[str]:
    return ["--stage-a", NOWHERE, "--stage-b", NOWHERE, "--stage-c", NOWHERE, "--out", str(out)]


def test_bundle_never_replaces_a_file_already_in_out(tmp_path, capsys, unchanged):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stage_b.safetensors").write_bytes(b"someone else's")  # no model card: not a finished bundle
    with unchanged(tmp_path):
        code, err = run_main(bundle_main, _bundle_args(out), capsys)
    assert_error(code, err, str(out / "stage_b.safetensors"), "exists", "choose another --out")


def test_bundle_refuses_a_compressor_its_stages_were_not_trained_on(tiny_bundle, tmp_path, capsys, unchanged):
    torch.manual_seed(1)
    other = SemanticCompressor(pretrained=False, trainable="none")
    path = save_safetensors(other, tmp_path / "other" / "compressor.safetensors", "semantic_compressor",
                            other.config.to_dict())
    args = ["--stage-a", str(tiny_bundle / "stage_a.safetensors"), "--stage-b", str(tiny_bundle / "stage_b.safetensors"),
            "--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--out", str(tmp_path / "bundle")]
    with unchanged(tmp_path):
        code, err = run_main(bundle_main, [*args, "--compressor", str(path)], capsys)
    assert_error(code, err, "Stage B", "was not trained on the compressor", str(path), "--compressor")
    assert bundle_main([*args, "--compressor", str(tiny_bundle / "compressor.safetensors")]) == tmp_path / "bundle"


def test_bundle_out_below_a_file(tmp_path, capsys, unchanged):
    (tmp_path / "afile").write_text("x")
    with unchanged(tmp_path):
        code, err = run_main(bundle_main, _bundle_args(tmp_path / "afile"), capsys)
    assert_error(code, err, "is a file, not a folder")


def test_convert_refuses_an_existing_out_without_overwrite(tmp_path, capsys, unchanged):
    out = tmp_path / "stage_a.safetensors"
    out.write_bytes(b"keep")
    with unchanged(tmp_path):
        code, err = run_main(convert_main, ["stage_a", "--src", NOWHERE, "--out", str(out)], capsys)
    assert_error(code, err, str(out), "exists", "--overwrite")


@pytest.mark.parametrize("name,fragment", [("model.pt", "must end in .safetensors"), ("folder", "is a folder")])
def test_convert_out_must_be_a_safetensors_file(tmp_path, capsys, unchanged, name, fragment):
    (tmp_path / "folder").mkdir()
    with unchanged(tmp_path):
        code, err = run_main(convert_main, ["stage_a", "--src", NOWHERE, "--out", str(tmp_path / name)], capsys)
    assert_error(code, err, "--out", fragment)


def test_convert_overwrite_replaces_the_file(tmp_path, capsys):
    """``--overwrite`` (which the refusal points at) replaces the output; without it, it stays."""
    diffusers_vq = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model")
    diffusers_vq.PaellaVQModel(embed_dim=64, bottleneck_blocks=1, num_vq_embeddings=8).save_pretrained(tmp_path / "vq")
    out = tmp_path / "stage_a.safetensors"
    out.write_bytes(b"old")
    convert_main(["stage_a", "--src", str(tmp_path / "vq"), "--out", str(out), "--overwrite"])
    assert read_metadata(out)["stage"] == "stage_a" and "checksum" in read_metadata(out)


@pytest.mark.parametrize("name,exc,fragment", [
    ("eval.json", FileExistsError, "exists"),
    ("eval.txt", ValueError, "must end in .json"),
])
def test_sample_evaluate_checks_out_first(tmp_path, capsys, unchanged, name, exc, fragment):
    (tmp_path / "eval.json").write_text("{}")
    with unchanged(tmp_path):
        code, err = run_main(evaluate_main, ["--stage-c", NOWHERE, "--out", str(tmp_path / name)], capsys)
    assert_error(code, err, "--out", fragment)


def test_compare_out_is_a_file(tmp_path, capsys, unchanged):
    (tmp_path / "cmp").write_text("x")
    with unchanged(tmp_path):
        code, err = run_main(compare_main, ["--stage-c", NOWHERE, "--out", str(tmp_path / "cmp")], capsys)
    assert_error(code, err, "is a file", "new or empty folder")


def test_evaluate_stage_a_out_below_a_file(tmp_path, capsys, unchanged):
    """Pointing below an existing file: a path no user, root included, can write."""
    (tmp_path / "afile").write_text("x")
    with unchanged(tmp_path):
        code, err = run_main(evaluate_stage_a_main, ["--checkpoint", NOWHERE, "--out", str(tmp_path / "afile" / "e.json")], capsys)
    assert_error(code, err, "is a file, not a folder")


def test_evaluate_stage_b_out_in_a_read_only_folder(tmp_path, capsys, unchanged, monkeypatch):
    """Tests run as root, for whom ``os.access`` calls every folder writable: a read-only one is simulated."""
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with unchanged(tmp_path):
        code, err = run_main(evaluate_stage_b_main, ["--checkpoint", NOWHERE, "--out", str(tmp_path / "e.json")], capsys)
    assert_error(code, err, "read-only", "choose another --out")


def test_benchmarks_refuse_a_non_empty_out(tmp_path, capsys, unchanged):
    (tmp_path / "results.json").write_text("{}")
    with unchanged(tmp_path):
        code, err = run_main(benchmarks_main, ["--quick", "--parts", "counts", "--out", str(tmp_path)], capsys)
    assert_error(code, err, "not empty", "choose another --out")


def test_benchmarks_report_names_a_file_that_is_not_results(tmp_path, capsys, unchanged):
    (tmp_path / "notes.json").write_text("not json")
    with unchanged(tmp_path):
        code, err = run_main(report_main, [str(tmp_path / "notes.json"), "--out", str(tmp_path / "report")], capsys)
    assert_error(code, err, "notes.json", "not a benchmarks results file")


def test_quickstart_out_is_a_file(tmp_path, capsys, unchanged):
    (tmp_path / "qs").write_text("x")
    with unchanged(tmp_path):
        code, err = run_main(quickstart_main, ["--out", str(tmp_path / "qs")], capsys)
    assert_error(code, err, "is a file", "--out")


def test_quickstart_names_a_missing_training_source(tmp_path, capsys, unchanged):
    with unchanged(tmp_path):
        code, err = run_main(quickstart_main, ["--out", str(tmp_path / "qs"), "--train", str(tmp_path / "no.tar")], capsys)
    assert_error(code, err, "--train", "does not exist", "give openmoji")


# -- arguments that make no sense are refused when parsed, naming the flag ----------------------------

@pytest.mark.parametrize("module,argv,flag,fragment", [
    ("sample.evaluate", ["--limit", "0"], "--limit", "at least 1"),
    ("sample.evaluate", ["--gallery-limit", "0"], "--gallery-limit", "at least 5"),
    ("sample.evaluate", ["--seed", "-1"], "--seed", "at least 0"),
    ("sample.evaluate", ["--seed", str(2**63)], "--seed", "below 2**63"),
    ("sample.evaluate", ["--size", "0"], "--size", "at least 1"),
    ("sample.compare", ["--grid-columns", "0"], "--grid-columns", "at least 1"),
    ("sample.compare", ["--batch-size", "-2"], "--batch-size", "at least 1"),
    ("sample.evaluate_stage_a", ["--checkpoint", NOWHERE, "--limit", "-3"], "--limit", "at least 1"),
    ("sample.evaluate_stage_a", ["--checkpoint", NOWHERE, "--photo-size", "0"], "--photo-size", "at least 1"),
    ("sample.evaluate_stage_b", ["--checkpoint", NOWHERE, "--steps", "0"], "--steps", "at least 1"),
    ("sample.evaluate_stage_b", ["--checkpoint", NOWHERE, "--seed", "x"], "--seed", "whole number"),
    ("benchmarks.__main__", ["--parts", "counts,bogus"], "--parts", "unknown ['bogus']"),
    ("benchmarks.__main__", ["--sizes", "huge"], "--sizes", "choose from tiny,paper,release"),
    ("benchmarks.__main__", ["--batch-sizes", "1,0"], "--batch-sizes", "at least 1"),
    ("benchmarks.__main__", ["--device", "gpu9"], "--device", "unknown device"),
    ("sample.quickstart", ["--max-steps", "0"], "--max-steps", "at least 1"),
])
def test_nonsense_arguments_are_refused_when_parsed(tmp_path, capsys, unchanged, monkeypatch, module, argv, flag,
                                                     fragment):
    main = importlib.import_module(module).main
    monkeypatch.chdir(tmp_path)  # default outputs would land here
    with unchanged(tmp_path):
        code, err = run_main(main, argv, capsys)
    assert code == 2
    assert_error(code, err, flag, fragment)


# -- the commands themselves: one line on stderr, exit status 2, from any directory -------------------

@pytest.mark.slow
def test_convert_cli_names_a_corrupt_source_from_another_cwd(tmp_path, unchanged):
    src = tmp_path / "vqgan.safetensors"
    src.write_bytes(b"\x00" * 64)
    with unchanged(tmp_path):
        proc = run_cli("weights.convert", "stage_a", "--src", str(src), "--out", str(tmp_path / "out.safetensors"),
                       cwd=tmp_path)
    assert proc.returncode == 2
    assert_cli_error(proc, str(src), "not a readable safetensors file", "WUERSTCHEN_TRACEBACK=1")


@pytest.mark.slow
def test_bundle_cli_refuses_a_stray_file_from_another_cwd(tmp_path, unchanged):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "MODEL_CARD.md").write_text("mine")
    with unchanged(tmp_path):
        proc = run_cli("sample.bundle", *_bundle_args(Path("out")), cwd=tmp_path)
    assert proc.returncode == 2
    assert_cli_error(proc, "MODEL_CARD.md", "exists")


def test_sweep_refuses_a_folder_that_is_not_its_own_before_any_work(tmp_path, capsys, unchanged):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with unchanged(tmp_path):
        code, err = run_main(sweep, ["--out", str(taken), "--stage-c", str(tmp_path / "missing.safetensors")], capsys)
        assert_error(code, err, str(taken), "empty")
        code, err = run_main(sweep, ["--out", str(tmp_path / "new"), "--samplers", "ddpm,euler"], capsys)
        assert_error(code, err, "--samplers", "euler")
        code, err = run_main(sweep, ["--out", str(tmp_path / "new"), "--fast", "20"], capsys)
        assert_error(code, err, "--fast takes two step counts")
        code, err = run_main(sweep, ["--out", str(tmp_path / "new"), "--sampler", "ddim", "--prior-steps", "20"], capsys)
        assert_error(code, err, "sets --prior-steps, --sampler itself")
