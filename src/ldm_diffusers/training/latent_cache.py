"""Latent caching: encode the training set once with the frozen stage-1 encoder (and a frozen text
encoder) and train from the cache.

For a KL autoencoder the cache keeps the posterior's mean and standard deviation, not one sample:
the training loop draws z = mean + std * eps with the same per-example noise it would use on pixels,
so training from the cache is the same computation as training on pixels, only without the
encoder. VQ models cache their pre-quantisation latents. Tensors the conditioning derives from the
pixels (the low-resolution image for super-resolution) and the frozen text encoder's tokens (float16)
are cached too; data augmentation (random crops, flips) is frozen at caching time.

A cache is a ``datasets`` folder ``<cache_dir>/<key>``, where the key hashes everything the cache
depends on (stage-1 weights, dataset fingerprint, resolution, augmentation, conditioning columns,
text encoder); it is written atomically, reused by later runs when every file it was written with is
there with its size, and rebuilt otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.transforms import collate_examples
from ..utils.checkpoints import atomic_directory, discard_directory, publish_directory, remove_stale_temporaries

logger = logging.getLogger(__name__)
INFO_FILE = "latent_cache_info.json"


def weights_digest(*modules: torch.nn.Module | None) -> str:
    """A short hash of the modules' weights (a cache made with other weights is never reused)."""
    digest = hashlib.sha1()
    for module in modules:
        if module is None:
            continue
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it is that already (half-precision results are upcast, a float64
    run stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@torch.no_grad()
def encode_latent_moments(vae, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL: {"latent_mean", "latent_std"}; VQ: {"latents"} (pre-quantisation), all [B, c, h, w] unscaled."""
    out = vae.encode(pixel_values.to(vae.device, vae.dtype))
    if hasattr(out, "latent_dist"):
        return {"latent_mean": at_least_float32(out.latent_dist.mean), "latent_std": at_least_float32(out.latent_dist.std)}
    return {"latents": at_least_float32(out.latents)}


def _feature_for(array: np.ndarray):
    from datasets import Array2D, Array3D

    shape = tuple(array.shape[1:])
    dtype = str(array.dtype)
    if len(shape) == 2:
        return Array2D(shape=shape, dtype=dtype)
    if len(shape) == 3:
        return Array3D(shape=shape, dtype=dtype)
    raise ValueError(f"Cannot cache arrays of shape {shape}.")


@torch.no_grad()
def build_latent_cache(
    dataset,
    vae,
    mode,
    columns,
    cache_dir: str | Path,
    settings: dict,
    text_encoding: tuple | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
):
    """Encode ``dataset`` (rows with ``pixel_values``, ``index`` and the mode's inputs) once and return
    the cache as a ``datasets.Dataset`` in torch format; reuse it when ``settings`` match.

    ``text_encoding``: (tokenizer, frozen text encoder) whose tokens are cached as ``context``."""
    from datasets import Dataset, Features, Value, load_from_disk

    from ..conditioning.text import encode_prompts

    if mode is not None and not mode.cacheable:
        raise ValueError(
            f"The {mode.name} mode cannot train from a latent cache: every step draws a new random mask and "
            "needs a fresh stage-1 encoding of the masked image. Drop --cache_latents."
        )
    key = cache_key(settings)
    path = Path(cache_dir) / key
    if path.exists():
        problem = cache_problem(path)
        if problem is None:
            logger.info("Using the latent cache %s.", path)
            return _torch_format(load_from_disk(str(path)))
        logger.warning("The latent cache %s is unusable (%s): rebuilding it.", path, problem)
        discard_directory(path)

    remove_stale_temporaries(cache_dir)  # folders of builds that were killed half-way
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_examples)
    tensors: dict[str, list[np.ndarray]] = {}
    others: dict[str, list] = {}
    for batch in tqdm(loader, desc="caching latents", disable=not show_progress):
        found = encode_latent_moments(vae, batch["pixel_values"])
        if mode is not None:
            found.update(mode.cache_inputs(batch, columns))
        if text_encoding is not None:
            tokenizer, encoder = text_encoding
            found["context"] = encode_prompts(tokenizer, encoder, batch["prompt"]).half()
        for name, value in found.items():
            tensors.setdefault(name, []).extend(value.cpu().numpy())
        for name, value in batch.items():
            if name == "pixel_values":
                continue
            if name == "segmentation_map":
                tensors.setdefault(name, []).extend(value.numpy().astype(np.int64))
            else:
                others.setdefault(name, []).extend(value.tolist() if isinstance(value, torch.Tensor) else value)

    features = {name: _feature_for(np.stack(values)) for name, values in tensors.items()}
    data = {name: np.stack(values) for name, values in tensors.items()}
    for name, values in others.items():
        data[name] = values
        if name in ("index", "class_labels"):
            features[name] = Value("int64")
    cache = Dataset.from_dict(data, features=Features({**features, **_infer(others, features)}))
    tmp = atomic_directory(path)
    cache.save_to_disk(str(tmp))
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / INFO_FILE).write_text(json.dumps({"settings": settings, "rows": len(cache), "files": files}, indent=2,
                                            default=str))
    publish_directory(tmp, path)
    logger.info("Cached %d latents in %s.", len(cache), path)
    return _torch_format(load_from_disk(str(path)))


def cache_problem(path: Path) -> str | None:
    """Why the cache folder ``path`` cannot be trained on (None if it is whole): no info file (it was never
    finished), a file missing or of another size than when it was written, or rows that do not load."""
    from datasets import load_from_disk

    try:
        info = json.loads((path / INFO_FILE).read_text())
        files, rows = info["files"], info["rows"]
    except (OSError, ValueError, KeyError) as err:
        return f"no complete {INFO_FILE}: {err}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    try:
        found = len(load_from_disk(str(path)))
    except Exception as err:  # datasets / pyarrow raise many types for damaged folders
        return f"it does not load ({type(err).__name__}: {err})"
    return None if found == rows else f"{found} rows, {rows} were written"


def _infer(others: dict, features: dict) -> dict:
    """Features for the non-tensor columns (strings, layouts) that are not fixed above."""
    from datasets import Sequence, Value

    inferred = {}
    for name, values in others.items():
        if name in features:
            continue
        if name == "layout":
            inferred[name] = Sequence(Sequence(Value("float32")))
        elif values and isinstance(values[0], str):
            inferred[name] = Value("string")
        else:
            inferred[name] = Value("int64")
    return inferred


def _torch_format(cache):
    tensor_columns = [c for c in cache.column_names if c not in ("prompt", "layout", "index", "class_labels")]
    return cache.with_format("torch", columns=tensor_columns, output_all_columns=True)
