"""``ldm-diffusers`` command line: one entry point for the package's jobs.

    ldm-diffusers build-emoji --resolution 64
    ldm-diffusers train-autoencoder --regularization kl -f 4 --output_dir outputs/kl-f4
    ldm-diffusers evaluate-autoencoder outputs/kl-f4
    ldm-diffusers generate "an emoji of a red apple" --out apple.png          # the built-in emoji model
    ldm-diffusers generate "an emoji of red apple" --model outputs/ldm --out apple.png
    ldm-diffusers train --pretrained_vae_model_name_or_path outputs/kl-f4 --conditioning text --output_dir outputs/ldm
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _build_emoji(argv):
    from .data import build_emoji_dataset

    p = argparse.ArgumentParser(prog="ldm-diffusers build-emoji", description="Render the built-in Noto emoji imagefolder.")
    p.add_argument("--output_dir", default=None, help="Default: ~/.cache/ldm_diffusers/emoji-<resolution>.")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--validation_fraction", type=float, default=0.1)
    p.add_argument("--no_skin_tones", action="store_true", help="Leave out skin-tone variants.")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    path = build_emoji_dataset(a.output_dir, a.resolution, a.validation_fraction, not a.no_skin_tones, a.overwrite)
    print(json.loads((path / "dataset_info_ldm.json").read_text())["counts"], "->", path)


def _train_autoencoder(argv):
    from .training.autoencoder import main

    main(argv, prog="ldm-diffusers train-autoencoder")


def _generate(argv):
    import torch

    from .pipelines import LDMPipeline
    from .schedulers import SAMPLERS, switch_sampler

    p = argparse.ArgumentParser(
        prog="ldm-diffusers generate",
        description="Sample images from a trained LDMPipeline (local folder or Hub id) and save them as one grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prompt", nargs="*", help="Prompt(s) for a text-to-image model.")
    p.add_argument("--model", default="builtin:emoji-text-to-image",
                   help="LDMPipeline folder, Hub id, or a built-in model (the emoji text-to-image LDM that ships "
                        "with the package).")
    p.add_argument("--out", default="samples.png", help="Output PNG (a grid when several images).")
    p.add_argument("--class_labels", type=int, nargs="+", default=None, help="For class-conditional models.")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--batch", type=int, default=1, help="Images per prompt (or unconditional images).")
    p.add_argument("--steps", type=int, default=50, help="Sampler steps.")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="Classifier-free guidance (1 = off).")
    p.add_argument("--scheduler", choices=sorted(SAMPLERS), default=None, help="Default: the model's own.")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    pipe = LDMPipeline.from_pretrained(a.model).to(a.device)
    if a.scheduler:
        pipe.scheduler = switch_sampler(pipe.scheduler, a.scheduler)
    inputs = {}
    if a.prompt:
        inputs = {"prompt": a.prompt, "negative_prompt": None if a.negative_prompt is None else [a.negative_prompt] * len(a.prompt)}
    elif a.class_labels is not None:
        inputs = {"class_labels": a.class_labels}
    guidance = a.guidance_scale if inputs else 1.0
    start = time.perf_counter()
    images = pipe(**inputs, num_images_per_prompt=a.batch if inputs else 1, batch_size=a.batch, num_inference_steps=a.steps,
                  guidance_scale=guidance, eta=a.eta, height=a.height, width=a.width,
                  generator=torch.Generator("cpu").manual_seed(a.seed)).images
    if len(images) == 1:
        images[0].save(a.out)
    else:
        from diffusers.utils import make_image_grid

        rows = max(1, len(a.prompt) if a.prompt else 1)
        make_image_grid(images, rows=rows, cols=len(images) // rows).save(a.out)
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s -> {a.out}")


def _train(argv):
    from .training.latent_diffusion import main

    main(argv, prog="ldm-diffusers train")


def _evaluate_autoencoder(argv):
    import torch

    from .data.transforms import collate_pixels, image_column_of, load_image_splits, pixel_transform
    from .evaluation import evaluate_autoencoder
    from .models.autoencoders import load_autoencoder

    p = argparse.ArgumentParser(
        prog="ldm-diffusers evaluate-autoencoder",
        description="PSNR, SSIM and rFID of a saved autoencoder on a held-out split (default: built-in emoji).",
    )
    p.add_argument("model", help="Folder (or Hub id) of a saved LDMAutoencoderKL / LDMVQModel.")
    p.add_argument("--dataset_name", default=None)
    p.add_argument("--train_data_dir", default=None)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--skip_rfid", action="store_true")
    a = p.parse_args(argv)
    model = load_autoencoder(a.model)
    _, val = load_image_splits(a.dataset_name, None, a.train_data_dir, a.resolution)
    val.set_transform(pixel_transform(image_column_of(val), a.resolution))
    loader = torch.utils.data.DataLoader(val, batch_size=a.batch_size, collate_fn=collate_pixels)
    print(json.dumps(evaluate_autoencoder(model, loader, a.max_samples, not a.skip_rfid), indent=2))


COMMANDS = {
    "build-emoji": (_build_emoji, "render the built-in emoji dataset"),
    "train-autoencoder": (_train_autoencoder, "train a KL/VQ stage-1 autoencoder"),
    "generate": (_generate, "sample images from a trained LDMPipeline"),
    "train": (_train, "train a latent diffusion model (any conditioning mode)"),
    "evaluate-autoencoder": (_evaluate_autoencoder, "PSNR / SSIM / rFID of a saved autoencoder"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<22}{help}" for name, (_, help) in COMMANDS.items())
        print(f"usage: ldm-diffusers COMMAND [options]\n\ncommands:\n{lines}\n\n`ldm-diffusers COMMAND --help` for options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command '{argv[0]}'", file=sys.stderr)
            raise SystemExit(2)
        return
    COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    main()
