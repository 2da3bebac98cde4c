#!/usr/bin/env python
"""Train a Latent Diffusion stage-1 autoencoder (KL- or VQ-regularised).

    accelerate launch examples/train_autoencoder.py --regularization kl -f 4 --output_dir outputs/kl-f4
    python examples/train_autoencoder.py --help

The loop lives in ``ldm_diffusers.training.autoencoder``; this file is its command-line entry point.
"""

from ldm_diffusers.training.autoencoder import main

if __name__ == "__main__":
    main()
