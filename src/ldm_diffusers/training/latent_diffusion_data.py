"""What stage-2 training reads: the dataset's splits (or a stream), the mode's columns and transforms, and the rows
the loader draws from (the dataset, or its latent cache)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..conditioning import TrainingColumns
from ..data.streaming import resolve_stream, take_rows
from ..data.transforms import example_transform, image_column_of, load_image_splits
from .latent_cache import build_latent_cache, weights_digest


class IndexedDataset(torch.utils.data.Dataset):
    """Rows of a transformed ``datasets.Dataset`` with their index (which seeds the example's randomness)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[i], "index": i}


def default_class_column(args, column_names) -> None:
    """``--class_column`` when not given: 'label', or the built-in emoji set's 'group_id' where there is no 'label'."""
    if args.class_column is None:
        args.class_column = "group_id" if "label" not in column_names and "group_id" in column_names else "label"


def load_splits(args, accelerator):
    """(train, validation) ``datasets.Dataset`` of the run (``--max_train_samples`` applied)."""
    with accelerator.main_process_first():
        train_ds, val_ds = load_image_splits(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, args.resolution, 0.1, args.seed,
            args.cache_dir,
        )
    if args.max_train_samples:
        train_ds = train_ds.select(range(min(args.max_train_samples, len(train_ds))))
    default_class_column(args, train_ds.column_names)
    return train_ds, val_ds


def load_stream(args):
    """``--streaming``: (the training shards, validation rows as a ``datasets.Dataset``, the indices held out of
    training). Validation rows are the source's validation split if it has one, else its first training rows."""
    source = args.train_data_dir or args.dataset_name
    shards = resolve_stream(source, "train", args.dataset_config_name, cache_dir=args.cache_dir)
    n = max(args.num_validation_images, args.evaluation_num_images or 0)
    try:
        validation = resolve_stream(source, "validation", args.dataset_config_name, cache_dir=args.cache_dir)
    except (FileNotFoundError, ValueError):
        val_ds, held_out = take_rows(shards, n)
    else:
        val_ds, held_out = take_rows(validation, n)[0], ()
    default_class_column(args, shards.column_names)
    return shards, val_ds, held_out


def set_up_columns(args, mode, train_ds, val_ds, vae) -> tuple[TrainingColumns, dict]:
    """Check that the datasets have the mode's columns and set their per-example transforms; returns
    (columns, the columns the mode reads)."""
    columns = TrainingColumns.from_args(args, vae.downsampling_factor)
    needed = mode.dataset_columns(columns)
    missing = [c for c in needed if c not in train_ds.column_names]
    if missing:
        flags = columns.flags_for(missing)
        raise SystemExit(f"--conditioning {args.conditioning} reads the column(s) {missing}, which the dataset lacks "
                         f"(it has {train_ds.column_names}); point {' / '.join(flags)} at the right column.")
    if args.resolution % vae.downsampling_factor:
        raise SystemExit(f"--resolution {args.resolution} is not divisible by the autoencoder's f={vae.downsampling_factor}.")
    image_column = image_column_of(train_ds, args.image_column)
    train_ds.set_transform(example_transform(image_column, args.resolution, args.center_crop, args.random_flip, needed))
    val_ds.set_transform(example_transform(image_column, args.resolution, True, False, needed))
    return columns, needed


def training_rows(args, accelerator, train_ds, vae, mode, columns, needed, frozen, output_dir: Path):
    """What the loader draws from: the dataset's rows, or their latent cache (``--cache_latents``)."""
    rows = IndexedDataset(train_ds)
    if not args.cache_latents:
        return rows
    context = mode.frozen_context(frozen)
    settings = {
        "vae": weights_digest(vae), "dataset": train_ds._fingerprint, "resolution": args.resolution,
        "center_crop": args.center_crop, "random_flip": args.random_flip, "columns": needed, "seed": args.seed,
        "mode": args.conditioning, "f": vae.downsampling_factor,
        "frozen": {name: weights_digest(m) for name, m in frozen.items() if isinstance(m, nn.Module) and name != "vae"}
        if context else None, "max_prompt_length": getattr(args, "max_prompt_length", None),
    }
    cache_dir = Path(args.latent_cache_dir or output_dir / "latent_cache")  # seen by every process
    return build_latent_cache(  # every process encodes its shards of the set, in parallel
        rows, vae, mode, columns, cache_dir, settings,
        context,
        batch_size=args.train_batch_size, show_progress=accelerator.is_local_main_process,
        rank=accelerator.process_index, world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
        num_workers=args.dataloader_num_workers,
    )
