"""The package's layering: the Hub layer (``ldm_diffusers.hub``) stands above the models and the command line
(``ldm_diffusers.cli``) above the training scripts, never below them."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lower_layers_do_not_import_the_layers_above():
    code = ("import sys, ldm_diffusers.models, ldm_diffusers.conditioning, ldm_diffusers.utils.checkpoints; "
            "assert 'ldm_diffusers.hub' not in sys.modules, 'ldm_diffusers.hub was imported'; "
            "from ldm_diffusers.training import autoencoder, latent_diffusion; "
            "autoencoder.parse_args([]); latent_diffusion.build_parser(); "
            "assert 'ldm_diffusers.cli' not in sys.modules, 'ldm_diffusers.cli was imported'")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
