"""Benchmarks: a smoke run of the CLI on the tiny configs, the counters, and activation checkpointing."""
import json
from dataclasses import replace

import pytest
import torch

from benchmarks.measure import count_flops, peak_memory
from stages.stage_b import PRESETS as B_PRESETS, StageB
from stages.stage_c import PRESETS as C_PRESETS, StageC
from benchmarks.__main__ import main
from stages.__main__ import parameter_counts
from benchmarks import throughput, latency, report
from benchmarks.targets import targets
from benchmarks.presets import PRESETS, read_preset, run_preset


def test_flops_match_hand_counts():
    linear, x = torch.nn.Linear(16, 8), torch.randn(4, 16)
    assert count_flops(lambda: linear(x)) == 2 * 4 * 16 * 8
    conv, img = torch.nn.Conv2d(3, 5, 3, padding=1), torch.randn(1, 3, 8, 8)
    assert count_flops(lambda: conv(img)) == 2 * 5 * 8 * 8 * 3 * 9
    with torch.device("meta"):  # the meta device gives the same count without computing
        big = torch.nn.Linear(4096, 4096)
        assert count_flops(lambda: big(torch.randn(2, 4096))) == 2 * 2 * 4096 * 4096


def test_peak_memory_counts_live_tensors():
    with peak_memory(torch.device("cpu")) as mem:
        a = torch.ones(1000, 1000)  # 4 MB, alive throughout
        b = a * 2  # another 4 MB
        del b
        c = a + 1  # reuses the freed 4 MB: the peak stays at 8 MB
    assert mem["peak_bytes"] == 8_000_000
    del a, c


@pytest.mark.parametrize("cls,config,args", [
    (StageB, replace(B_PRESETS["tiny"], dropout=0.1),
     lambda: (torch.randn(2, 4, 32, 32), torch.rand(2), torch.randn(2, 16, 3, 3))),
    (StageC, replace(C_PRESETS["tiny"], dropout=0.1),
     lambda: (torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 7, 384))),
])
def test_activation_checkpointing_gives_identical_outputs_and_gradients(cls, config, args):
    plain, ckpt = cls(config).train(), cls(replace(config, activation_checkpointing=True)).train()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.05)  # non-zero everywhere, so every gradient is non-trivial
    ckpt.load_state_dict(plain.state_dict())
    inputs = args()
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks: checkpointing replays the RNG state in the recomputation
        a, b = model(*inputs)
        (a.square().mean() + b.square().mean()).backward()
        grads.append((a.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(g0, g1, atol=1e-6, rtol=1e-5) for g0, g1 in zip(grads[0][1], grads[1][1]))
    assert any(g.abs().max() > 0 for g in grads[1][1])


@pytest.mark.slow
def test_cli_quick_run_writes_sane_results(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench"
    main(["--quick", "--out", str(out), "--parts", "counts,throughput,reference,latency,cost", "--threads", "2"])
    for name in ("results.json", "results.md", "latency_vs_batch.png", "cost_per_stage.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    counts = parameter_counts()
    for row in results["counts"]:
        assert row["forward_gflops_1024"] > 0
        if row["module"].startswith("stage_"):
            assert row["params"] == counts[f"{row['module']}/{row['config']}"]
    assert {r["mode"] for r in results["throughput"]} == {"inference", "train"}
    assert {r["module"] for r in results["throughput"]} == {"stage_a", "stage_b", "stage_c", "compressor",
                                                            "text_encoder", "pixel_decoder"}
    assert all(r["median_s"] > 0 and r["items_per_s"] > 0 for r in results["throughput"])
    assert {r["module"] for r in results["reference"]} == {"stage_a", "stage_b", "stage_c"}
    assert all(r["outputs_match"] and r["ratio"] > 0 for r in results["reference"])
    measured = [r for r in results["latency"] if r["method"] == "measured"]
    assert measured and all(0 < sum(r["stages_s"].values()) <= r["total_s"] for r in measured)
    assert {r["decoder"] for r in measured} == {"stage_b+stage_a", "pixel"}
    for r in measured:  # each decoder's own networks are timed, the other's are not called
        pixel = r["decoder"] == "pixel"
        assert (r["stages_s"]["pixel_decoder"] > 0) == pixel and (r["stages_s"]["stage_b"] > 0) != pixel
    projected = {(r["decoder"], r["px"]): r for r in results["latency"] if r["method"] == "projected"}
    assert set(projected) == {("stage_b+stage_a", 1024), ("pixel", 1024), ("stage_b+stage_a", 64), ("pixel", 64)}
    pixel = projected["pixel", 64]["stages_s"]
    assert pixel["pixel_decoder"] > 0 and pixel["stage_b"] == pixel["stage_a"] == 0
    assert {r["module"] for r in results["cost"]} == {"stage_a", "stage_b", "stage_c"}
    assert "ratio" in (out / "results.md").read_text()
    assert not (out / "partial.json").exists()  # a finished run leaves only its final results
    with pytest.raises(FileExistsError, match="not empty"):  # an existing output folder is refused
        main(["--quick", "--out", str(out), "--parts", "counts"])


@pytest.mark.slow
def test_out_of_memory_ends_a_sweep_with_a_note(monkeypatch):
    """A batch too big for the device skips the larger ones of that mode; the other mode still runs."""
    real = throughput.measure

    def measure(target, model, device, dtype, px, batch, train, *args, **kwargs):
        if batch >= 2 and not train:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(target, model, device, dtype, px, batch, train, *args, **kwargs)

    monkeypatch.setattr(throughput, "measure", measure)
    stage_c = next(t for t in targets(["tiny"]) if t.kind == "stage_c")
    notes = []
    rows = throughput.run_target(stage_c, torch.device("cpu"), torch.float32, 64, [1, 2, 4], repeats=1, notes=notes)
    assert [(r["mode"], r["batch"]) for r in rows] == [("inference", 1), ("train", 1), ("train", 2), ("train", 4)]
    assert len(notes) == 1 and "batch 2 ran out of device memory" in notes[0]


@pytest.mark.slow
def test_interrupted_run_leaves_partial_results(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(latency, "measure_sampling", interrupted)
    out = tmp_path / "bench"
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--out", str(out), "--parts", "counts,latency", "--threads", "2"])
    partial = json.loads((out / "partial.json").read_text())
    assert {r["module"] for r in partial["counts"]} >= {"stage_a", "stage_b", "stage_c"}
    assert not (out / "results.json").exists()

    other = {**partial, "counts": partial["counts"][:1], "notes": ["another part"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    paths = report.main([str(out / "partial.json"), str(tmp_path / "other.json"), "--out", str(tmp_path / "report")])
    merged = json.loads(paths["json"].read_text())
    assert merged["counts"] == partial["counts"] and merged["notes"][-1] == "another part"
    assert "| stage_a | tiny |" in paths["markdown"].read_text()
    (tmp_path / "elsewhere.json").write_text(json.dumps({**other, "environment": {**other["environment"],
                                                                                   "hardware": "another GPU"}}))
    with pytest.raises(FileNotFoundError, match="no such results file"):
        report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "r3")])
    with pytest.raises(ValueError, match="different hardware"):
        report.main([str(out / "partial.json"), str(tmp_path / "elsewhere.json"), "--out", str(tmp_path / "r2")])


@pytest.mark.slow
def test_gpu_presets_enable_checkpointing_and_run_on_cpu():
    for kind, path in PRESETS.items():
        settings = read_preset(path)
        assert settings["precision"] == "bf16-mixed" and settings["strategy"] == "ddp"
        assert settings["size"]["activation_checkpointing"] is True
        network = {"stage_b": StageB, "stage_c": StageC}[kind]
        with torch.device("meta"):
            preset = network(settings["size"]).config
        assert replace(preset, activation_checkpointing=False) == network("paper").config
    tiny = {**B_PRESETS["tiny"].to_dict(), "activation_checkpointing": True}
    result = run_preset("stage_b", accelerator="cpu", steps=2,
                        overrides={"size": tiny, "px": 64, "batch": 2, "precision": "32-true"})
    assert result["steps"] == 2 and result["activation_checkpointing"]


def test_grouped_convolution_backward_costs_twice_its_forward():
    """torch's formula counts a depthwise conv's backward as dense; ours: input + weight gradients."""
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.randn(2, 64, 16, 16, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    assert forward == 2 * 2 * 64 * 16 * 16 * 9
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward
