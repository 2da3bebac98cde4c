#!/usr/bin/env python
"""The CompVis model zoo through ``convert_compvis_checkpoint``: how close, how complete, how fast.

For every fixture in tests/fixtures/compvis (checkpoints made by the original CompVis code at reduced widths):

* parity: the largest error of every reference tensor (the first stage's encode / decode, tau_theta of the
  condition, eps_theta at two timesteps, 10-step DDIM with and without guidance, PLMS), against the fixtures'
  tolerance 1e-3 * max(1, max |reference|);
* real width: a checkpoint with the released key layout and true widths (``keys_real_width.json``, random values,
  the fixture's config with its ``width_changes`` undone) is written, then converted; the time of
  ``convert_compvis_checkpoint`` (load + map + build + load weights) and the keys it placed or dropped on purpose.

    python benchmarks/compvis_conversion.py [--only NAME ...] [--skip_real_width] [--out results.json]

Prints a markdown table and writes JSON. The real-width pass needs RAM for three copies of the largest model
(txt2img-1p4B-eval: 1.54e9 values, about 18 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "compvis"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
          "float16": torch.float16, "bool": torch.bool, "uint8": torch.uint8}


def materialize(names: list[str], out: Path) -> None:
    """The fixtures' model.ckpt files, by their own materialize.py in a subprocess (it registers a stand-in
    Lightning module that this process must not see)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import materialize\n"
            "for name in sys.argv[3:]: materialize.materialize(f'{sys.argv[1]}/{name}', f'{sys.argv[2]}/{name}.ckpt')")
    subprocess.run([sys.executable, "-c", code, str(FIXTURES), str(out), *names], check=True)


def errors(name: str, ckpt: Path) -> dict[str, tuple[float, float]]:
    """{reference tensor: (max abs error, tolerance)} of the converted fixture."""
    from ldm_diffusers import switch_sampler
    from ldm_diffusers.conditioning import InpaintingMode, SegmentationMode
    from ldm_diffusers.conversion import convert_compvis_checkpoint

    ref = load_file(FIXTURES / name / "reference.safetensors")
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    model = convert_compvis_checkpoint(ckpt, FIXTURES / name / "config.yaml")
    ours = {}
    with torch.no_grad():
        if meta["kind"] != "latent_diffusion":
            if name.startswith("kl"):
                posterior = model.encode(ref["x"]).latent_dist
                ours = {"posterior_mean": posterior.mean, "posterior_std": posterior.std,
                        "reconstruction": model.decode(posterior.mode()).sample, "decoded": model.decode(ref["z"]).sample}
            else:
                ours = {"h": model.encode(ref["x"]).latents, "decoded": model.decode(ref["z"]).sample,
                        "decoded_no_quant": model.decode(ref["z"], force_not_quantize=True).sample}
            return _compare(ours, ref)
        pipe = model
        pipe.set_progress_bar_config(disable=True)
        inputs, context = {}, None
        from PIL import Image

        if "cond.lr_image_u8" in ref:
            inputs = {"image": [Image.fromarray(a.numpy()) for a in ref["cond.lr_image_u8"]]}
        elif "cond.mask_u8" in ref:
            inputs = {"image": [Image.fromarray(a.numpy()) for a in ref["cond.image_u8"]],
                      "mask_image": [Image.fromarray(a.numpy()) for a in ref["cond.mask_u8"]]}
            ours["cond.concat"] = InpaintingMode().condition(pipe, inputs, None).concat
        elif "cond.segmentation_labels" in ref:
            inputs = {"segmentation_map": ref["cond.segmentation_labels"]}
            ours["cond.concat"] = SegmentationMode().condition(pipe, inputs, ref["cond.concat"].shape[-2:]).concat
        elif "cond.class_labels" in ref:
            inputs, context = {"class_labels": ref["cond.class_labels"]}, pipe.class_embedder(ref["cond.class_labels"])
            if "cond.null_context" in ref:
                ours["cond.null_context"] = pipe.class_embedder(ref["cond.null_class_labels"])
        elif pipe.layout_encoder is not None:
            inputs = {"layout": meta["pipeline_inputs"]["layout"]}
            context = pipe.layout_encoder(inputs["layout"])
        elif "cond.token_ids" in ref:
            inputs = {"prompt": meta["pipeline_inputs"]["prompt"]}
            context = pipe.text_encoder(ref["cond.token_ids"])[0]
            ours["cond.null_context"] = pipe.text_encoder(ref["cond.null_token_ids"])[0]
        if context is not None:
            ours["cond.context"] = context
        z_t = ref["apply_model.z_t"]
        if "cond.concat" in ref:
            z_t = torch.cat([z_t, ref["cond.concat"]], dim=1)
        for i in (0, 1):
            ours[f"apply_model.{i}.eps"] = pipe.unet(z_t, ref[f"apply_model.{i}.t"], *([] if context is None else [context])).sample
        if "first_stage.posterior_mean" in ref:
            posterior = pipe.vae.encode(ref["first_stage.x"]).latent_dist
            ours["first_stage.posterior_mean"], ours["first_stage.posterior_std"] = posterior.mean, posterior.std
        else:
            ours["first_stage.h"] = pipe.vae.encode(ref["first_stage.x"]).latents
        ours["first_stage.decoded"] = pipe.decode_latents(ref["first_stage.z"])
        common = dict(inputs, latents=ref["ddim.x_T"], eta=0.0, output_type="latent")
        ours["ddim.g1.latents"] = pipe(**common, num_inference_steps=10, guidance_scale=1.0).images
        if "ddim.g3.latents" in ref:
            ours["ddim.g3.latents"] = pipe(**common, num_inference_steps=10, guidance_scale=3.0).images
        if "plms.g3.latents" in ref:
            plms = type(pipe)(**{**pipe.components, "scheduler": switch_sampler(pipe.scheduler, "plms")})
            plms.set_progress_bar_config(disable=True)
            ours["plms.g3.latents"] = plms(**common, num_inference_steps=10, guidance_scale=3.0).images
        if "ddim_s7.g1.latents" in ref:
            ours["ddim_s7.g1.latents"] = pipe(**common, num_inference_steps=7).images
        for key in [k for k in ("ddim.g1", "ddim.g3") if f"{k}.decoded" in ref]:
            ours[f"{key}.decoded"] = pipe.decode_latents(ours[f"{key}.latents"])
    return _compare(ours, ref)


def _compare(ours: dict, ref: dict) -> dict[str, tuple[float, float]]:
    out = {}
    for key, value in ours.items():
        assert value.shape == ref[key].shape, (key, value.shape, ref[key].shape)
        out[key] = ((value - ref[key]).abs().max().item(), 1e-3 * max(1.0, ref[key].abs().max().item()))
    return out


def real_width_config(name: str) -> dict:
    """The fixture's config with its width reductions undone (meta.json ``width_changes``: "a.b: 320 -> 32")."""
    config = yaml.safe_load((FIXTURES / name / "config.yaml").read_text())
    params = config["model"]["params"]
    for change in json.loads((FIXTURES / name / "meta.json").read_text())["width_changes"]:
        path, values = change.split(": ")
        node = params
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(values.split(" -> ")[0])
    return config


def real_width(name: str, folder: Path) -> dict:
    """Write a real-width checkpoint of random values and time its conversion."""
    from ldm_diffusers.conversion import convert_compvis_checkpoint

    layout = json.loads((FIXTURES / name / "keys_real_width.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype in layout["state_dict"]:
        dtype = DTYPES[dtype]
        state[key] = (torch.randn(shape, generator=generator) * 0.02).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    config = real_width_config(name)
    if config["model"].get("params", {}).get("cond_stage_config") == "__is_first_stage__":  # one module, two names
        state.update({k: state["first_stage_model." + k[len("cond_stage_model."):]]
                      for k in state if k.startswith("cond_stage_model.")})
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    ckpt = folder / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 0}, ckpt)
    size = ckpt.stat().st_size
    del state
    start = time.perf_counter()
    model = convert_compvis_checkpoint(ckpt, folder / "config.yaml")
    seconds = time.perf_counter() - start
    modules = model.components.values() if hasattr(model, "components") else [model]
    values = sum(p.numel() for m in modules if isinstance(m, torch.nn.Module) for p in m.state_dict().values())
    keys = [k for k, _, _ in layout["state_dict"]]
    dropped = [k for k in keys if k.startswith(("loss.", "betas", "alphas", "sqrt_", "log_one", "posterior_"))
               or k in ("model_ema.decay", "model_ema.num_updates", "scale_factor")]
    ckpt.unlink()
    return {"seconds": seconds, "checkpoint_bytes": size, "keys": len(keys), "dropped_on_purpose": len(dropped),
            "n_values": layout["n_values"], "converted_values": values}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="Fixture names (default: all 22).")
    parser.add_argument("--skip_real_width", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file for the results.")
    args = parser.parse_args(argv)
    names = args.only or sorted(p.name for p in FIXTURES.iterdir() if (p / "meta.json").is_file())
    results = {}
    print("| fixture | tensors compared | worst error / tolerance |"
          + ("" if args.skip_real_width else " real-width values | real-width keys | convert time |"))
    print("|---|---|---|" + ("" if args.skip_real_width else "---|---|---|"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        materialize(names, tmp)
        for name in names:
            entry = {"errors": errors(name, tmp / f"{name}.ckpt")}
            if not args.skip_real_width:
                entry["real_width"] = real_width(name, tmp)
            results[name] = entry
            worst = max(e / t for e, t in entry["errors"].values())
            line = f"| {name} | {len(entry['errors'])} | {worst:.2e} |"
            if "real_width" in entry:
                rw = entry["real_width"]
                line += f" {rw['n_values'] / 1e6:.0f}M | {rw['keys']} ({rw['dropped_on_purpose']} dropped) | {rw['seconds']:.1f} s |"
            print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| fixture | tensor | max abs error | tolerance |\n|---|---|---|---|")
    for name, entry in results.items():
        for key, (error, tol) in entry["errors"].items():
            print(f"| {name} | {key} | {error:.2e} | {tol:.2e} |")


if __name__ == "__main__":
    main()
