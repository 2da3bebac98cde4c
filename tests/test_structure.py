"""The package's layering: the Hub layer (``ldm_diffusers.hub``) stands above the models, never below them."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_models_conditioning_and_checkpoints_do_not_import_the_hub_layer():
    code = ("import sys, ldm_diffusers.models, ldm_diffusers.conditioning, ldm_diffusers.utils.checkpoints; "
            "assert 'ldm_diffusers.hub' not in sys.modules, 'ldm_diffusers.hub was imported'")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
