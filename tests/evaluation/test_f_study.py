"""examples/f_study.py: the perceptual-compression study driver, end to end at toy size."""

import json
import numpy as np
import pytest
from helpers.paths import REPO
from helpers.scripts import example_main


@pytest.mark.slow
def test_f_study_runs_and_reports(emoji16_tiny, tmp_path, monkeypatch):
    work, out = tmp_path / "study", tmp_path / "report"
    for name, value in {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "LDM_DIFFUSERS_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)  # the driver's training jobs are processes of their own: they inherit these
    run = ["run", "--work_dir", str(work),
           "--train_data_dir", str(emoji16_tiny), "--resolution", "16", "--num_validation_images", "6", "--factors", "2", "4", "--regularizations", "kl",
           "--stage1_steps", "2", "--stage1_batch_size", "4", "--stage2_steps", "3", "--stage2_batch_size", "4",
           "--evaluation_steps", "2", "--jobs", "2",
           "--stage1_args", "--base_channels 8 --norm_num_groups 4 --max_train_samples 8 --scaling_factor_samples 8",
           "--stage2_args", "--unet_base_channels 16 --unet_channel_multipliers 1 2 --norm_num_groups 8 "
                            "--attention_head_dim 8 --context_dim 32 --text_encoder_layers 1 --text_encoder_heads 2 "
                            "--max_prompt_length 8 --max_train_samples 8 --validation_inference_steps 2 "
                            "--num_validation_images 2 --evaluation_num_images 4"]
    f_study = example_main("f_study.py")
    f_study(run)
    jobs = json.loads((work / "jobs.json").read_text())
    assert set(jobs) == {"stage1/kl-f2", "stage1/kl-f4", "stage2/ldm-f2", "stage2/ldm-f4"}
    assert all(j["returncode"] == 0 for j in jobs.values())
    for f in (2, 4):
        with np.load(work / "stage2" / f"ldm-f{f}" / "eval_samples" / "step-000003.npz") as saved:
            assert saved["images"].shape == (4, 16, 16, 3)
        with np.load(work / "stage1" / f"kl-f{f}" / "val_reconstructions.npz") as saved:
            assert saved["images"].shape == (6, 16, 16, 3)  # --num_validation_images 6 of 8

    f_study(["report", "--work_dir", str(work), "--out_dir", str(out)])
    results = json.loads((out / "f_study.json").read_text())
    assert [r["model"] for r in results["stage1"]] == ["kl-f2", "kl-f4"]
    assert all(r["psnr"] > 0 and np.isfinite(r["rfid"]) for r in results["stage1"])
    assert results["stage1"][0]["latent"] == "8x8x3" and results["stage1"][1]["compression"] == 16.0
    for r in results["stage2"]:
        assert sorted(int(s) for s in r["curve"]) == [2, 3] and all(v["fid"] > 0 for v in r["curve"].values())
    table = (out / "f_study.md").read_text()
    assert "| ldm-f2 |" in table and "| kl-f4 |" in table
    from PIL import Image

    assert Image.open(out / "f_study_fid.png").size[0] > 500
    assert Image.open(out / "f_study_samples.png").size == (4 * 16, 3 * 16)  # real row + one row per f
