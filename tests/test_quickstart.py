"""The quickstart end to end at 2 steps per stage: trains A, B, C in order, bundles, samples a grid."""
import json

import pytest
from sample.quickstart import main
from sample.bundle import main as bundle_main


@pytest.mark.slow
def test_quickstart_smoke(tmp_path, monkeypatch):
    out = main(["--out", str(tmp_path / "qs"), "--max-steps", "2", "--prompts", "sun", "red apple"])
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
