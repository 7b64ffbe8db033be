"""Averaging exports (weights.average): the weighted mean of every tensor, an export the sampler loads, and
one-line refusals of exports of different networks or conditioning, bad weights and an existing output."""
import pytest
import torch

from common.errors import run_command
from pipeline.text_to_image import load_text_to_image
from weights.average import main as average_main
from weights.checkpoint import carried_metadata, load_safetensors, read_metadata, save_tensors


@pytest.fixture(scope="module")
def two_decoders(tiny_bundle_copy):
    """The tiny bundle and a second Stage B export of it: other weights, the same metadata (one training chain)."""
    out = tiny_bundle_copy("average_bundle")
    state, _ = load_safetensors(out / "stage_b.safetensors")
    meta = read_metadata(out / "stage_b.safetensors")
    torch.manual_seed(3)
    other = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    extra = carried_metadata(meta)
    save_tensors(other, out / "stage_b_later.safetensors", "stage_b", meta["config"], extra={**extra, "global_step": 7})
    return out


def test_weighted_mean_of_every_tensor_loads_in_the_sampler(two_decoders, tmp_path):
    a, b = two_decoders / "stage_b.safetensors", two_decoders / "stage_b_later.safetensors"
    out = tmp_path / "soup.safetensors"
    average_main([str(a), str(b), "--weights", "0.25", "0.75", "--out", str(out)])
    (sa, _), (sb, _), (soup, _) = load_safetensors(a), load_safetensors(b), load_safetensors(out)
    assert soup.keys() == sa.keys()
    for k in sa:
        assert torch.allclose(soup[k], 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6), k
    assert not torch.equal(soup[next(iter(sa))], sa[next(iter(sa))])
    meta = read_metadata(out)
    assert meta["global_step"] == 7  # the last export's chain
    assert [d["weight"] for d in meta["averaged_from"]] == [0.25, 0.75]
    assert meta["compressor_fingerprint"] == read_metadata(a)["compressor_fingerprint"]
    pipe = load_text_to_image(two_decoders / "stage_c.safetensors", out, two_decoders / "stage_a.safetensors")
    image = pipe(["a cat"], height=64, width=64, prior_steps=2, decoder_steps=2, seed=0, progress=False)
    assert torch.isfinite(image).all()
    equal = tmp_path / "equal.safetensors"
    average_main([str(a), str(b), "--out", str(equal)])
    assert torch.allclose(load_safetensors(equal)[0][k], 0.5 * sa[k] + 0.5 * sb[k], atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["{a}"], "at least two exports"),
    (["{a}", "{b}", "--weights", "0.5"], "1 values for 2 exports"),
    (["{a}", "{b}", "--weights", "0.3", "0.3"], "must be positive and sum to 1"),
    (["{a}", "{b}", "--weights", "1.5", "-0.5"], "must be positive and sum to 1"),
    (["{a}", "{c}"], "differs from"),
    (["{a}", "{b}", "--out", "{a}"], "exists; choose another --out or pass --overwrite"),
    (["{a}", "{b}", "--out", "{dir}/soup.pt"], "must end in .safetensors"),
])
def test_bad_input_is_one_line_error(two_decoders, tmp_path, capsys, args, message):
    paths = {"a": two_decoders / "stage_b.safetensors", "b": two_decoders / "stage_b_later.safetensors",
             "c": two_decoders / "stage_c.safetensors", "dir": tmp_path}
    argv = [t.format(**paths) for t in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "soup.safetensors")]
    with pytest.raises(SystemExit):
        run_command(average_main, argv)
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "soup.safetensors").exists()
