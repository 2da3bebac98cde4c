"""Class names stored with a class-conditional model: read from the training data, used by the pipeline,
`generate --class_labels NAME` and the card."""

import argparse

import datasets
import pytest
import torch

from helpers.models import make_pipe
from ldm_diffusers.cli import parse_generate_args
from ldm_diffusers.conditioning.class_label import ClassEmbedder, ClassMode


def _args(column, streaming=False):
    return argparse.Namespace(class_column=column, streaming=streaming, num_classes=None)


def test_names_come_from_the_id_columns_string_twin_or_a_class_label():
    rows = {"group_id": [1, 0, 1, 2], "group": ["Food", "Flags", "Food", "Animals"]}
    ds = datasets.Dataset.from_dict(rows)
    assert ClassMode._class_names(_args("group_id"), ds, 3) == ["Flags", "Food", "Animals"]
    assert ClassMode._class_names(_args("group_id", streaming=True), ds, 3) is None
    clashing = datasets.Dataset.from_dict({"group_id": [0, 0, 1], "group": ["a", "b", "c"]})  # id 0 has two names
    assert ClassMode._class_names(_args("group_id"), clashing, 2) is None
    labelled = datasets.Dataset.from_dict({"label": [0, 1]}).cast_column("label", datasets.ClassLabel(names=["x", "y"]))
    assert ClassMode._class_names(_args("label"), labelled, 2) == ["x", "y"]


def test_names_and_ids_sample_the_same_images():
    pipe = make_pipe("class")
    pipe.class_embedder.register_to_config(class_names=["Flags", "Food & Drink", "Objects", "Symbols", "Animals"])
    kwargs = dict(num_inference_steps=2, output_type="pt", height=32, width=32)
    by_id = pipe(class_labels=[1, 4], generator=torch.manual_seed(0), **kwargs).images
    by_name = pipe(class_labels=["food & drink", "Animals"], generator=torch.manual_seed(0), **kwargs).images
    assert torch.equal(by_id, by_name)
    with pytest.raises(ValueError, match="Unknown class name 'Pizza' in class_labels.*'Food & Drink'"):
        pipe(class_labels=["Pizza"], **kwargs)


def test_class_names_must_match_the_class_count():
    with pytest.raises(ValueError, match="class_names must hold 3 distinct names"):
        ClassEmbedder(num_classes=3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="class_names must hold 2 distinct names"):
        ClassEmbedder(num_classes=2, class_names=["a", "a"])


def test_generate_takes_ids_and_names():
    args = parse_generate_args(["--class_labels", "3", "Food & Drink", "+0"])
    assert args.class_labels == [3, "Food & Drink", 0]
