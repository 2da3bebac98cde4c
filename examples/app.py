"""A Hugging Face Space: the ldm-diffusers web demo for builtin:emoji-text-to-image.

Written by ldm_diffusers.hub.space_files; run it anywhere with `python app.py` (pip install 'ldm-diffusers[demo]').
"""

import torch

from ldm_diffusers.demo.app import build_demo, load_pipeline

MODEL = "builtin:emoji-text-to-image"

demo = build_demo(load_pipeline(MODEL, "cuda" if torch.cuda.is_available() else "cpu"), MODEL)

if __name__ == "__main__":
    demo.launch()
