"""``ldm-diffusers`` command line: one entry point for the package's jobs.

    ldm-diffusers build-emoji --resolution 64
    ldm-diffusers train-autoencoder --regularization kl -f 4 --output_dir outputs/kl-f4
    ldm-diffusers evaluate-autoencoder outputs/kl-f4
    ldm-diffusers generate "an emoji of a red apple" --out apple.png          # the built-in emoji model
    ldm-diffusers generate "an emoji of red apple" --model outputs/ldm --out apple.png
    ldm-diffusers upscale photo.png --model converted/bsr_sr --out photo-4x.png       # tiled above the trained size
    ldm-diffusers train --pretrained_vae_model_name_or_path outputs/kl-f4 --conditioning text --output_dir outputs/ldm
    ldm-diffusers export outputs/ldm --output model.ckpt --config model.yaml   # back to a CompVis checkpoint
    ldm-diffusers demo --model outputs/ldm --port 7860                        # a web demo in the browser
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .conditioning import mode_named, modes
from .pretrained import DEFAULT_MODEL, MODELS, PREFIX
from .utils.arguments import check_model_path, int_type, non_negative_float, positive_int

BUILTINS = ", ".join(PREFIX + name for name in MODELS)  # the emoji models that ship with the package, one per mode


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


def generate_parser() -> argparse.ArgumentParser:
    import torch

    from .schedulers import SAMPLERS

    p = argparse.ArgumentParser(
        prog="ldm-diffusers generate",
        description="Sample images from a trained LDMPipeline (local folder or Hub id) and save them as one grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=PREFIX + DEFAULT_MODEL,
                   help=f"LDMPipeline folder, Hub id, or a built-in model ({BUILTINS}).")
    p.add_argument("--out", default="samples.png", help="Output PNG (a grid when several images).")
    g = p.add_argument_group("conditioning inputs (one mode's; the model decides which it takes)")
    for mode in modes():
        mode.add_generate_arguments(g)
    p.add_argument("--batch", type=positive_int, default=1, help="Images per prompt (or unconditional images).")
    # the defaults: the fastest setting whose FID on the built-in model is within 5% of DDIM 50
    # (benchmarks/results/sampler_study: DPM-Solver++ 10 steps, FID 134.2 vs 131.8, 0.12 s vs 0.49 s per image)
    p.add_argument("--steps", type=positive_int, default=10, help="Sampler steps.")
    p.add_argument("--guidance_scale", type=non_negative_float, default=None,
                   help="Classifier-free guidance (1 = off). Default: 3.0 where the model has an unconditional input "
                        "to guide against (prompts, classes with a null class), else 1.")
    p.add_argument("--scheduler", choices=sorted(SAMPLERS) + ["model"], default="dpm++",
                   help="Sampler, on the model's own noise schedule ('model': the model's own scheduler as saved).")
    p.add_argument("--eta", type=non_negative_float, default=None,
                   help="DDIM eta (default: the model's mode's: 1 for super-resolution as CompVis' notebook, else 0).")
    p.add_argument("--seed", type=int_type(0, 2**64 - 1), default=0)
    p.add_argument("--height", type=positive_int, default=None, help="A multiple of the autoencoder's f.")
    p.add_argument("--width", type=positive_int, default=None, help="A multiple of the autoencoder's f.")
    p.add_argument("--tile_size", type=positive_int, default=None,
                   help="Sample in overlapping windows of this many pixels (pipe.enable_tiled_sampling); by default "
                        "windows of the trained size when the image is larger than it.")
    p.add_argument("--tile_stride", type=positive_int, default=None, help="Window stride in pixels (default: half).")
    p.add_argument("--no_tiling", action="store_true",
                   help="Run the UNet over the whole latent at any size (the paper's convolutional sampling).")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fast", action="store_true",
                   help="Compile the UNet and decoder first (pipe.enable_fast_sampling(): the same images, faster "
                        "steps; compiling takes about a minute on a CPU, less when inductor's cache has it).")
    p.add_argument("--fast_backend", choices=["auto", "inductor", "openvino"], default="auto",
                   help="With --fast: torch.compile (inductor), or OpenVINO on a CPU (compiles in seconds; "
                        "`pip install ldm-diffusers[openvino]`); 'auto': OpenVINO on a CPU where it is installed, "
                        "else inductor (the choice and its reason are printed).")
    return p


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cpu":
        return text
    # torch.cuda / torch.xpu have is_available(); mps has it under torch.backends
    available = getattr(getattr(torch, device.type, None), "is_available", None) or getattr(
        getattr(torch.backends, device.type, None), "is_available", None)
    if available is None or not available():
        raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return text


def parse_generate_args(argv) -> argparse.Namespace:
    """The ``generate`` flags, checked as far as they can be without loading the model."""
    p = generate_parser()
    a = p.parse_args(argv)
    check_model_path(p, "--model", a.model)
    try:
        a.inputs = {mode.name: found for mode in modes() if (found := mode.generate_inputs(a)) is not None}
    except ValueError as err:
        p.error(str(err))
    if len(a.inputs) > 1:
        p.error(f"pass one conditioning input, got inputs of the {' and '.join(a.inputs)} modes: "
                f"{', '.join(i for m in a.inputs for i in mode_named(m).inputs if i in a.inputs[m])}.")
    out = Path(a.out)
    from PIL import Image

    if out.suffix.lower() not in Image.registered_extensions():
        p.error(f"--out {a.out}: unknown image extension {out.suffix!r}; use e.g. .png or .jpg.")
    if not out.parent.is_dir():
        p.error(f"--out {a.out}: folder '{out.parent}' does not exist.")
    return a


def check_generate_args(p: argparse.ArgumentParser, a: argparse.Namespace, pipe) -> None:
    """The flags that depend on the loaded model: sizes against its f, steps against its scheduler, class ids."""
    f = pipe.vae_scale_factor
    for flag, value in (("--height", a.height), ("--width", a.width)):
        if value is not None and value % f:
            p.error(f"{flag} {value} must be a multiple of the model's autoencoder factor f={f}.")
    if a.no_tiling and (a.tile_size or a.tile_stride):
        p.error("--no_tiling with --tile_size / --tile_stride: choose one.")
    try:
        pipe.tiling_for(a.tile_size, a.tile_stride)
    except ValueError as err:
        p.error(f"--{err}")
    if a.steps > pipe.max_inference_steps():
        p.error(f"--steps {a.steps}: this model's {type(pipe.scheduler).__name__} takes at most "
                f"{pipe.max_inference_steps()} steps.")
    inputs = conditioning_inputs(a)
    try:
        mode = pipe.select_mode(inputs)
        mode.check_inputs(pipe, inputs)
    except (TypeError, ValueError) as err:
        p.error(f"{err} (prompts are positional arguments; see --help for the other inputs)")
    has_null = mode.null_values(pipe, inputs) is not None
    if a.guidance_scale is None:
        a.guidance_scale = 3.0 if has_null else 1.0
    elif a.guidance_scale > 1 and not has_null:
        p.error(f"--guidance_scale {a.guidance_scale:g}: this model's {mode.name} sampling has no unconditional input "
                "to guide against; use --guidance_scale 1.")


def conditioning_inputs(a: argparse.Namespace) -> dict:
    """The pipeline's conditioning arguments from the parsed ``generate`` flags (one mode's, or none)."""
    return next(iter(a.inputs.values()), {})


def _generate(argv):
    import torch

    from .pipelines import LDMPipeline
    from .schedulers import switch_sampler

    a = parse_generate_args(argv)
    pipe = LDMPipeline.from_pretrained(a.model).to(a.device)
    if a.scheduler != "model":
        pipe.scheduler = switch_sampler(pipe.scheduler, a.scheduler)
    check_generate_args(generate_parser(), a, pipe)
    inputs = conditioning_inputs(a)
    size = pipe.select_mode(inputs).output_size(pipe, inputs) or (a.height or 0, a.width or 0)
    trained = pipe.tiling_for(None, None).tile[0] * pipe.vae_scale_factor
    if not a.no_tiling and (a.tile_size or a.tile_stride or max(size) > trained):
        pipe.enable_tiled_sampling(a.tile_size, a.tile_stride)
        f = pipe.vae_scale_factor
        print(f"tiled sampling: windows of {pipe.tiling.tile[0] * f} px every {pipe.tiling.stride[0] * f} px")
    if a.fast:
        pipe.enable_fast_sampling(backend=a.fast_backend)
        print(f"fast sampling with {pipe.fast_sampling.backend}: {pipe.fast_sampling.reason}")
    start = time.perf_counter()
    images = pipe(**inputs, num_images_per_prompt=a.batch if inputs else 1, batch_size=a.batch, num_inference_steps=a.steps,
                  guidance_scale=a.guidance_scale, eta=a.eta, height=a.height, width=a.width,
                  generator=torch.Generator("cpu").manual_seed(a.seed)).images
    if len(images) == 1:
        images[0].save(a.out)
    else:
        from diffusers.utils import make_image_grid

        rows = len(images) // a.batch if inputs and a.batch > 1 else 1  # a row per input's batch, else one row
        make_image_grid(images, rows=rows, cols=len(images) // rows).save(a.out)
    compiling = sum(pipe.fast_sampling.compile_seconds.values()) if a.fast else 0.0
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s"
          + (f" ({compiling:.1f} s of it compiling)" if a.fast else "") + f" -> {a.out}")


def _upscale(argv):
    import torch
    import torch.nn.functional as F

    from .conditioning.image_inputs import image_tensor
    from .conditioning.spatial import open_image
    from .pipelines import LDMPipeline

    p = argparse.ArgumentParser(
        prog="ldm-diffusers upscale",
        description="Super-resolution of an image of any size with a super-resolution LDMPipeline (e.g. CompVis' "
        "bsr_sr converted with `ldm-diffusers convert`): the output is f times larger. Above the model's trained "
        "size it samples in overlapping windows (pipe.enable_tiled_sampling), so memory stays bounded; sides that "
        "the UNet cannot take are padded (reflected) and cropped back.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("image", help="The low-resolution image file.")
    p.add_argument("--model", default=PREFIX + "emoji-super-resolution",
                   help="Super-resolution LDMPipeline folder or Hub id (default: the built-in emoji model, 4x).")
    p.add_argument("--out", default="upscaled.png", help="Output image file.")
    p.add_argument("--steps", type=positive_int, default=100, help="DDIM steps (CompVis' notebook: 100).")
    p.add_argument("--eta", type=non_negative_float, default=1.0, help="DDIM eta (CompVis' notebook: 1).")
    p.add_argument("--seed", type=int_type(0, 2**64 - 1), default=0)
    p.add_argument("--tile_size", type=positive_int, default=None,
                   help="Window side in output pixels (default: the model's trained size); an image within one "
                        "window is sampled whole.")
    p.add_argument("--tile_stride", type=positive_int, default=None, help="Window stride in output pixels "
                   "(default: half the window).")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    check_model_path(p, "--model", a.model)
    try:
        low = open_image("IMAGE", a.image, "RGB")
    except ValueError as err:
        p.error(str(err))
    pipe = LDMPipeline.from_pretrained(a.model).to(a.device)
    if pipe.mode.name != "super_resolution":
        p.error(f"--model {a.model} is a {pipe.mode.name} model, not a super-resolution one.")
    try:
        pipe.enable_tiled_sampling(a.tile_size, a.tile_stride)
    except ValueError as err:
        p.error(str(err))
    multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)  # the UNet halves the latent this often
    width, height = low.size
    pad = (-width % multiple, -height % multiple)
    pixels = F.pad(image_tensor(low), (0, pad[0], 0, pad[1]), mode="reflect" if min(width, height) > max(pad) else "replicate")
    if any(pad):
        print(f"padded {width}x{height} to {width + pad[0]}x{height + pad[1]} (the UNet takes multiples of {multiple}); "
              "the output is cropped back")
    f = pipe.vae_scale_factor
    start = time.perf_counter()
    out = pipe(image=pixels, num_inference_steps=a.steps, eta=a.eta, output_type="pil",
               generator=torch.Generator("cpu").manual_seed(a.seed)).images[0]
    out.crop((0, 0, width * f, height * f)).save(a.out)
    windows = "one window" if pipe.tiling.covers(height + pad[1], width + pad[0]) else (
        f"windows of {pipe.tiling.tile[0] * f} px every {pipe.tiling.stride[0] * f} px")
    print(f"{width}x{height} -> {width * f}x{height * f} in {time.perf_counter() - start:.1f} s ({windows}) -> {a.out}")


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


def _convert(argv):
    p = argparse.ArgumentParser(
        prog="ldm-diffusers convert",
        description="Convert a released CompVis latent-diffusion checkpoint (.ckpt, read without running its pickle, "
        "or .safetensors) and its YAML config into a folder that from_pretrained loads: a first-stage autoencoder "
        "(models/first_stage_models/*) or an LDMPipeline (unconditional, class, text and super-resolution models so "
        "far).",
    )
    p.add_argument("checkpoint", help="The .ckpt / .safetensors file.")
    p.add_argument("--config", required=True, help="The config.yaml released with it (read as data only).")
    p.add_argument("--output_dir", required=True, help="Folder to write (replaced whole if it exists).")
    p.add_argument("--no_ema", action="store_true", help="Take the training weights, not the EMA copy.")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="Saved precision.")
    a = p.parse_args(argv)
    import torch

    from .conversion import CheckpointError, convert_compvis_checkpoint
    from .conversion.compvis import save_converted

    for flag, path in (("checkpoint", a.checkpoint), ("--config", a.config)):
        if not Path(path).is_file():
            p.error(f"{flag} {path}: no such file.")
    try:
        model = convert_compvis_checkpoint(a.checkpoint, a.config, use_ema=not a.no_ema)
    except CheckpointError as err:  # a hostile or broken file: its one-line reason, no usage text, nothing written
        print(f"ldm-diffusers convert: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except NotImplementedError as err:
        p.error(str(err))
    out = save_converted(model, a.output_dir, a.checkpoint, a.config, use_ema=not a.no_ema, dtype=getattr(torch, a.dtype))
    print(f"wrote {type(model).__name__} to {out}")


def _export(argv):
    p = argparse.ArgumentParser(
        prog="ldm-diffusers export",
        description="Write a saved LDMPipeline (or LDMAutoencoderKL / LDMVQModel) folder as a CompVis latent-diffusion "
        "checkpoint and YAML config, the inverse of `ldm-diffusers convert`: the CompVis code and `convert` load them. "
        "Only architectures the CompVis code has are written (unconditional, class labels, LDMBert text, layouts, "
        "segmentation, super-resolution, VQ inpainting); anything else is an error naming the component. The UNet's "
        "training weights are written, no EMA copy (the config says use_ema: false).",
    )
    p.add_argument("model", metavar="PIPELINE_DIR", help="Folder saved with save_pretrained (model_index.json, or an "
                   "autoencoder's config.json).")
    p.add_argument("--output", required=True, help="Checkpoint to write: .ckpt (torch.save, {'state_dict': ...}) or "
                   ".safetensors (the state dict alone).")
    p.add_argument("--config", default=None, help="YAML config to write (default: --output with the suffix .yaml).")
    a = p.parse_args(argv)
    from .conversion import export_compvis_checkpoint

    if not Path(a.model).is_dir():
        p.error(f"PIPELINE_DIR {a.model}: no such folder.")
    config = a.config or str(Path(a.output).with_suffix(".yaml"))
    if Path(config).resolve() == Path(a.output).resolve():
        p.error(f"--config {config} is the --output file; give the config its own name.")
    try:
        checkpoint, config = export_compvis_checkpoint(a.model, a.output, config)
    except (NotImplementedError, ValueError, FileNotFoundError) as err:
        p.error(str(err))
    print(f"wrote {checkpoint} and {config}")


def _demo(argv):
    import torch

    p = argparse.ArgumentParser(
        prog="ldm-diffusers demo",
        description="Serve a Gradio web demo of a pipeline (pip install 'ldm-diffusers[demo]'): the inputs of its "
        "conditioning mode, sampler, steps, guidance, seed and number of images, and the `ldm-diffusers generate` "
        "command that reproduces each result.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=PREFIX + DEFAULT_MODEL,
                   help=f"LDMPipeline folder, Hub id, or a built-in model ({BUILTINS}).")
    p.add_argument("--port", type=int_type(1, 65535), default=7860, help="Port on 127.0.0.1 to serve it on.")
    p.add_argument("--share", action="store_true", help="Also serve it through a public gradio.live link.")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="Device to sample on.")
    p.add_argument("--push_space", metavar="SPACE_ID", default=None,
                   help="Serve nothing; push a Hugging Face Space (app.py, requirements.txt, README.md) that runs "
                        "this demo for --model, which must then be a Hub id or a built-in model.")
    a = p.parse_args(argv)
    check_model_path(p, "--model", a.model)
    if a.push_space is not None:
        from .hub import push_space

        try:
            info = push_space(a.push_space, a.model)
        except ValueError as err:
            p.error(str(err))
        print(f"pushed the demo Space for {a.model} -> {info.commit_url}")
        return
    from .demo.app import launch_demo

    launch_demo(a.model, a.device, a.port, a.share)


COMMANDS = {
    "build-emoji": (_build_emoji, "render the built-in emoji dataset"),
    "train-autoencoder": (_train_autoencoder, "train a KL/VQ stage-1 autoencoder"),
    "generate": (_generate, "sample images from a trained LDMPipeline"),
    "upscale": (_upscale, "super-resolution of an image of any size (tiled)"),
    "train": (_train, "train a latent diffusion model (any conditioning mode)"),
    "evaluate-autoencoder": (_evaluate_autoencoder, "PSNR / SSIM / rFID of a saved autoencoder"),
    "convert": (_convert, "convert a released CompVis checkpoint + config"),
    "export": (_export, "write a pipeline as a CompVis checkpoint + config"),
    "demo": (_demo, "a web demo of a pipeline in the browser (Gradio)"),
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
