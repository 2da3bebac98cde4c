"""The ``ldm-diffusers`` console script and ``examples/evaluate.py`` on tiny saved pipelines."""

import json

import pytest
from helpers.scripts import example_main
from PIL import Image

from ldm_diffusers.cli import main


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from helpers.models import make_pipe

    path = tmp_path_factory.mktemp("models") / "text"
    make_pipe("prompt").save_pretrained(path)
    return path


def test_generate_writes_a_grid_per_prompt_and_batch(text_model, tmp_path):
    out = tmp_path / "grid.png"
    main(["generate", "an emoji of red apple", "an emoji of dog face", "--model", str(text_model), "--batch", "3",
          "--steps", "2", "--out", str(out), "--scheduler", "dpm++", "--seed", "1"])
    assert Image.open(out).size == (3 * 32, 2 * 32)
    single = tmp_path / "one.png"
    main(["generate", "an emoji of red apple", "--model", str(text_model), "--steps", "2", "--out", str(single), "--seed", "1"])
    again = tmp_path / "again.png"
    main(["generate", "an emoji of red apple", "--model", str(text_model), "--steps", "2", "--out", str(again), "--seed", "1"])
    assert Image.open(single).tobytes() == Image.open(again).tobytes()  # seeded


def test_generate_class_model_and_help(tmp_path, capsys):
    from helpers.models import make_pipe

    make_pipe("class").save_pretrained(tmp_path / "class")
    main(["generate", "--model", str(tmp_path / "class"), "--class_labels", "0", "3", "--steps", "2",
          "--out", str(tmp_path / "c.png")])
    assert Image.open(tmp_path / "c.png").size == (2 * 32, 32)
    # generate --fast (OpenVINO): pipelines/test_fast_sampling.py, in the OpenVINO test's own process
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--guidance_scale" in capsys.readouterr().out
    main([])
    listing = capsys.readouterr().out
    assert all(command in listing for command in ("generate", "train ", "train-autoencoder", "evaluate-autoencoder"))


def test_evaluate_script_reports_sample_metrics(text_model, emoji16_tiny, tmp_path, monkeypatch):
    out = tmp_path / "metrics.json"
    monkeypatch.setenv("LDM_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    example_main("evaluate.py")(["--model", str(text_model), "--train_data_dir", str(emoji16_tiny), "--resolution", "32",
                                 "--num_images", "8", "--batch_size", "4", "--steps", "2", "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["num_generated"] == metrics["num_real"] == 8
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["is_efficientnet_mean"] >= 1.0 and metrics["seconds_per_image"] > 0
    assert out.with_suffix(".png").is_file()
    assert list((tmp_path / "cache" / "fid-references").glob("validation-*.npz"))  # reference features cached


def test_upscale_tiles_above_the_trained_size_and_pads_odd_sides(tmp_path, capsys):
    """A tiny super-resolution pipeline (f = 4, trained on 8 x 8 latents, a UNet that halves once): a 13 x 22 image
    is padded to 14 x 22, sampled in windows of 8 latent pixels every 4, and cropped back to 52 x 88."""
    from helpers.models import concat_pipe, gradient, make_pipe

    concat_pipe(3).save_pretrained(tmp_path / "sr")
    gradient(22, 13).save(tmp_path / "low.png")
    main(["upscale", str(tmp_path / "low.png"), "--model", str(tmp_path / "sr"), "--steps", "2",
          "--out", str(tmp_path / "big.png")])
    printed = capsys.readouterr().out
    assert "padded 22x13 to 22x14" in printed and "windows of 32 px every 16 px" in printed
    assert Image.open(tmp_path / "big.png").size == (88, 52)
    make_pipe("class").save_pretrained(tmp_path / "class")
    with pytest.raises(SystemExit):
        main(["upscale", str(tmp_path / "low.png"), "--model", str(tmp_path / "class")])
    assert "is a class model, not a super-resolution one" in capsys.readouterr().err
    main(["generate", "--model", str(tmp_path / "class"), "--class_labels", "1", "--steps", "1", "--height", "64",
          "--out", str(tmp_path / "tall.png")])
    assert "tiled sampling: windows of 32 px every 16 px" in capsys.readouterr().out
    assert Image.open(tmp_path / "tall.png").size == (32, 64)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path / "class"), "--class_labels", "1", "--tile_size", "30"])
    assert "--tile_size must be a positive multiple of the autoencoder's factor f=4" in capsys.readouterr().err
