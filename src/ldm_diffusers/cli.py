"""``ldm-diffusers`` command line: one entry point for the package's jobs.

    ldm-diffusers build-emoji --resolution 64
    ldm-diffusers train-autoencoder --regularization kl -f 4 --output_dir outputs/kl-f4
    ldm-diffusers evaluate-autoencoder outputs/kl-f4
    ldm-diffusers train --pretrained_vae_model_name_or_path outputs/kl-f4 --conditioning text --output_dir outputs/ldm
"""

from __future__ import annotations

import argparse
import json
import sys


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
