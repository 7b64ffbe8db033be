"""Shard streams at LAION scale: URLs (pipe:, http), rank x worker splits through real DataLoaders,
filters counted by reason, aspect-ratio buckets, weighted mixtures, resampled streams."""
import functools
import http.server
import io
import json
import threading
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.test_data import img_bytes, keys_of, make_shards, samples_of, stream_of, write_tar
from train.data import ImageTextData
from imagedata.buckets import PRESETS, nearest_bucket, parse_buckets
from imagedata.shards import Filters


def png(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def all_samples(dm: ImageTextData, split: str = "train") -> list[dict]:
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return [b for b in loader]


# ------------------------------------------------------------------------------------------- URLs

@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server over ``tmp_path/www`` in a thread; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_pipe_and_http_urls_give_the_same_samples_as_local_paths(http_root):
    root, base = http_root
    paths, keys = make_shards(root, [3, 4, 2], image=img_bytes(size=(12, 10)))
    pattern = "shard-{000000..000002}.tar"
    local = samples_of(stream_of(str(root / pattern), size=8))
    piped = samples_of(stream_of(f"pipe:cat {root}/{pattern}", size=8))
    fetched = stream_of(f"{base}/{pattern}", size=8)
    remote = samples_of(fetched)
    assert [s["key"] for s in local] == keys
    for other in (piped, remote):
        assert [s["key"] for s in other] == keys
        assert [s["caption"] for s in other] == [s["caption"] for s in local]
        for a, b in zip(local, other):
            assert torch.equal(a["image"], b["image"])
    assert fetched.skipped["corrupt_shard"] == 0
    # a shard the server does not have and a command that fails are counted by cause, not fatal
    broken = stream_of([f"{base}/gone.tar", f"pipe:cat {root}/nothing.tar", paths[0]], size=8)
    assert keys_of(broken) == keys[:3]
    assert broken.skipped["unreachable_shard"] == 1 and broken.skipped["failed_command"] == 1
    assert broken.skipped.causes == {"unreachable_shard": f"HTTP 404: {base}/gone.tar",
                                     "failed_command": f"exit status 1 of 'cat {root}/nothing.tar': "
                                                       f"pipe:cat {root}/nothing.tar"}


def test_data_module_streams_from_a_url(http_root):
    root, base = http_root
    make_shards(root, [5, 5], image=img_bytes(size=(16, 16)))
    dm = ImageTextData(train=f"{base}/shard-{{000000..000001}}.tar", val=None, image_size=8, batch_size=2,
                       num_workers=0, train_count=10)
    batches = all_samples(dm)
    assert len(batches) == 5 and all(b["image"].shape == (2, 3, 8, 8) for b in batches)


# ------------------------------------------------------------------------- ranks x workers, for real

@pytest.mark.parametrize("sizes", [[4] * 8, [3, 5, 4, 4, 2, 6, 4, 4]])
def test_two_ranks_times_two_workers_see_disjoint_data_covering_the_set(tmp_path, monkeypatch, sizes):
    """Ranks from RANK/WORLD_SIZE (as torchrun sets them), two DataLoader worker processes each."""
    paths, keys = make_shards(tmp_path, sizes, image=img_bytes(size=(8, 8)))
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ImageTextData(train=str(tmp_path), val=None, image_size=8, batch_size=2, num_workers=2,
                           train_count=len(keys), shuffle_buffer=4)
        per_rank.append([b["key"] for b in all_samples(dm)])
    assert len(per_rank[0]) == len(per_rank[1]) == len(keys) // 2 // 2  # equal batches: DDP stays in step
    seen = [[k for b in batches for k in b] for batches in per_rank]
    if len(set(sizes)) == 1:  # shards split evenly: every sample exactly once
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(keys)
    else:  # uneven shards: a consumer short of its share repeats its own part, but never another's
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) <= set(keys)


# ---------------------------------------------------------------------------------------- filters

def test_filters_count_every_reason(tmp_path):
    meta = lambda **kw: json.dumps(kw)  # noqa: E731
    write_tar(tmp_path / "s.tar", [
        ("ok", {"png": png((40, 32)), "txt": "ok", "json": meta(aesthetic=6.0, pwatermark=0.1)}),
        ("small", {"png": png((20, 40)), "json": meta(aesthetic=6.0, pwatermark=0.1)}),
        ("wide", {"png": png((100, 32)), "json": meta(aesthetic=6.0, pwatermark=0.1)}),
        ("ugly", {"png": png((40, 40)), "json": meta(aesthetic=4.0, pwatermark=0.1)}),
        ("marked", {"png": png((40, 40)), "json": meta(aesthetic=5.5, pwatermark=0.9)}),
        ("nojson", {"png": png((40, 40))}),
        ("broken", {"png": b"\x89PNG nope", "json": meta(aesthetic=9.0, pwatermark=0.0)}),
        ("edge", {"png": png((64, 32)), "json": meta(aesthetic=5.0, pwatermark=0.5)}),  # bounds are inclusive
    ])
    filters = Filters(min_size=32, aspect_ratio=(0.5, 2.0),
                      metadata={"aesthetic": {"min": 5.0}, "pwatermark": {"max": 0.5}})
    ds = stream_of(str(tmp_path / "s.tar"), size=16, filters=filters)
    assert keys_of(ds) == ["ok", "edge"]
    assert ds.skipped.as_dict() == {"yielded": 2, "missing_shard": 0, "unreachable_shard": 0, "failed_command": 0,
                                    "corrupt_shard": 0, "no_image": 0, "corrupt_sample": 1,
                                    "too_small": 1, "aspect_ratio": 1, "metadata:aesthetic": 2,
                                    "metadata:pwatermark": 1}
    with pytest.raises(ValueError, match=r"no batch of 4 .*metadata:aesthetic 2"):
        all_samples(ImageTextData(train=str(tmp_path / "s.tar"), val=None, image_size=16, batch_size=4,
                                  num_workers=0, min_size=32, aspect_ratio=[0.5, 2.0],
                                  metadata_filters={"aesthetic": {"min": 5.0}, "pwatermark": {"max": 0.5}}))


@pytest.mark.parametrize("kw,message", [
    (dict(aspect_ratio=[2.0, 0.5]), "aspect_ratio must be"),
    (dict(aspect_ratio=[1.0]), "aspect_ratio must be"),
    (dict(metadata_filters={"aesthetic": 5}), "metadata filter aesthetic"),
    (dict(metadata_filters={"aesthetic": {"above": 5}}), "metadata filter aesthetic"),
    (dict(buckets="paper_c9"), "unknown bucket preset 'paper_c9'"),
    (dict(buckets=[[768, 1280], [770, 768]]), "multiples of 4"),
    (dict(buckets=[[768]]), "not a \\[height, width\\] pair"),
    (dict(train=[{"shards": "x.tar", "weight": 0}]), "must be a positive number"),
    (dict(train=[{"shard": "x.tar"}]), "must be \\{shards"),
    (dict(photo_crops_every=1), "photo_crops_every 1: every n-th sample \\(n >= 2"),
    (dict(train="FOLDER", photo_crops_every=2), "not precomputed ones or a folder"),
    (dict(train="FOLDER", precomputed=True), "training source is not a set of shards"),
])
def test_bad_settings_fail_at_construction_with_one_line(tmp_path, kw, message):
    make_shards(tmp_path, [1])
    if "train" in kw:
        if kw["train"] == "FOLDER":  # a folder of images
            (tmp_path / "images").mkdir()
            Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
            kw["train"] = str(tmp_path / "images")
        else:
            kw["train"][0] = {k: (str(tmp_path / v) if k in ("shards", "shard") else v) for k, v in kw["train"][0].items()}
    with pytest.raises(ValueError, match=message) as e:
        ImageTextData(**{"train": str(tmp_path), "val": None, **kw})
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- buckets

def test_nearest_bucket_and_presets():
    b = PRESETS["paper_c3"]
    assert b == [(768, 1280), (1280, 768), (768, 768)] and parse_buckets("paper_c3") == b
    assert nearest_bucket(1920, 1080, b) == (768, 1280)  # landscape
    assert nearest_bucket(1080, 1920, b) == (1280, 768)  # portrait
    assert nearest_bucket(1000, 1100, b) == (768, 768)
    assert nearest_bucket(1280, 960, b) == (768, 1280)  # 4:3: |log| distance 0.22 to 5:3, 0.29 to 1:1
    assert nearest_bucket(1200, 1000, b) == (768, 768)  # 6:5: 0.18 to 1:1, 0.33 to 5:3


@pytest.mark.parametrize("workers", [0, 2])
def test_buckets_give_batches_of_one_shape_and_equal_counts_per_rank(tmp_path, monkeypatch, workers):
    buckets = [[16, 24], [24, 16], [16, 16]]
    sizes = [(60, 40), (40, 60), (50, 50), (90, 50), (30, 48), (33, 31)]
    samples = [(f"k{i:03d}", {"png": png(sizes[i % len(sizes)]), "txt": str(i)}) for i in range(96)]
    for s in range(4):
        write_tar(tmp_path / f"{s:06d}.tar", samples[s * 24:(s + 1) * 24])
    shapes, counts = Counter(), []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = ImageTextData(train=str(tmp_path), val=None, batch_size=4, num_workers=workers, train_count=96,
                           buckets=buckets, shuffle_buffer=8)
        batches = all_samples(dm)
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape[0] == 4
            shapes[tuple(b["image"].shape[2:])] += 1
            for key in b["key"]:  # each image went to the bucket of its own aspect ratio
                w, h = sizes[int(key[1:]) % len(sizes)]
                assert tuple(b["image"].shape[2:]) == nearest_bucket(w, h, [tuple(x) for x in buckets])
    assert counts[0] == counts[1] == 96 // 2 // 4
    assert set(shapes) == {(16, 24), (24, 16), (16, 16)}


def test_validation_buckets_keep_partial_batches(tmp_path):
    write_tar(tmp_path / "v.tar", [(f"k{i}", {"png": png((60, 40) if i % 3 else (40, 60))}) for i in range(7)])
    dm = ImageTextData(train=None, val=str(tmp_path / "v.tar"), batch_size=4, num_workers=0,
                       buckets=[[16, 24], [24, 16]])
    batches = all_samples(dm, "val")
    assert sorted(k for b in batches for k in b["key"]) == [f"k{i}" for i in range(7)]
    assert all(len({tuple(x.shape) for x in b["image"]}) == 1 for b in batches)


# ----------------------------------------------------------------------------- mixtures, resampling

def test_weighted_mixture_follows_the_weights(tmp_path):
    _, a_keys = make_shards(tmp_path / "a", [50, 50], image=img_bytes(size=(8, 8)), prefix="a")
    make_shards(tmp_path / "b", [50, 50], image=img_bytes(size=(8, 8)), prefix="b")
    mixture = [{"shards": str(tmp_path / "a" / "a-{000000..000001}.tar"), "weight": 3},
               {"shards": str(tmp_path / "b" / "*.tar"), "weight": 1}]
    dm = ImageTextData(train=mixture, val=None, image_size=8, batch_size=10, num_workers=0, train_count=400)
    keys = [k for b in all_samples(dm) for k in b["key"]]
    assert len(keys) == 400
    share_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert 0.68 < share_a < 0.82  # 3:1 -> 0.75
    a_seen = [k for k in keys if k.startswith("a")]
    assert set(a_seen) == set(a_keys) and len(a_seen) > len(a_keys)  # set a ran out and was read again
    with pytest.raises(ValueError, match="weighted mixture .* is endless; set train_count"):
        ImageTextData(train=mixture, val=None, image_size=8, num_workers=0).setup("fit")


def test_resampled_stream_is_seeded_by_epoch(tmp_path):
    paths, keys = make_shards(tmp_path, [4] * 6, image=img_bytes(size=(8, 8)))

    def epoch_keys(epoch):
        dm = ImageTextData(train=str(tmp_path), val=None, image_size=8, batch_size=4, num_workers=0,
                           train_count=40, resampled=True, shuffle_buffer=4)
        dm.setup("fit")
        dm.train_set.epoch = epoch
        return [k for b in dm.train_dataloader() for k in b["key"]]
    first = epoch_keys(0)
    assert len(first) == 40 and set(first) <= set(keys)
    assert epoch_keys(0) == first and epoch_keys(1) != first  # a resumed epoch sees the same stream
    with pytest.raises(ValueError, match="resampled stream is endless; set train_count"):
        ImageTextData(train=str(tmp_path), val=None, resampled=True, num_workers=0).setup("fit")


def test_ddp_without_a_count_is_refused_before_the_ranks_drift_apart(tmp_path):
    make_shards(tmp_path, [3, 5], image=img_bytes(size=(8, 8)))
    dm = ImageTextData(train=str(tmp_path), val=None, image_size=8, batch_size=2, num_workers=0)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(current_epoch=3, world_size=2)
    with pytest.raises(ValueError, match="2 DDP ranks need train_count .* set --data.init_args.train_count"):
        dm.train_dataloader()
    dm.hparams.train_count = dm.train_set.count = 8
    dm.train_dataloader()
    assert dm.train_set.epoch == 3  # the stream continues at the trainer's epoch
