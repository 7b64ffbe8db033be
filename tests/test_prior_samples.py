"""Stage C samples per training caption (python -m train.prior_samples) and a Stage B trained on them."""
import pytest
import torch
import webdataset as wds

from imagedata.shards import FLIPPED
from semantic_compressor import SemanticCompressor, normalize_latents
from train.prior_samples import load_prior_samples, main, training_captions
from train.stage_b import StageBTraining
from weights.checkpoint import fingerprint, read_metadata, save_safetensors
from weights.loaders import load_compressor

TINY_B = dict(widths=[16, 32], blocks=[1, 1], heads=[0, 2], inject_semantic=[False, True], c_cond=16, c_text=None,
              dropout=0.0)
CAPTIONS = ["red apple", "green apple", "dog face", "sun"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "000000.tar"
    with wds.TarWriter(str(out)) as sink:
        for i, caption in enumerate(CAPTIONS):
            sink.write({"__key__": f"k{i}", "txt": caption})
    return out


@pytest.fixture(scope="module")
def samples_file(tiny_bundle, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("bank") / "samples.safetensors"
    main(["--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--train", str(shards), "--out", str(out),
          "--image-size", "64", "--samples", "2", "--steps", "2", "--batch-size", "3"])
    return out


def test_one_sample_per_caption_and_draw_in_the_compressors_space(samples_file, tiny_bundle):
    meta = read_metadata(samples_file)
    assert meta["keys"] == ["k0", "k1", "k2", "k3"] and meta["steps"] == 2
    assert meta["compressor_fingerprint"] == fingerprint(load_compressor(str(tiny_bundle / "compressor.safetensors")))
    drawn = load_prior_samples(samples_file, meta["compressor_fingerprint"])
    assert set(drawn) == {"k0", "k1", "k2", "k3"}
    grid = load_compressor(str(tiny_bundle / "compressor.safetensors"))(torch.rand(1, 3, 64, 64)).shape[1:]
    assert all(z.shape == (2, *grid) and z.isfinite().all() for z in drawn.values())
    assert not torch.equal(drawn["k0"][0], drawn["k0"][1])  # two draws, not one repeated


def test_files_of_several_seeds_pool_their_samples_per_caption(samples_file, tiny_bundle, shards, tmp_path):
    other = tmp_path / "seed7.safetensors"
    main(["--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--train", str(shards), "--out", str(other),
          "--image-size", "64", "--steps", "2", "--seed", "7"])
    fp = read_metadata(samples_file)["compressor_fingerprint"]
    one, two = load_prior_samples(samples_file, fp), load_prior_samples(other, fp)
    pooled = load_prior_samples([str(samples_file), str(other)], fp)
    assert all(torch.equal(pooled[k], torch.cat([one[k], two[k]])) and len(pooled[k]) == 3 for k in one)
    module = StageBTraining(size=TINY_B, stage_a=str(tiny_bundle / "stage_a.safetensors"),
                            compressor=str(tiny_bundle / "compressor.safetensors"),
                            prior_samples=[str(samples_file), str(other)])
    assert all(len(z) == 3 for z in module.conditions[0].prior_samples.values())
    small = tmp_path / "small.safetensors"  # the same prior sampled for another image size: another grid
    main(["--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--train", str(shards), "--out", str(small),
          "--image-size", "128", "--steps", "1"])
    with pytest.raises(ValueError, match="latents of different shapes .* sample them all at the Stage B run's"):
        load_prior_samples([str(samples_file), str(small)], fp)
    with pytest.raises(ValueError, match="prior_samples is an empty list"):
        load_prior_samples([], fp)


def test_openmoji_training_captions_in_shard_order(openmoji_dir):
    pairs = training_captions("openmoji", str(openmoji_dir))
    assert len(pairs) > 3000 and len({k for k, _ in pairs}) == len(pairs) and all(c for _, c in pairs)


def test_stage_b_trains_on_the_prior_samples_with_their_probability(samples_file, tiny_bundle):
    compressor = str(tiny_bundle / "compressor.safetensors")
    module = StageBTraining(size=TINY_B, stage_a=str(tiny_bundle / "stage_a.safetensors"), compressor=compressor,
                            prior_samples=str(samples_file), prior_samples_prob=1.0, semantic_noise_prob=0.0,
                            semantic_drop_prob=0.0, val_fid=False)
    batch = {"image": torch.rand(2, 3, 64, 64), "key": ["k2", "k0"], "caption": ["dog face", "red apple"]}
    drawn = load_prior_samples(samples_file, fingerprint(module.compressor))
    semantic = module.conditions[0](module, batch, train=True)
    for row, key in zip(semantic, batch["key"]):
        assert any(torch.allclose(row, normalize_latents(z, 0.0, 1.0)) for z in drawn[key])
    # validation sees the true image's latents
    assert torch.allclose(module.conditions[0](module, batch, train=False), module.compressor(batch["image"]))
    module.conditions[0].prior_samples_prob = 0.0
    assert torch.allclose(module.conditions[0](module, batch, train=True), module.compressor(batch["image"]))

    with pytest.raises(ValueError, match="'other' has no Stage C sample"):
        module.conditions[0](module, {**batch, "key": ["k0", "other"]}, train=True)
    # a flipped image (imagedata.shards.FLIPPED) keeps its own latents: the prior drew its emoji unflipped
    module.conditions[0].prior_samples_prob = 1.0
    flipped = module.conditions[0](module, {**batch, "key": ["k2", "k0" + FLIPPED]}, train=True)
    assert any(torch.allclose(flipped[0], normalize_latents(z, 0.0, 1.0)) for z in drawn["k2"])
    assert torch.allclose(flipped[1], module.compressor(batch["image"][1:])[0])
    with pytest.raises(ValueError, match="sample at this run's image size"):
        module.conditions[0](module, {**batch, "image": torch.rand(2, 3, 128, 128)}, train=True)


def test_prior_samples_refused_for_another_compressor_or_probability(samples_file, tiny_bundle, tmp_path):
    common = dict(size=TINY_B, stage_a=str(tiny_bundle / "stage_a.safetensors"), prior_samples=str(samples_file),
                  val_fid=False)
    other = SemanticCompressor(pretrained=False, trainable="none")
    torch.nn.init.normal_(next(other.parameters()))
    other_file = save_safetensors(other, tmp_path / "other.safetensors", "semantic_compressor", other.config.to_dict())
    with pytest.raises(ValueError, match="another semantic compressor"):
        StageBTraining(compressor=str(other_file), **common)
    with pytest.raises(ValueError, match="but this run trains it"):
        StageBTraining(compressor={"pretrained": False, "trainable": "head"}, **common)
    with pytest.raises(ValueError, match=r"prior_samples_prob must be in \(0, 1\]"):
        StageBTraining(compressor=str(tiny_bundle / "compressor.safetensors"), prior_samples_prob=0.0, **common)
    with pytest.raises(ValueError, match="not a prior-samples file"):
        StageBTraining(compressor=str(tiny_bundle / "compressor.safetensors"),
                       **{**common, "prior_samples": str(tiny_bundle / "stage_b.safetensors")})


def test_command_refuses_bad_input_before_sampling(samples_file, tiny_bundle, shards):
    base = ["--train", str(shards), "--image-size", "64", "--steps", "1"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--out", str(samples_file), *base])
    with pytest.raises(ValueError, match="not a Stage C"):
        main(["--stage-c", str(tiny_bundle / "stage_b.safetensors"), "--out", str(samples_file.with_name("x.safetensors")),
              *base])
    with pytest.raises(ValueError, match="finite number >= 0"):
        main(["--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--out", str(samples_file.with_name("y.safetensors")),
              "--guidance", "nan", *base])
    with pytest.raises(ValueError, match="must end in .safetensors"):
        main(["--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--out", str(samples_file.with_suffix(".pt")), *base])
