#!/usr/bin/env python
"""Train a latent diffusion model (stage 2) in the latent space of a stage-1 autoencoder.

    accelerate launch examples/train_text_to_image.py \
        --pretrained_vae_model_name_or_path outputs/kl-f4 --output_dir outputs/ldm-text
    accelerate launch examples/train_text_to_image.py --conditioning class ...      # or layout,
        # super_resolution, inpainting, segmentation, unconditional: one loop serves every mode
    python examples/train_text_to_image.py --help

Flags follow diffusers' examples/text_to_image/train_text_to_image.py. The loop lives in
``ldm_diffusers.training.latent_diffusion``; this file is its command-line entry point.
"""

from ldm_diffusers.training.latent_diffusion import main

if __name__ == "__main__":
    main()
