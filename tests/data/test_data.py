import json

import pytest
import torch
from PIL import Image

from ldm_diffusers.data import build_emoji_dataset, parse_emoji_test, pil_to_tensor, render_emoji, tensor_to_pil
from ldm_diffusers.data.emoji import EMOJI_TEST_PATH
from ldm_diffusers.data.transforms import load_image_splits, split_folders

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
    # load_image_splits names the split folders for datasets instead of letting it infer them: the same splits
    train, validation = load_image_splits(train_data_dir=str(emoji16), resolution=16)
    assert (train.num_rows, validation.num_rows) == (data["train"].num_rows, data["validation"].num_rows)
    assert train.features == data["train"].features and train["name"] == data["train"]["name"]
    assert split_folders(str(emoji16)) == {s: str(emoji16 / s / "**") for s in ("train", "validation")}
    (tmp_path / "odd" / "train").mkdir(parents=True)
    (tmp_path / "odd" / "extra").mkdir()
    assert split_folders(str(tmp_path / "odd")) is None  # a folder that is no split: datasets infers the splits
    # a second build with the same settings reuses the folder; other settings refuse to overwrite it
    assert build_emoji_dataset(emoji16, resolution=16) == emoji16
    with pytest.raises(FileExistsError, match="overwrite"):
        build_emoji_dataset(emoji16, resolution=8)
    # the split depends only on the emoji name: another build (the first 600 lines of the emoji list, 8x8) puts
    # each of its emoji on the same side
    names = {json.loads(l)["name"] for l in (emoji16 / "validation" / "metadata.jsonl").read_text().splitlines()}
    head = tmp_path / "emoji-test-head.txt"
    head.write_text("".join(EMOJI_TEST_PATH.read_text(encoding="utf-8").splitlines(keepends=True)[:600]), encoding="utf-8")
    listed = {entry.name for entry in parse_emoji_test(head)}
    again = build_emoji_dataset(tmp_path / "again", resolution=8, emoji_test_path=head)
    names_again = {json.loads(l)["name"] for l in (again / "validation" / "metadata.jsonl").read_text().splitlines()}
    assert len(listed) > 300 and names_again and names_again == names & listed
    assert EMOJI_TEST_PATH.is_file()


def test_pil_tensor_round_trip():
    image = Image.new("RGB", (48, 32), (255, 0, 128))
    x = pil_to_tensor(image, 16)
    assert x.shape == (3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[:, 8, 8], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    back = tensor_to_pil(x[None])[0]
    assert back.getpixel((3, 3)) == (255, 0, 128)


def test_random_inpainting_masks_are_binary_partial_and_seeded():
    import numpy as np

    from ldm_diffusers.data import random_inpainting_mask

    masks = [random_inpainting_mask(32, 48, np.random.default_rng(i)) for i in range(200)]
    for m in masks:
        assert m.shape == (32, 48) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0} and 0 < m.mean() < 1
    coverage = np.array([m.mean() for m in masks])
    assert 0.05 < coverage.mean() < 0.6, coverage.mean()
    assert np.array_equal(random_inpainting_mask(32, 48, np.random.default_rng(7)), masks[7])
    assert len({m.tobytes() for m in masks}) > 190  # varied


def test_scene_layout_boxes_match_the_semantic_map():
    import numpy as np

    from ldm_diffusers.data import compose_scene
    from ldm_diffusers.data.emoji import parse_emoji_test, render_emoji_rgba

    entries = [e for e in parse_emoji_test() if e.name in ("red apple", "dog face", "rocket")]
    glyphs = [(render_emoji_rgba(e.char, 32), k, e.name) for k, e in enumerate(entries)]
    image, layout, seg, names = compose_scene(glyphs, 32, np.random.default_rng(0), objects=(1, 1))
    assert image.size == (32, 32) and len(layout) == 1 and names[0] in ("red apple", "dog face", "rocket")
    c, x0, y0, x1, y1 = layout[0]
    ys, xs = np.nonzero(seg)
    assert set(np.unique(seg[seg > 0])) == {c + 1}
    assert (xs.min() / 32, ys.min() / 32, (xs.max() + 1) / 32, (ys.max() + 1) / 32) == pytest.approx((x0, y0, x1, y1), abs=1e-3)


def test_example_transform_crops_and_flips_maps_and_boxes_with_the_image():
    import numpy as np
    from PIL import Image

    from ldm_diffusers.data import collate_examples, example_transform

    # a 40x20 image whose right half is one class; the box covers that half
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    seg = np.zeros((20, 40), np.uint8)
    seg[:, 20:] = 3
    batch = {"image": [Image.fromarray(pixels)], "seg": [Image.fromarray(seg)], "boxes": [[[2, 0.5, 0.0, 1.0, 1.0]]],
             "label": [5]}
    columns = {"seg": "segmentation_map", "boxes": "layout", "label": "class_labels"}
    out = example_transform("image", 10, center_crop=True, columns=columns)(batch)
    # resize to 20x10, centre crop x in [5, 15): the class covers the crop's right half
    assert out["segmentation_map"][0][:, 5:].eq(3).all() and out["segmentation_map"][0][:, :5].eq(0).all()
    assert out["layout"][0] == [[2, 0.5, 0.0, 1.0, 1.0]]
    assert (out["pixel_values"][0][:, :, 6:] > 0.9).all() and (out["pixel_values"][0][:, :, :4] < -0.9).all()
    import random

    random.seed(0)
    flipped = example_transform("image", 10, center_crop=True, random_flip=True, columns=columns)
    outs = [flipped(batch) for _ in range(20)]
    for o in outs:  # the map, the box and the pixels always flip together
        right = o["segmentation_map"][0][:, 5:].eq(3).all().item()
        assert right == (o["layout"][0][0][1] == 0.5) == (o["pixel_values"][0][0, 0, 9] > 0.9).item()
    assert {o["layout"][0][0][1] for o in outs} == {0.0, 0.5}
    collated = collate_examples([{k: v[0] for k, v in out.items()}] * 2)
    assert collated["class_labels"].dtype == torch.long and collated["segmentation_map"].shape == (2, 10, 10)
