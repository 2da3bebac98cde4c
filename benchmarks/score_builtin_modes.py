"""Score a built-in emoji model of one mode against the baseline a user would otherwise reach for, on the
validation split of the built-in emoji set (343 images, 64x64):

* super_resolution: 16x16 inputs (the training downsample: bicubic, antialiased) upsampled by the model and by
  bicubic interpolation; FID (TF-Inception) and PSNR / SSIM of both against the real images;
* inpainting: one seeded random mask per image (the training masks); the model's fill and OpenCV's Telea
  inpainting (``cv2.inpaint``, radius 3) of the same masked images; FID and the package's perceptual distance
  (EfficientNet-Lite0 features, LPIPS-style) of both, and how much the kept pixels moved;
* class: N samples per class; a linear probe (logistic regression on global-average-pooled EfficientNet-Lite0
  features, the package's perceptual network) trained on the training split names the class of each sample:
  accuracy against chance (1 / classes), and the probe's own accuracy on the real validation images.

    python benchmarks/score_builtin_modes.py MODE --model DIR --out FILE.json [--steps 50] [--num_images N]
Writes FILE.json and a grid FILE.png (inputs / model / baseline / real). opencv-python-headless for inpainting.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import make_image_grid

from ldm_diffusers import LDMPipeline
from ldm_diffusers.conditioning import TrainingColumns
from ldm_diffusers.conditioning.spatial import SuperResolutionMode
from ldm_diffusers.data import load_image_splits, load_pixels, random_inpainting_mask, tensor_to_pil
from ldm_diffusers.evaluation import cached_reference_features, extract_features, generate_images, psnr, ssim
from ldm_diffusers.evaluation.generation import feature_metrics
from ldm_diffusers.losses.perceptual import EfficientNetPerceptualLoss


@functools.cache
def perceptual_net() -> EfficientNetPerceptualLoss:
    """The package's perceptual network (EfficientNet-Lite0), loaded once per run."""
    return EfficientNetPerceptualLoss()


def perceptual_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean EfficientNet-Lite0 feature distance of images in [0, 1]."""
    net = perceptual_net()
    with torch.no_grad():
        return float(torch.cat([net(x * 2 - 1, y * 2 - 1).flatten() for x, y in zip(a.split(64), b.split(64))]).mean())


def super_resolution(pipe, real, args) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    f = pipe.vae_scale_factor
    low = SuperResolutionMode().cache_inputs({"pixel_values": real * 2 - 1}, TrainingColumns(downsampling_factor=f))["low_res"]
    low = (low + 1) / 2  # a user's numpy image in [0, 1]
    fake, seconds = generate_images(pipe, [{"image": low[i].permute(1, 2, 0).numpy()} for i in range(len(real))],
                                    args.batch_size, args.steps, 1.0, args.seed, eta=args.eta)
    bicubic = F.interpolate(low, scale_factor=f, mode="bicubic", align_corners=False).clamp(0, 1)
    results = {"input_size": list(low.shape[-2:]), "seconds_per_image": seconds}
    for name, images in (("model", fake), ("bicubic", bicubic)):
        results[name] = {"psnr": float(psnr(images, real).mean()), "ssim": float(ssim(images, real).mean())}
    return results, {"model": fake, "bicubic": bicubic}, F.interpolate(low, scale_factor=f, mode="nearest")


def telea(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    import cv2

    out = []
    for image, mask in zip(images, masks):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        filled = cv2.inpaint(pixels, (mask[0].numpy() > 0.5).astype(np.uint8), 3, cv2.INPAINT_TELEA)
        out.append(torch.from_numpy(filled).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def inpainting(pipe, real, args) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    n, res = real.shape[0], real.shape[-1]
    masks = torch.stack([torch.from_numpy(random_inpainting_mask(res, res, np.random.default_rng([args.seed, i])))
                         for i in range(n)])[:, None]
    conditions = [{"image": real[i].permute(1, 2, 0).numpy(), "mask_image": masks[i]} for i in range(n)]
    fake, seconds = generate_images(pipe, conditions, args.batch_size, args.steps, 1.0, args.seed, eta=args.eta)
    baseline = telea(real, masks)
    results = {"mask_fraction": float(masks.mean()), "seconds_per_image": seconds}
    for name, images in (("model", fake), ("telea", baseline)):
        kept = ((images - real).abs() * (1 - masks)).amax().item()
        results[name] = {"perceptual_distance": perceptual_distance(images, real), "psnr": float(psnr(images, real).mean()),
                         "max_abs_change_outside_mask": kept}
    return results, {"model": fake, "telea": baseline}, real * (1 - masks)


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    """[N, C] global-average-pooled last-stage EfficientNet-Lite0 features of images in [0, 1]."""
    net = perceptual_net()
    with torch.no_grad():
        return torch.cat([net.features(x * 2 - 1)[-1].mean(dim=(2, 3)) for x in images.split(64)])


def linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression (L2 1e-3, LBFGS) on standardised features."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(features), labels) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def class_conditional(pipe, real, args, train_rows, val_rows) -> tuple[dict, list[torch.Tensor]]:
    """Samples per class named by a probe trained on the training split; grid rows: 8 samples of each class."""
    classes = pipe.class_embedder.config.num_classes
    column = args.class_column
    train = load_pixels(train_rows, args.resolution)
    train_features = pooled_features(train)
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    probe = linear_probe((train_features - mean) / std, torch.tensor(list(train_rows.with_format(None)[column])), classes)

    def predict(images):
        with torch.no_grad():
            return probe((pooled_features(images) - mean) / std).argmax(1)

    real_accuracy = float((predict(real) == torch.tensor(list(val_rows.with_format(None)[column]))).float().mean())
    wanted = torch.arange(classes).repeat_interleave(args.per_class)
    fake, seconds = generate_images(pipe, [{"class_labels": int(c)} for c in wanted], args.batch_size, args.steps,
                                    args.guidance_scale, args.seed, eta=args.eta)
    named = (predict(fake) == wanted).float()
    per_class = {pipe.class_embedder.class_name(c): float(named[wanted == c].mean()) for c in range(classes)}
    results = {"probe_accuracy_on_samples": float(named.mean()), "chance": 1 / classes,
               "probe_accuracy_on_real_validation": real_accuracy, "per_class": per_class,
               "samples_per_class": args.per_class, "guidance_scale": args.guidance_scale, "seconds_per_image": seconds}
    return results, [fake[wanted == c][:8] for c in range(classes)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["super_resolution", "inpainting", "class"])
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps.")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (CompVis' super-resolution notebook: 1, 100 steps).")
    p.add_argument("--num_images", type=int, default=None, help="Validation images (default: all 343).")
    p.add_argument("--per_class", type=int, default=40, help="Class mode: samples per class.")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="Class mode.")
    p.add_argument("--class_column", default="group_id")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = LDMPipeline.from_pretrained(args.model)
    train_rows, val_rows = load_image_splits("emoji", None, None, args.resolution)
    if args.num_images:
        val_rows = val_rows.select(range(min(args.num_images, len(val_rows))))
    real = load_pixels(val_rows, args.resolution)  # [N, 3, R, R] in [0, 1]
    if args.mode == "class":
        results, rows = class_conditional(pipe, real, args, train_rows, val_rows)
    else:
        results, outputs, inputs = (super_resolution if args.mode == "super_resolution" else inpainting)(pipe, real, args)
        settings = {"dataset": "emoji", "resolution": args.resolution, "n": len(real), "fingerprint": val_rows._fingerprint}
        real_features = torch.from_numpy(cached_reference_features("validation", settings,
                                                                   lambda: extract_features(real).numpy()))
        for name, images in outputs.items():  # the model and the baseline against the same real features
            results[name].update(feature_metrics(real_features, extract_features(images, desc=f"features ({name})")))
        rows = [inputs[:8], *(images[:8] for images in outputs.values()), real[:8]]
    results.update(mode=args.mode, model_path=str(args.model), steps=args.steps, eta=args.eta, images=len(real))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    grid = make_image_grid(tensor_to_pil(torch.cat(rows) * 2 - 1), rows=len(rows), cols=rows[0].shape[0])
    grid.save(args.out.with_suffix(".png"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
