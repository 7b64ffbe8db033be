"""``python -m train.precompute``: latent shards + manifest, resume after an interruption, no silent
overwrite, and loading them gives what encoding the images gives."""
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train.precompute as precompute
from weights.loaders import load_compressor, load_stage_a
from weights.checkpoint import fingerprint
from common.errors import run_command
from pipeline.text_encoder import build_text_encoder
from tests.test_data import write_tar
from train.data import ImageTextData

ROOT = Path(__file__).resolve().parents[1]
STAGE_A = str(ROOT / "checkpoints" / "tiny_grid3" / "stage_a.safetensors")
COMPRESSOR = str(ROOT / "checkpoints" / "tiny_grid3" / "compressor.safetensors")


def photo(seed: int, size) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path) -> Path:
    """Three shards of 5 images (landscape, portrait, square) with captions; one sample is broken."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = [(96, 64), (64, 96), (80, 80)]
    for s in range(3):
        samples = [(f"s{s}_{j}", {"png": photo(10 * s + j, sizes[(s + j) % 3]), "txt": f"picture {s} {j}"})
                   for j in range(5)]
        if s == 1:
            samples[2] = ("s1_2", {"png": b"\x89PNG broken", "txt": "broken"})
        write_tar(folder / f"{s:06d}.tar", samples)
    return folder


def run(shards: Path, out: Path, *extra: str) -> dict:
    return precompute.main(["--shards", str(shards), "--out", str(out), "--stage-a", STAGE_A,
                            "--compressor", COMPRESSOR, "--image-size", "64", "--batch-size", "3",
                            "--device", "cpu", *extra])


def test_writes_shards_and_manifest_and_loads_as_encoding_the_images_gives(shards, tmp_path):
    out = tmp_path / "latents"
    manifest = run(shards, out)
    stage_a, compressor = load_stage_a(STAGE_A), load_compressor(COMPRESSOR)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved == manifest and saved["complete"] is True
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "000002.tar", "manifest.json"]
    assert saved["shards"] == {"000000.tar": 5, "000001.tar": 4, "000002.tar": 5} and saved["count"] == 14
    assert saved["skipped"] == {"corrupt_sample": 1}
    assert saved["stage_a_fingerprint"] == fingerprint(stage_a)
    assert saved["compressor_fingerprint"] == fingerprint(compressor)
    assert saved["text_encoder"] is None and saved["text_encoder_fingerprint"] is None
    assert saved["keys"] == ["stage_a", "semantic"] and saved["image_size"] == 64

    subset = ImageTextData(train=str(out / "00000{0..1}.tar"), val=str(shards), precomputed=str(out / "manifest.json"))
    subset.setup("fit")
    assert subset.precomputed == saved and subset.manifests["val"] is None
    assert subset.train_set.count == 9 and subset.train_set.prep is None and subset.val_set.prep is not None
    with pytest.raises(FileNotFoundError, match="precomputed is set, but there is no manifest.json next to"):
        ImageTextData(train=str(shards), val=None, precomputed=True)
    with pytest.raises(ValueError, match="photo_crops_every 2: .*not precomputed ones"):
        ImageTextData(train=str(out), val=None, photo_crops_every=2)
    latents = ImageTextData(train=str(out), val=None, batch_size=4, num_workers=0, shuffle_buffer=1)
    assert latents.precomputed == saved
    latents.setup("fit")
    assert latents.train_set.count == 14  # from the manifest: equal batches per rank without train_count
    images = ImageTextData(train=None, val=str(shards), image_size=64, batch_size=4, num_workers=0)
    assert images.precomputed is None
    images.setup("validate")
    got = {}
    for b in latents.train_set:
        assert set(b) == {"caption", "key", "stage_a", "semantic"}
        assert b["stage_a"].dtype == torch.float32 and b["stage_a"].shape[1:] == (4, 16, 16)
        for i, key in enumerate(b["key"]):
            got[key] = (b["caption"][i], b["stage_a"][i], b["semantic"][i])
    assert len(got) == 12  # 14 samples, batches of 4, partial batch dropped in training
    seen = 0
    with torch.no_grad():
        for b in images.val_dataloader():
            want_a, want_s = stage_a.encode(b["image"]), compressor(b["image"])
            for i, key in enumerate(b["key"]):
                if key in got:
                    caption, a, s = got[key]
                    assert caption == b["caption"][i]
                    torch.testing.assert_close(a, want_a[i].half().float(), atol=2e-3, rtol=2e-3)
                    torch.testing.assert_close(s, want_s[i].half().float(), atol=2e-3, rtol=2e-3)
                    seen += 1
    assert seen == 12


def test_text_states_and_buckets(shards, tmp_path):
    out = tmp_path / "latents"
    precompute.main(["--shards", str(shards / "000000.tar"), "--out", str(out), "--text-encoder", "minilm",
                     "--compressor", COMPRESSOR, "--buckets", "64x96,96x64,64x64", "--keep-images", "--device", "cpu"])
    manifest = json.loads((out / "manifest.json").read_text())
    text = build_text_encoder("minilm")
    assert manifest["keys"] == ["semantic", "text"] and manifest["text_encoder"] == "minilm"
    assert manifest["text_encoder_fingerprint"] == fingerprint(text)
    assert manifest["buckets"] == [[64, 96], [96, 64], [64, 64]]
    dm = ImageTextData(train=None, val=str(out), batch_size=8, num_workers=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == 5
    shapes = {tuple(b["image"].shape[2:]) for b in batches}
    assert shapes == {(64, 96), (96, 64), (64, 64)}  # one batch per bucket
    for b in batches:
        assert b["text"].shape[1:] == (text.max_tokens, text.dim)
        torch.testing.assert_close(b["text"], text(b["caption"]).half().float(), atol=2e-3, rtol=2e-3)
        assert 0 <= b["image"].min() and b["image"].max() <= 1


def test_an_interrupted_run_continues_where_it_stopped(shards, tmp_path, monkeypatch):
    out = tmp_path / "latents"
    real = precompute.precompute_shard
    calls = []

    def interrupted(url, *args):
        calls.append(Path(url).name)
        if calls == ["000000.tar", "000001.tar"]:  # stopped (Ctrl-C, a killed job) during the second shard
            raise KeyboardInterrupt
        return real(url, *args)
    monkeypatch.setattr(precompute, "precompute_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["shards"] == {"000000.tar": 5}
    first = (out / "000000.tar").stat().st_mtime_ns
    with pytest.raises(ValueError, match="did not finish; run the same python -m train.precompute command again"):
        ImageTextData(train=str(out), val=None)
    with pytest.raises(FileExistsError, match="interrupted precompute with other settings"):
        run(shards, out, "--min-size", "70")  # other settings: not mixed into the same folder
    calls.clear()
    run(shards, out)
    assert calls == ["000001.tar", "000002.tar"]  # the finished shard is not encoded again
    assert (out / "000000.tar").stat().st_mtime_ns == first
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 14 and not list(out.glob("*.partial"))


def test_refuses_to_overwrite_without_the_flag(shards, tmp_path, capsys):
    out = tmp_path / "latents"
    run(shards, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    argv = ["--shards", str(shards), "--out", str(out), "--compressor", COMPRESSOR, "--device", "cpu"]
    capsys.readouterr()  # the first run's progress bar
    with pytest.raises(SystemExit) as e:
        run_command(precompute.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"error: --out {out} holds a finished precompute; choose another --out or pass --overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    run_command(precompute.main, argv + ["--overwrite", "--image-size", "48"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["keys"] == ["semantic"] and manifest["image_size"] == 48 and manifest["count"] == 14


@pytest.mark.parametrize("argv,message", [
    (["--shards", "{shards}", "--out", "{out}"], "give at least one of --stage-a, --compressor, --text-encoder"),
    (["--shards", "{shards}/nothing-*.tar", "--out", "{out}", "--compressor", COMPRESSOR], "no shards match"),
    (["--shards", "{shards}", "--out", "{out}", "--stage-a", "{shards}/no.safetensors"], "no.safetensors"),
    (["--shards", "{shards}", "--out", "{out}", "--compressor", COMPRESSOR, "--buckets", "64x90"], "multiples of 4"),
    (["--shards", "{shards}", "--out", "{shards}", "--compressor", COMPRESSOR], "is not empty"),
])
def test_bad_input_is_one_line_and_writes_nothing(shards, tmp_path, capsys, argv, message):
    out = tmp_path / "latents"
    argv = [a.format(shards=shards, out=out) for a in argv]
    with pytest.raises(SystemExit) as e:
        run_command(precompute.main, argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and message in err
    assert not out.exists() and sorted(os.listdir(shards)) == ["000000.tar", "000001.tar", "000002.tar"]
