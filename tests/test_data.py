"""Data: the embedded OpenMoji set, image decoding, shard and folder loaders, DDP/worker splitting."""
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import imagedata.embedded as embedded
import imagedata.shards as stream
from imagedata.embedded import (build_openmoji, emoji_captions, openmoji_shards, split_of, HELDOUT_SKIMAGE,
                                HELDOUT_SKLEARN, heldout_photos, training_photos)
from imagedata.images import FolderDataset, decode_image, resize_crop, to_rgb, PhotoCrops
from imagedata.shards import (FLIPPED, Filters, ImagePrep, SampleCounts, ShardSet, ShardStream, existing_shards, list_shards,
                              shard_samples, interleave)
from train.data import ImageTextData

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- helpers

def img_bytes(color=(255, 0, 0), size=(16, 16), fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, samples) -> Path:
    """``samples``: list of ``(key, {ext: bytes | str})``, written in order as ``key.ext`` members."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                data = data.encode("utf-8") if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(folder, sizes, image=None, prefix="shard") -> tuple[list[str], list[str]]:
    """One tar per entry of ``sizes`` with that many png+txt samples; returns (shard paths, all keys)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = image if image is not None else img_bytes()
    paths, keys = [], []
    for s, n in enumerate(sizes):
        samples = [(f"{prefix}{s:02d}_{j:03d}", {"png": image, "txt": f"caption {s} {j}"}) for j in range(n)]
        paths.append(str(write_tar(folder / f"{prefix}-{s:06d}.tar", samples)))
        keys += [k for k, _ in samples]
    return paths, keys


@functools.lru_cache(maxsize=None)
def _read_split(data_dir: str, split: str) -> tuple[tuple, ...]:
    """(key, caption, json) of every sample in a split, in shard order, read straight from the tars."""
    index = json.loads((Path(data_dir) / "index.json").read_text())
    out = []
    for shard in index["splits"][split]["shards"]:
        for s in shard_samples([{"url": str(Path(data_dir) / shard)}], SampleCounts()):
            out.append((s["__key__"], s["txt"].decode(), json.loads(s["json"]), s["png"]))
    return tuple(out)


def stream_of(shards, size=8, batch_size=1, train=False, filters=None, buckets=None, shuffle_buffer=1000, seed=0,
              count=None) -> ShardStream:
    """A shard stream of image samples, as the data module builds it."""
    prep = ImagePrep(size, None, "random" if train else "center", filters or Filters(), buckets)
    return ShardStream([ShardSet(list_shards(shards))], batch_size, prep, train=train, shuffle_buffer=shuffle_buffer,
                       seed=seed, count=count)


def samples_of(ds) -> list[dict]:
    """The batches of a stream, taken apart into samples again."""
    return [{k: v[i] for k, v in b.items()} for b in ds for i in range(len(b["key"]))]


def keys_of(ds) -> list[str]:
    return [k for b in ds for k in b["key"]]


def emoji_key(ch: str) -> str:
    return "-".join(f"{ord(c):x}" for c in ch)


# ------------------------------------------------------------------------------------- 1. embedded set

def test_openmoji_index_counts_match_shards(openmoji_dir):
    index = json.loads((openmoji_dir / "index.json").read_text())
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert 3900 <= train["count"] + val["count"] <= 4050  # 3,963 with the pinned emoji package
    assert 150 <= val["count"] <= 230  # ~1 in 20 (185)
    assert "OpenMoji" in index["attribution"] and "CC BY-SA 4.0" in index["attribution"]
    for split, info in index["splits"].items():
        assert info["shards"] and all((openmoji_dir / s).is_file() for s in info["shards"])
        assert len(_read_split(str(openmoji_dir), split)) == info["count"]
    assert len(index["splits"]["train"]["shards"]) == -(-train["count"] // embedded.SHARD_SIZE)
    paths, n = openmoji_shards(openmoji_dir, "val")
    assert n == val["count"] and [Path(p).name for p in paths] == val["shards"]
    with pytest.raises(ValueError, match="unknown split"):
        openmoji_shards(openmoji_dir, "test")


def test_openmoji_samples_are_png_with_cldr_captions(openmoji_dir):
    train = _read_split(str(openmoji_dir), "train")
    val = _read_split(str(openmoji_dir), "val")
    captions = {cap for _, cap, _, _ in train + val}
    assert {"red apple", "grinning face", "thumbs up", "dog face"} <= captions
    for key, cap, meta, _ in train + val:
        assert cap and cap == meta["caption"] and ":" not in cap and "_" not in cap
        assert key == emoji_key(meta["emoji"])
    apple = next(s for s in train if s[1] == "red apple")
    image = decode_image(apple[3])
    assert image.mode == "RGB" and image.size == (128, 128)
    a = np.asarray(image)
    assert (a[0, 0] == 255).all() and (a[-1, -1] == 255).all()  # white background, transparency composited
    centre = a[48:80, 48:80].reshape(-1, 3).mean(0)
    assert centre[0] > 150 and centre[0] > centre[1] + 60  # a red apple is red


def test_openmoji_split_is_a_pure_function_of_the_caption(openmoji_dir):
    for cap in ("red apple", "Algeria", "European Union", "thumbs up", "x" * 300, "é 日本"):
        digest = int(hashlib.sha256(cap.encode("utf-8")).hexdigest(), 16)
        assert split_of(cap) == ("val" if digest % embedded.VAL_EVERY == 0 else "train") == split_of(cap)
    # pinned: the split must never change between machines or versions
    assert [split_of(c) for c in ("Algeria", "Cayman Islands", "European Union", "Italy")] == ["val"] * 4
    assert [split_of(c) for c in ("red apple", "grinning face", "thumbs up", "rocket")] == ["train"] * 4

    got = {split: _read_split(str(openmoji_dir), split) for split in ("train", "val")}
    caps = {split: {cap for _, cap, _, _ in rows} for split, rows in got.items()}
    assert not caps["train"] & caps["val"]
    for split, rows in got.items():
        assert all(split_of(cap) == split for _, cap, _, _ in rows)
        keys = [k for k, _, _, _ in rows]
        assert len(keys) == len(set(keys))
        expected = sorted(emoji_key(ch) for ch, cap in emoji_captions() if split_of(cap) == split)
        skipped = json.loads((openmoji_dir / "index.json").read_text())["splits"][split]["skipped_unrenderable"]
        assert set(keys) <= set(expected) and len(expected) - len(keys) == skipped


def test_openmoji_build_is_deterministic(openmoji_dir, tmp_path, monkeypatch):
    items = emoji_captions()
    subset = items[::150] + [it for it in items if split_of(it[1]) == "val"][:5]
    monkeypatch.setattr(embedded, "emoji_captions", lambda: sorted(subset, key=lambda x: x[1]))
    a, b = build_openmoji(tmp_path / "a", size=32), build_openmoji(tmp_path / "b", size=32)
    for split in ("train", "val"):
        rows_a, rows_b = _read_split(str(a), split), _read_split(str(b), split)
        assert rows_a  # both splits present
        assert [r[0] for r in rows_a] == [r[0] for r in rows_b]  # identical keys in identical order
        assert [r[3] for r in rows_a] == [r[3] for r in rows_b]  # and identical pixels
        full = {r[0] for r in _read_split(str(openmoji_dir), split)}
        assert {r[0] for r in rows_a} <= full  # the same split as the full build
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())


def test_openmoji_build_refuses_a_nonempty_folder_without_index(tmp_path, monkeypatch):
    out = tmp_path / "half"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"partial")
    monkeypatch.setattr(embedded, "_font", lambda: pytest.fail("must not start rendering"))
    with pytest.raises(FileExistsError, match="no index.json"):
        build_openmoji(out)
    with pytest.raises(FileNotFoundError):
        openmoji_shards(tmp_path / "empty", "train", build=False)


def test_openmoji_complete_build_is_not_overwritten(openmoji_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in openmoji_dir.iterdir()}
    monkeypatch.setattr(embedded, "_font", lambda: pytest.fail("a complete build must not be re-rendered"))
    assert build_openmoji(openmoji_dir) == openmoji_dir
    assert openmoji_shards(openmoji_dir, "train")[1] > 0
    assert {p.name: p.stat().st_mtime_ns for p in openmoji_dir.iterdir()} == before


def test_openmoji_overwrite_never_leaves_a_stale_index_or_shards(tmp_path, monkeypatch):
    items = [it for it in emoji_captions() if split_of(it[1]) == "train"][:12]
    items += [it for it in emoji_captions() if split_of(it[1]) == "val"][:2]
    monkeypatch.setattr(embedded, "emoji_captions", lambda: items)
    monkeypatch.setattr(embedded, "SHARD_SIZE", 4)
    out = build_openmoji(tmp_path / "o", size=16)
    assert len(json.loads((out / "index.json").read_text())["splits"]["train"]["shards"]) == 3
    # a rebuild with fewer shards lists only its own shards
    monkeypatch.setattr(embedded, "SHARD_SIZE", 500)
    build_openmoji(out, size=16, overwrite=True)
    index = json.loads((out / "index.json").read_text())
    assert index["splits"]["train"]["shards"] == ["train-000000.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    # an interrupted rebuild must not look complete
    monkeypatch.setattr(embedded, "render", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_openmoji(out, size=16, overwrite=True)
    assert not (out / "index.json").exists()
    with pytest.raises(FileExistsError):
        build_openmoji(out, size=16)


# ------------------------------------------------------------------------------------ 2. image decoding

def _as_tensor(data: bytes) -> torch.Tensor:
    image = decode_image(data)
    return resize_crop(image, min(image.size))  # no resampling: the exact decoded values


def _encode(image: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _check(t: torch.Tensor, expected_rgb_u8) -> None:
    expected = torch.tensor(np.asarray(expected_rgb_u8, dtype=np.float32) / 255.0).permute(2, 0, 1)
    assert t.dtype == torch.float32 and t.shape == expected.shape and t.shape[0] == 3
    assert 0.0 <= t.min() and t.max() <= 1.0
    torch.testing.assert_close(t, expected, atol=1.01 / 255, rtol=0)


def test_decode_grayscale():
    a = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    im = Image.fromarray(a, mode="L")
    _check(_as_tensor(_encode(im)), np.repeat(a[..., None], 3, axis=2))


def test_decode_rgba_composites_transparency_on_white():
    a = np.array([[[255, 0, 0, 0], [0, 0, 255, 255]], [[0, 0, 0, 128], [0, 255, 0, 255]]], dtype=np.uint8)
    im = Image.fromarray(a, mode="RGBA")
    expected = [[[255, 255, 255], [0, 0, 255]], [[127, 127, 127], [0, 255, 0]]]
    _check(_as_tensor(_encode(im)), expected)
    la = Image.fromarray(np.array([[[10, 0], [10, 255]], [[10, 255], [10, 0]]], dtype=np.uint8), mode="LA")
    _check(_as_tensor(_encode(la)), [[[255] * 3, [10] * 3], [[10] * 3, [255] * 3]])


def test_decode_palette_with_and_without_transparency():
    im = Image.new("P", (2, 2))
    im.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 30] + [0] * 759)
    im.putdata([0, 1, 2, 0])
    _check(_as_tensor(_encode(im)), [[[255, 0, 0], [0, 128, 0]], [[10, 20, 30], [255, 0, 0]]])
    assert Image.open(io.BytesIO(_encode(im, transparency=0))).mode == "P"
    _check(_as_tensor(_encode(im, transparency=0)), [[[255, 255, 255], [0, 128, 0]], [[10, 20, 30], [255] * 3]])


def test_decode_16bit_uses_the_full_range():
    a = np.array([[0, 257], [32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    data = _encode(im)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    _check(_as_tensor(data), np.repeat(np.array([[0, 1], [128, 255]], np.uint8)[..., None], 3, axis=2))
    # a dark 16-bit image stays dark: it is not mistaken for 8-bit values
    dark = Image.fromarray(np.full((2, 2), 200, dtype=np.uint16))
    assert _as_tensor(_encode(dark)).max() <= 1 / 255 + 1e-6
    _check(resize_crop(to_rgb(dark), 2), np.ones((2, 2, 3), np.uint8))


def test_decode_cmyk():
    a = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 0, 0, 255], [0, 255, 255, 0]]], dtype=np.uint8)
    im = Image.fromarray(a, mode="CMYK")
    expected = [[[255, 255, 255], [0, 255, 255]], [[0, 0, 0], [255, 0, 0]]]
    _check(resize_crop(to_rgb(im), 2), expected)
    _check(_as_tensor(_encode(im, "TIFF")), expected)
    jpg = _as_tensor(_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert jpg.shape == (3, 16, 16)
    assert jpg[0].mean() > 0.9 and jpg[1].mean() < 0.1 and jpg[2].mean() < 0.1  # red


def test_decode_rejects_garbage():
    with pytest.raises(Exception):
        decode_image(b"not an image at all")


@pytest.mark.parametrize("crop", ["center", "random"])
@pytest.mark.parametrize("wh", [(40, 20), (20, 40), (33, 17), (16, 16), (9, 100)])
def test_resize_crop_shape(crop, wh):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    for size, resize in ((16, None), (8, 12)):
        t = resize_crop(image, size, resize, crop=crop, rng=random.Random(1))
        assert t.shape == (3, size, size) and t.dtype == torch.float32
        assert 0 <= t.min() and t.max() <= 1


def _stripes(w=30, h=10) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3, 0] = 255
    a[:, w // 3: 2 * w // 3, 1] = 255
    a[:, 2 * w // 3:, 2] = 255
    return Image.fromarray(a)


def test_center_crop_takes_the_middle_and_random_crop_moves():
    t = resize_crop(_stripes(), 10)  # shorter side already 10: no resize, crop the middle third
    assert (t[1] == 1).all() and (t[0] == 0).all() and (t[2] == 0).all()
    t = resize_crop(_stripes(60, 20), 10)  # halved, then the same middle third
    assert t[1, :, 2:8].min() > 0.9 and t[0, :, 2:8].max() < 0.1
    crops = {tuple(resize_crop(_stripes(), 10, crop="random", rng=random.Random(s))[:, 0, 0].tolist())
             for s in range(30)}
    assert {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)} <= crops  # starts in the red and the green third
    same = [resize_crop(_stripes(), 10, crop="random", rng=random.Random(7)) for _ in range(2)]
    torch.testing.assert_close(*same)  # seeded
    with pytest.raises(ValueError, match="crop"):
        resize_crop(_stripes(), 10, crop="middle")


def test_resize_crop_limits():
    image = Image.new("RGB", (40, 12))
    assert resize_crop(image, 8).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="at least the crop size"):
        resize_crop(image, 16, resize=8)


# ------------------------------------------------------------------------------------- 3. shard streams

def test_shards_read_jpg_png_webp_with_txt_or_json_captions(tmp_path):
    import webdataset as wds

    write_tar(tmp_path / "a.tar", [
        ("k0", {"jpg": img_bytes((255, 0, 0), fmt="JPEG"), "txt": "a red square"}),
        ("k1", {"png": img_bytes((0, 255, 0)), "json": json.dumps({"caption": "a green square", "w": 16})}),
        ("k2", {"webp": img_bytes((0, 0, 255), fmt="WEBP", size=(24, 20)), "json": json.dumps({"TEXT": "blue"})}),
        ("k3", {"jpeg": img_bytes((255, 255, 0), fmt="JPEG"), "caption": "  yellow  "}),
        ("k4", {"png": img_bytes((0, 0, 0))}),  # no caption at all
        ("k5", {"txt": "only a caption, no image"}),
    ])
    with wds.ShardWriter(str(tmp_path / "b-%06d.tar"), maxcount=10, verbose=0) as sink:
        sink.write({"__key__": "w0", "png": img_bytes((255, 255, 255)), "txt": "white from ShardWriter"})
        sink.write({"__key__": "w1", "jpg": img_bytes((0, 255, 255), fmt="JPEG"),
                    "json": json.dumps({"prompt": "cyan"})})
    ds = stream_of([str(tmp_path / "a.tar"), str(tmp_path / "b-*.tar")], size=16)
    got = {s["key"]: s for s in samples_of(ds)}
    assert {k: s["caption"] for k, s in got.items()} == {
        "k0": "a red square", "k1": "a green square", "k2": "blue", "k3": "yellow", "k4": "",
        "w0": "white from ShardWriter", "w1": "cyan"}
    assert ds.skipped["no_image"] == 1
    colours = {"k0": (1, 0, 0), "k1": (0, 1, 0), "k2": (0, 0, 1), "k3": (1, 1, 0), "w0": (1, 1, 1), "w1": (0, 1, 1)}
    for key, rgb in colours.items():
        t = got[key]["image"]
        assert t.shape == (3, 16, 16)
        torch.testing.assert_close(t.mean((1, 2)), torch.tensor(rgb, dtype=torch.float32), atol=0.03, rtol=0)


def test_a_corrupt_image_is_skipped_counted_and_logged(tmp_path, caplog):
    good = img_bytes()
    write_tar(tmp_path / "s.tar", [("a", {"png": good, "txt": "1"}), ("b", {"png": b"\x89PNG garbage", "txt": "2"}),
                                   ("c", {"jpg": good[:40], "txt": "3"}), ("d", {"png": good, "txt": "4"})])
    ds = stream_of(str(tmp_path / "s.tar"), size=8)
    with caplog.at_level(logging.WARNING, logger="imagedata.shards"):
        keys = keys_of(ds)
    assert keys == ["a", "d"]
    assert ds.skipped["corrupt_sample"] == 2
    assert any("skipped sample b" in r.getMessage() and "corrupt_sample" in r.getMessage() for r in caplog.records)


def test_broken_and_empty_shards_are_skipped(tmp_path, caplog):
    paths, keys = make_shards(tmp_path, [3, 10, 4])
    good0, full, good2 = paths
    truncated = tmp_path / "truncated.tar"
    with tarfile.open(full) as tar:
        cut = tar.getmembers()[11]  # shard01_005.txt
        cut = cut.offset_data + cut.size // 2
    truncated.write_bytes(Path(full).read_bytes()[:cut])  # ends inside a member: a download cut short
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file\n" * 100)
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    ds = stream_of([good0, str(garbage), str(zero), str(truncated), str(empty), good2, str(tmp_path / "gone.tar")],
                   size=8)
    with caplog.at_level(logging.WARNING, logger="imagedata.shards"):
        got = keys_of(ds)
    partial = [k for k in got if k.startswith("shard01")]
    assert partial == keys[3: 3 + 5]  # the complete samples before the cut
    assert got == keys[:3] + partial + keys[13:]
    assert ds.skipped["corrupt_shard"] == 3  # garbage, zero bytes, truncated; a valid empty tar is fine
    assert ds.skipped["missing_shard"] == 1 and ds.skipped.causes["missing_shard"].startswith("file not found: ")
    assert sum("skipping the rest of shard" in r.getMessage() for r in caplog.records) == 4


def test_no_readable_sample_with_a_count_fails_clearly(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00\x01junk" * 50)
    bad_images = write_tar(tmp_path / "bad.tar", [(f"k{i}", {"png": b"nope", "txt": "x"}) for i in range(3)])
    ds = stream_of([str(garbage), str(bad_images)], size=8, count=10)
    with pytest.raises(ValueError, match=r"no readable sample for rank 0 worker 0 in 2 shards") as e:
        list(ds)
    assert "corrupt_shard" in str(e.value) and "corrupt_sample" in str(e.value)
    assert list(stream_of([str(garbage)], size=8)) == []  # without a count: simply nothing


def test_list_shards(tmp_path):
    assert list_shards("d/shard-{000000..000003}.tar") == [f"d/shard-{i:06d}.tar" for i in range(4)]
    assert list_shards("d/{a,b}-{0..1}.tar") == ["d/a-0.tar", "d/a-1.tar", "d/b-0.tar", "d/b-1.tar"]
    paths, _ = make_shards(tmp_path, [1, 1, 1])
    assert list_shards(str(tmp_path / "shard-*.tar")) == sorted(paths)
    assert list_shards(str(tmp_path)) == sorted(paths)  # a folder of shards
    assert list_shards(str(tmp_path / "shard-00000[02].tar")) == [paths[0], paths[2]]
    assert list_shards([paths[2], str(tmp_path / "shard-00000{0..1}.tar")]) == [paths[2], paths[0], paths[1]]
    assert list_shards(paths[1]) == [paths[1]]
    assert list_shards("https://host/x-{0..1}.tar") == ["https://host/x-0.tar", "https://host/x-1.tar"]
    assert list_shards("pipe:cat /d/{a,b}.tar") == ["pipe:cat /d/a.tar", "pipe:cat /d/b.tar"]
    assert list_shards("s3://bucket/x.tar") == ["pipe:aws s3 cp s3://bucket/x.tar -"]
    with pytest.raises(FileNotFoundError, match="no shards match"):
        list_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError):
        existing_shards(str(tmp_path / "missing" / "*.tar"))


def test_min_size_drops_small_images(tmp_path):
    write_tar(tmp_path / "s.tar", [("small", {"png": img_bytes(size=(16, 40)), "txt": "s"}),
                                   ("big", {"png": img_bytes(size=(64, 48)), "txt": "b"}),
                                   ("edge", {"png": img_bytes(size=(32, 32)), "txt": "e"})])
    ds = stream_of(str(tmp_path / "s.tar"), size=16, filters=Filters(min_size=32))
    assert keys_of(ds) == ["big", "edge"]
    assert ds.skipped["too_small"] == 1



def test_caption_weights_rebalance_training_and_leave_validation_alone(tmp_path):
    samples = [(f"tone{i}", {"png": img_bytes(), "txt": f"waving hand: Medium Skin Tone {i}"}) for i in range(40)]
    samples += [(f"obj{i}", {"png": img_bytes(), "txt": f"red apple {i}"}) for i in range(40)]
    write_tar(tmp_path / "s.tar", samples)
    weights = Filters(caption_weights={"Skin Tone": 0.25})
    assert weights.keep_probability("WAVING HAND: medium skin tone") == 0.25 and weights.keep_probability("apple") == 1
    ds = stream_of(str(tmp_path / "s.tar"), size=16, filters=weights)
    keys = keys_of(ds)
    assert sum(k.startswith("obj") for k in keys) == 40  # every other sample kept
    assert 3 <= sum(k.startswith("tone") for k in keys) <= 20  # about a quarter of 40
    assert ds.skipped["caption_weight"] == 80 - len(keys)
    dm = ImageTextData(train=str(tmp_path / "s.tar"), val=str(tmp_path / "s.tar"), image_size=16, batch_size=4,
                       num_workers=0, train_count=80, val_count=80, caption_weights={"skin tone": 0.25})
    dm.setup("fit")
    train_keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(train_keys) == 80  # the epoch keeps its batches: more passes over the rest
    assert sum(k.startswith("tone") for k in train_keys) < 30
    assert len([k for b in dm.val_dataloader() for k in b["key"]]) == 80  # validation: the data as it is


def test_flip_mirrors_training_images_under_their_own_key_and_leaves_validation_alone(tmp_path):
    stripes = io.BytesIO()
    _stripes(12, 12).save(stripes, format="PNG")
    write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": stripes.getvalue(), "txt": "flag"}) for i in range(40)])
    dm = ImageTextData(train=str(tmp_path / "s.tar"), val=str(tmp_path / "s.tar"), image_size=12, batch_size=4,
                       num_workers=0, train_count=40, val_count=40, flip=0.5)
    dm.setup("fit")
    train = samples_of(dm.train_dataloader())
    flipped = [s for s in train if s["key"].endswith(FLIPPED)]
    assert 5 <= len(flipped) <= 35 and len({s["key"].removesuffix(FLIPPED) for s in train}) == 40
    for s in train:  # red on the left, or on the right when flipped
        assert s["image"][0, :, -1 if s["key"].endswith(FLIPPED) else 0].min() == 1
    assert not any(k.endswith(FLIPPED) for b in dm.val_dataloader() for k in b["key"])
    with pytest.raises(ValueError, match="flip is a probability"):
        ImageTextData(train="openmoji", val=None, flip=1.5)
    (tmp_path / "folder").mkdir()
    _stripes(12, 12).save(tmp_path / "folder" / "a.png")
    with pytest.raises(ValueError, match="flip works with image shards"):
        ImageTextData(train=str(tmp_path / "folder"), val=None, flip=0.5)


@pytest.mark.parametrize("weights", [{"skin tone": 0}, {"skin tone": 1.5}, {"": 0.5}, {"skin tone": True}, ["skin"]])
def test_bad_caption_weights_are_refused(weights):
    with pytest.raises(ValueError, match="caption_weights must map caption phrases to keep probabilities"):
        ImageTextData(train="openmoji", val=None, caption_weights=weights)


# ---------------------------------------------------------------------------------------- 4. splitting

def _consumer_keys(ds, monkeypatch, rank, world, worker, workers):
    monkeypatch.setattr(stream, "rank_and_world", lambda: (rank, world))
    monkeypatch.setattr(stream, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    return keys_of(ds)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_shards,workers", [(8, 1), (8, 2), (5, 2), (1, 1), (3, 2), (1, 2)])
def test_consumers_split_keys_disjointly(tmp_path, monkeypatch, num_shards, workers, shuffle):
    """Whole shards per consumer when there are enough, else every n-th sample: disjoint, covering."""
    paths, keys = make_shards(tmp_path, [5 + (i % 3) for i in range(num_shards)] if num_shards > 1 else [23],
                              image=img_bytes(size=(8, 8)))
    world = 2
    for epoch in (0, 1):
        parts = []
        for r in range(world):
            for w in range(workers):
                ds = stream_of(paths, size=8, train=shuffle, shuffle_buffer=4, seed=3)
                ds.epoch = epoch
                parts.append(_consumer_keys(ds, monkeypatch, r, world, w, workers))
        assert all(parts)  # every consumer gets something
        seen = [k for p in parts for k in p]
        assert len(seen) == len(set(seen)) == len(keys)  # pairwise disjoint ...
        assert set(seen) == set(keys)  # ... and together everything


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sizes", [[3, 5, 2, 6, 1], [17], [4, 4, 4, 4]])
def test_every_rank_yields_the_same_number_of_batches(tmp_path, monkeypatch, sizes, workers):
    paths, keys = make_shards(tmp_path, sizes, image=img_bytes(size=(8, 8)))
    count, world, batch = len(keys), 2, 2
    totals = []
    for rank in range(world):
        batches = []
        for w in range(workers):
            ds = stream_of(paths, size=8, batch_size=batch, train=True, count=count)
            monkeypatch.setattr(stream, "rank_and_world", lambda: (rank, world))
            monkeypatch.setattr(stream, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=workers))
            batches += list(ds)
        assert all(len(b["key"]) == batch for b in batches)
        assert {k for b in batches for k in b["key"]} <= set(keys)
        totals.append(len(batches))
    assert totals == [count // world // batch] * world


def test_validation_yields_count_over_world_samples_per_rank(tmp_path, monkeypatch):
    paths, keys = make_shards(tmp_path, [3, 5, 2, 6, 1], image=img_bytes(size=(8, 8)))
    for rank in range(2):
        ds = stream_of(paths, size=8, batch_size=3, count=len(keys))
        monkeypatch.setattr(stream, "rank_and_world", lambda: (rank, 2))
        assert sum(len(b["key"]) for b in ds) == len(keys) // 2


def test_ranks_do_not_overlap_when_the_shards_split_evenly(tmp_path, monkeypatch):
    paths, keys = make_shards(tmp_path, [5] * 4, image=img_bytes(size=(8, 8)))
    seen = [_consumer_keys(stream_of(paths, size=8, train=True, count=20, shuffle_buffer=4), monkeypatch, r, 2, 0, 1)
            for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(keys)


def test_shuffle_changes_the_order_between_epochs_not_the_set(tmp_path):
    paths, keys = make_shards(tmp_path, [5] * 8, image=img_bytes(size=(8, 8)))
    ds = stream_of(paths, size=8, train=True, shuffle_buffer=10, seed=1)
    first, second = keys_of(ds), keys_of(ds)  # each pass is a new epoch
    assert sorted(first) == sorted(second) == sorted(keys) and len(first) == len(keys)
    assert first != second
    again = stream_of(paths, size=8, train=True, shuffle_buffer=10, seed=1)
    assert keys_of(again) == first  # same seed and epoch: same order
    resumed = stream_of(paths, size=8, train=True, shuffle_buffer=10, seed=1)
    resumed.epoch = 1  # what the data module sets after a resume
    assert keys_of(resumed) == second
    plain = stream_of(paths, size=8)
    assert keys_of(plain) == keys == keys_of(plain)


def test_the_rank_survives_pickling_into_spawned_workers(tmp_path, monkeypatch):
    """DataLoader workers started by spawn/forkserver have no process group; they must keep the rank."""
    paths, keys = make_shards(tmp_path, [6], image=img_bytes(size=(8, 8)))
    ds = stream_of(paths, size=8)
    monkeypatch.setattr(stream, "rank_and_world", lambda: (1, 2))
    expected = keys_of(stream_of(paths, size=8))
    assert expected == keys[1::2]
    clone = pickle.loads(pickle.dumps(ds))  # what the main process sends to a spawned worker
    monkeypatch.undo()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(stream, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    assert keys_of(clone) == expected
    monkeypatch.setattr(stream, "get_worker_info", lambda: None)
    assert keys_of(pickle.loads(pickle.dumps(ds))) == keys  # not distributed: everything


# -------------------------------------------------------------------------------- 5. real DDP on CPU

DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import lightning as L
    import torch
    from torch import nn
    from train.data import ImageTextData


    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.extend(batch["key"])
            return self.lin(batch["image"].mean(dim=(2, 3))).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    if __name__ == "__main__":
        shards, total, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        data = ImageTextData(train=shards, val=None, image_size=16, batch_size=4, num_workers=0, train_count=total)
        model = Tiny()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, num_sanity_val_steps=0,
                            limit_val_batches=0, enable_checkpointing=False, logger=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=data)
        info = {"rank": trainer.global_rank, "world": torch.distributed.get_world_size(), "keys": model.seen,
                "steps": trainer.global_step, "weight": model.lin.weight.detach().tolist()}
        with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(info, f)
        torch.distributed.destroy_process_group()  # a clean exit: gloo threads left running can abort at exit
''')


@pytest.mark.slow
def test_ddp_two_cpu_ranks_see_disjoint_equal_shares(tmp_path):
    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = []
    for s in range(6):
        samples = []
        for j in range(8):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            samples.append((f"s{s}_{j}", {"png": buf.getvalue(), "txt": f"sample {s} {j}"}))
        write_tar(shards / f"{s:06d}.tar", samples)
        keys += [k for k, _ in samples]
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(shards), str(len(keys)), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    a, b = ranks[0]["keys"], ranks[1]["keys"]
    assert len(a) == len(b) == len(keys) // 2 == 24  # the same number of samples (and steps) per rank
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert not set(a) & set(b)  # no sample on both ranks
    assert set(a) | set(b) == set(keys)  # and together the whole epoch
    assert ranks[0]["weight"] == ranks[1]["weight"]  # gradients were all-reduced: the replicas stayed equal


# ------------------------------------------------------------------------------------ 6. FolderDataset

def _folder(root: Path) -> Path:
    (root / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (20, 18), (255, 0, 0)).save(root / "red.png")
    (root / "red.txt").write_text("a red picture\n")
    Image.new("RGB", (17, 30), (0, 0, 255)).save(root / "a" / "blue.JPG", format="JPEG")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(root / "a" / "b" / "green.webp")
    (root / "a" / "b" / "green.txt").write_text("green")
    (root / "a" / "notes.md").write_text("not an image")
    return root


def test_folder_dataset_recursive_with_sidecar_captions(tmp_path):
    ds = FolderDataset(_folder(tmp_path / "imgs"), size=16)
    assert len(ds) == 3
    items = {it["key"]: it for it in (ds[i] for i in range(len(ds)))}
    assert {k: it["caption"] for k, it in items.items()} == {
        "red.png": "a red picture", os.path.join("a", "blue.JPG"): "", os.path.join("a", "b", "green.webp"): "green"}
    for key, rgb in {"red.png": (1, 0, 0), os.path.join("a", "blue.JPG"): (0, 0, 1)}.items():
        assert items[key]["image"].shape == (3, 16, 16)
        torch.testing.assert_close(items[key]["image"].mean((1, 2)), torch.tensor(rgb, dtype=torch.float32),
                                   atol=0.03, rtol=0)
    assert len(FolderDataset(tmp_path / "imgs", size=16, min_size=17)) == 2  # the 16x16 one is filtered


def test_folder_dataset_skips_an_unreadable_file(tmp_path, caplog):
    root = _folder(tmp_path / "imgs")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG but not really")
    ds = FolderDataset(root, size=16)
    i = [p.name for p in ds.files].index("broken.png")
    with caplog.at_level(logging.WARNING, logger="imagedata.images"):
        item = ds[i]
    assert item["key"] == str(ds.files[i + 1].relative_to(root))
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    assert [ds[j]["key"] for j in range(len(ds)) if j != i] == [str(p.relative_to(root)) for j, p in
                                                                enumerate(ds.files) if j != i]


def test_folder_dataset_with_nothing_readable_fails_clearly(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot decode"):
        FolderDataset(tmp_path / "one", size=8)[0]
    (tmp_path / "many").mkdir()
    for i in range(3):
        (tmp_path / "many" / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot decode"):
        FolderDataset(tmp_path / "many", size=8)[1]


def test_folder_dataset_empty_or_missing_folder_raises(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(FileNotFoundError, match="no jpg/jpeg/png/webp images"):
        FolderDataset(tmp_path / "empty", size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(tmp_path / "nope", size=8)


def test_image_text_data_picks_folder_or_shard_loader(tmp_path):
    folder = _folder(tmp_path / "imgs")
    paths, keys = make_shards(tmp_path / "tars", [5, 6])
    dm = ImageTextData(train=str(folder), val=str(tmp_path / "tars"), image_size=16, batch_size=2, num_workers=0,
                       val_count=11)
    dm.setup("fit")
    assert isinstance(dm.train_set, FolderDataset) and len(dm.train_set) == 3
    assert isinstance(dm.val_set, ShardStream) and dm.val_set.sets[0].shards == sorted(paths)
    assert dm.val_set.train is False and dm.val_set.prep.crop == "center" and dm.val_set.count == 11
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and len(batch["caption"]) == len(batch["key"]) == 2
    val_keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert val_keys == keys
    dm = ImageTextData(train=str(tmp_path / "tars" / "shard-*.tar"), val=None, image_size=16, batch_size=4,
                       num_workers=0, crop="random")
    dm.setup("fit")
    assert isinstance(dm.train_set, ShardStream) and dm.train_set.train and dm.val_set is None
    assert dm.val_dataloader() == []
    assert sum(len(b["key"]) for b in dm.train_dataloader()) == 8  # 11 samples, drop_last with batches of 4


def test_training_photos_are_disjoint_from_heldout_and_interleave():
    held = heldout_photos(64)
    train = training_photos()
    assert len(held) == 9 and len(train) >= 8
    assert {n for n, _ in held} == set(HELDOUT_SKIMAGE) | set(HELDOUT_SKLEARN)
    assert not {n for n, _ in held} & {n for n, _ in train}
    primary = [{"image": torch.zeros(3, 8, 8), "caption": "x", "key": str(i)} for i in range(9)]
    mixed = list(interleave(primary, PhotoCrops(train, 8), every=4))
    keys = [s["key"] for s in mixed]
    assert len(mixed) == 12 and all(k.startswith("photo:") for k in keys[3::4])
    assert all(s["image"].shape == (3, 8, 8) for s in mixed)
