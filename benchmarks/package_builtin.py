"""Copy a trained pipeline into the package as a built-in model: float16 safetensors, and without its autoencoder
when that autoencoder is the package's shared one (``pretrained/emoji-kl-f4``), which is checked weight for weight.

    python benchmarks/package_builtin.py outputs/builtin/super_resolution emoji-super-resolution
    python benchmarks/package_builtin.py benchmarks/results/stage1_cpu_v2/vae emoji-kl-f4 --autoencoder
A model kept to be trained further goes elsewhere with ``--into`` (without the shared autoencoder, which
``pretrained_components`` then does not supply: copy it back as ``vae/`` before loading).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ldm_diffusers import LDMPipeline, load_autoencoder
from ldm_diffusers.pretrained import SHARED_AUTOENCODER, pretrained_root

PACKAGE = pretrained_root()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].half(), sb[k].half()) for k in sa)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="A saved pipeline (or, with --autoencoder, an autoencoder) folder.")
    p.add_argument("name", help="The built-in name (a folder of src/ldm_diffusers/pretrained).")
    p.add_argument("--autoencoder", action="store_true", help="Package the shared autoencoder itself.")
    p.add_argument("--into", type=Path, default=PACKAGE,
                   help="Folder to write NAME into (default: the package's; another keeps a model to continue).")
    a = p.parse_args(argv)
    target = a.into / a.name
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if a.autoencoder:
        load_autoencoder(a.source).to(torch.float16).save_pretrained(tmp)
    else:
        pipe = LDMPipeline.from_pretrained(a.source)
        shared = load_autoencoder(PACKAGE / SHARED_AUTOENCODER)
        pipe.to(torch.float16).save_pretrained(tmp)
        if same_weights(pipe.vae, shared) and pipe.vae.config.scaling_factor == shared.config.scaling_factor:
            shutil.rmtree(tmp / "vae")  # loaded from the shared folder (pretrained_components)
        else:
            print(f"{a.source}'s autoencoder is not the shared {SHARED_AUTOENCODER}: it is packaged with the model.")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    print(f"{target}: {size:.1f} MiB")


if __name__ == "__main__":
    main()
