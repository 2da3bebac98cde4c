import json

import pytest
import torch
from PIL import Image

from ldm_diffusers.data import build_emoji_dataset, parse_emoji_test, pil_to_tensor, render_emoji, tensor_to_pil
from ldm_diffusers.data.emoji import EMOJI_TEST_PATH

SAMPLE = """# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: Animals & Nature

# subgroup: animal-mammal
1F435                                                  ; fully-qualified     # 🐵 E0.6 monkey face
"""


def test_parse_emoji_test_keeps_fully_qualified_with_groups(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    entries = parse_emoji_test(path)
    assert [e.name for e in entries] == ["grinning face", "smiling face", "monkey face"]
    assert entries[0].group == "Smileys & Emotion" and entries[0].subgroup == "face-smiling"
    assert entries[2].group == "Animals & Nature" and entries[2].char == "🐵"


def test_missing_font_or_emoji_list_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y fonts-noto-color-emoji unicode-data"):
        parse_emoji_test(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="apt-get install -y fonts-noto-color-emoji"):
        build_emoji_dataset(tmp_path / "out", font_path=tmp_path / "missing.ttf")


def test_render_emoji_on_white():
    image = render_emoji("😀", 32)
    assert image.size == (32, 32) and image.mode == "RGB"
    pixels = torch.from_numpy(__import__("numpy").array(image))
    assert tuple(pixels[0, 0].tolist()) == (255, 255, 255)  # corner is background white
    assert (pixels[16, 16] != 255).any()  # centre is drawn
    assert render_emoji("😀😀😀", 32) is None  # several glyphs are rejected


def test_built_dataset_loads_with_datasets_and_split_is_deterministic(emoji16, tmp_path):
    from datasets import load_dataset

    info = json.loads((emoji16 / "dataset_info_ldm.json").read_text())
    total = info["counts"]["train"] + info["counts"]["validation"]
    assert total > 3000
    assert 0.05 < info["counts"]["validation"] / total < 0.15
    assert len(info["groups"]) == 9
    data = load_dataset("imagefolder", data_dir=str(emoji16))
    assert set(data) == {"train", "validation"}
    row = data["train"][0]
    assert row["image"].size == (16, 16)
    assert row["text"] == f"an emoji of {row['name']}"
    assert info["groups"][row["group_id"]] == row["group"]
    assert info["subgroups"][row["subgroup_id"]] == row["subgroup"]
    # a second build with the same settings reuses the folder; other settings refuse to overwrite it
    assert build_emoji_dataset(emoji16, resolution=16) == emoji16
    with pytest.raises(FileExistsError, match="overwrite"):
        build_emoji_dataset(emoji16, resolution=8)
    # the split depends only on the emoji name
    names = {json.loads(l)["name"] for l in (emoji16 / "validation" / "metadata.jsonl").read_text().splitlines()}
    again = build_emoji_dataset(tmp_path / "again", resolution=8)
    names_again = {json.loads(l)["name"] for l in (again / "validation" / "metadata.jsonl").read_text().splitlines()}
    assert names == names_again
    assert EMOJI_TEST_PATH.is_file()


def test_pil_tensor_round_trip():
    image = Image.new("RGB", (48, 32), (255, 0, 128))
    x = pil_to_tensor(image, 16)
    assert x.shape == (3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    back = tensor_to_pil(x[None])[0]
    assert back.getpixel((3, 3)) == (255, 0, 128)
