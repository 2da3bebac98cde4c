"""``LDMPipeline``: sampling from a Latent Diffusion Model, one ``__call__`` for every conditioning mode.

The algorithm, as the paper gives it:

1. encode the condition y with tau_theta into cross-attention tokens (and its "null" version for
   classifier-free guidance);
2. start from z_T ~ N(0, I) in the stage-1 latent space [B, c, H/f, W/f];
3. for each sampler step: eps = eps_theta(z_t, t, tau(y)), with guidance
   eps = eps(null) + s * (eps(y) - eps(null)) computed as one batch [null, y]; z_{t-1} = step(eps);
4. decode once: x = D(z_0 / scaling_factor).

The conditioning modes live in ``ldm_diffusers.conditioning`` (its registry); this file only asks them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo

from ..conditioning import UNCONDITIONAL, Conditioning, ConditioningMode, input_names, mode_named, mode_of, modes
from ..conditioning.base import is_int, is_real, shown
from ..models.autoencoders import latent_scaling_factor, load_autoencoder
from ..models.unet import unet_cross_attends
from ..pretrained import pretrained_components, pretrained_model_path
from ..utils.attention import require_xformers
from ..utils.hub_download import download_pipeline
from ..utils.model_files import check_not_being_written, missing_local_folder
from .diffusers_layouts import diffusers_ldm_components
from .fast_sampling import build_fast_sampling
from .model_card import pipeline_model_card
from .non_finite import NonFiniteWatch
from .tiling import TiledSamplingMixin

LIBRARY = "ldm_diffusers"
# Weights are loaded from safetensors only, so pickled files are never downloaded.
PICKLE_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.h5"]
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class LDMPipeline(TiledSamplingMixin, DiffusionPipeline):
    """Components: ``vae`` (KL or VQ stage-1 model), ``unet`` (eps_theta), ``scheduler``, and the
    conditioning encoders the model uses (each optional): ``text_encoder`` + ``tokenizer`` for prompts,
    ``class_embedder`` for class labels, ``layout_encoder`` for layouts, ``segmentation_encoder`` for
    segmentation maps where the model learned one (CompVis' SpatialRescaler). The other spatial conditions
    (super-resolution, inpainting) need no encoder of their own."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents"]
    _optional_components = ["text_encoder", "tokenizer", "class_embedder", "layout_encoder", "segmentation_encoder"]

    def __init__(
        self, vae, unet, scheduler, text_encoder=None, tokenizer=None, class_embedder=None, layout_encoder=None,
        segmentation_encoder=None, conditioning_mode: str | None = None,
    ):
        super().__init__()
        self.fast_sampling = None  # see enable_fast_sampling
        self.tiling = None  # see enable_tiled_sampling
        self.register_modules(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
            class_embedder=class_embedder, layout_encoder=layout_encoder, segmentation_encoder=segmentation_encoder,
        )
        if conditioning_mode is not None:
            mode_named(conditioning_mode)  # a registered mode, or a ValueError listing them
        # saved in model_index.json; None: recognised from the components (converted checkpoints, older folders)
        self.register_to_config(conditioning_mode=conditioning_mode)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load from a local folder, a Hub id, or a model that ships with the package
        (``"builtin:emoji-text-to-image"``).

        A Hub repository is downloaded first (safetensors and configs, no pickles) and then loaded as a
        local folder: stock ``DiffusionPipeline.from_pretrained`` refuses third-party components in Hub
        repositories unless ``trust_remote_code`` runs code from the repository, which this avoids.
        Folders in diffusers' own LDM layouts (``vqvae``/``bert``/``tokenizer``/``unet``/``scheduler``)
        load too, with their diffusers and transformers classes.

        Without ``dtype`` (or its older name ``torch_dtype``) every component loads in float32, whatever
        dtype its weights were saved in (diffusers models do this by themselves; transformers 5 would keep
        the saved dtype), so a folder saved in float16 samples on a CPU as it is; pass
        ``dtype=torch.float16`` to keep half precision.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
        if str(pretrained_model_name_or_path).startswith("builtin:"):
            pretrained_model_name_or_path = pretrained_model_path(str(pretrained_model_name_or_path))
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir() and missing_local_folder(str(pretrained_model_name_or_path)):
            raise FileNotFoundError(
                f"pretrained_model_name_or_path: no pipeline folder at '{pretrained_model_name_or_path}'"
                f"{' (it is a file)' if folder.is_file() else ''}. Pass a folder saved with save_pretrained "
                "(with model_index.json), a Hub id 'org/name', or 'builtin:emoji-text-to-image'."
            )
        if not folder.is_dir():
            hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
            folder = download_pipeline(str(pretrained_model_name_or_path), PICKLE_PATTERNS, **hub_kwargs)
        check_not_being_written(folder)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"No model_index.json in '{folder}': not a saved pipeline folder.")
        index = json.loads(index_file.read_text())
        if "vqvae" in index:
            return cls(**diffusers_ldm_components(folder, index, dtype, cls._optional_components, kwargs))
        for name, path in pretrained_components(folder).items():  # a built-in's shared autoencoder
            kwargs.setdefault(name, load_autoencoder(path, torch_dtype=dtype))
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(folder, dtype=dtype, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        model_card_text: str = "",
        datasets: list[str] | None = None,
        base_model: str | None = None,
    ):
        """Save the pipeline (safetensors) with its model card (:mod:`.model_card`) and upload it to ``repo_id``.
        ``model_card_text`` goes into the card; ``datasets`` and ``base_model`` (Hub ids) into its metadata. A Space
        that serves the web demo for it: ``ldm_diffusers.hub.push_space``. Returns huggingface_hub's ``CommitInfo``."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=True)
            pipeline_model_card(self, repo_id, model_card_text, datasets, base_model).save(os.path.join(tmp, "README.md"))
            info = self._upload_folder(
                tmp, repo_id, token=token, commit_message=commit_message or "Upload LDMPipeline", create_pr=create_pr
            )
        return info

    def register_modules(self, **kwargs):
        # diffusers records a third-party component's library as its full module path
        # ("ldm_diffusers.models.unet"); record the package itself, which exports every class, so
        # that saved folders keep loading when a class moves between modules.
        super().register_modules(**kwargs)
        for name in kwargs:
            library, class_name = self.config.get(name, (None, None)) or (None, None)
            if isinstance(library, str) and library.startswith(LIBRARY + "."):
                self.register_to_config(**{name: (LIBRARY, class_name)})

    # -- memory -------------------------------------------------------------------------------------
    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        """Use xformers' attention kernels where they run; otherwise raise and say why. PyTorch's
        ``scaled_dot_product_attention`` (diffusers' ``AttnProcessor2_0``) is the default and is already
        memory-efficient on GPUs, so there is nothing to lose by staying on it."""
        require_xformers(self._execution_device)
        super().enable_xformers_memory_efficient_attention(attention_op)

    # -- speed ----------------------------------------------------------------------------------------
    def enable_fast_sampling(self, compile_decoder: bool = True, backend: str = "inductor") -> None:
        """Compile eps_theta (and the decoder) once per shape. ``backend="inductor"``: ``torch.compile(fullgraph=True)``
        with the settings that pay on the pipeline's device (CPU: frozen weights + C++ wrapper; CUDA: + CUDA
        graphs); ``"openvino"`` (CPU, optional extra): OpenVINO graphs in float32; ``"auto"``: the fastest this
        machine has (``fast_sampling.backend`` and ``.reason`` tell which and why). See
        ``ldm_diffusers.pipelines.fast_sampling``. Outputs equal the eager pipeline's to float32 rounding. Compilation
        happens at the first call of each shape; ``fast_sampling.compile_seconds`` reports it."""
        self.fast_sampling = build_fast_sampling(self.unet, self.vae, self._execution_device, compile_decoder, backend)

    def disable_fast_sampling(self) -> None:
        """Back to the eager modules."""
        self.fast_sampling = None

    def enable_vae_slicing(self):
        """Decode the batch one image at a time (less memory for large batches)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        """Decode large images in overlapping tiles (KL autoencoders; diffusers' VQModel has no tiling)."""
        if not hasattr(self.vae, "tiled_decode"):
            raise NotImplementedError(f"{type(self.vae).__name__} does not support tiled decoding; use enable_vae_slicing.")
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.vae.disable_tiling()

    # -- the conditioning switch ---------------------------------------------------------------
    @property
    def mode(self) -> ConditioningMode:
        """The conditioning mode this pipeline was trained for (the one its config names, else recognised)."""
        return mode_of(self)

    def select_mode(self, values: dict) -> ConditioningMode:
        """The conditioning mode the call's inputs ask for (the unconditional mode when none), checked against
        the pipeline's components and the UNet."""
        chosen = [mode for mode in modes() if mode.is_selected(values)]
        if len(chosen) > 1:
            raise ValueError(f"Pass one conditioning input, got {' and '.join(m.inputs[0] for m in chosen)}.")
        mode = chosen[0] if chosen else UNCONDITIONAL
        if mode is UNCONDITIONAL:
            cross = unet_cross_attends(self.unet.config)
            concat = self.unet.config.in_channels != self.unet.config.out_channels
            if cross or concat:
                available = [
                    m.inputs[0] for m in modes()
                    if m.inputs and all(getattr(self, c, None) is not None for c in m.components)
                    and ((m.kind == "context" and cross) or (m.kind == "concat" and concat))
                ]
                raise ValueError(f"This model is conditional: pass {' or '.join(available) or 'a condition'}.")
            return mode
        missing = [c for c in mode.components if getattr(self, c, None) is None]
        if missing:
            raise ValueError(f"{mode.input_name} needs the pipeline component(s) {missing}, which this pipeline lacks.")
        return mode

    def _check_conditioning(self, mode, cond: Conditioning) -> None:
        concat = 0 if cond.concat is None else cond.concat.shape[1]
        expected = self.unet.config.in_channels - self.unet.config.out_channels
        if concat != expected:
            raise ValueError(
                f"{mode.input_name} gives {concat} channels to concatenate to z_t, but this UNet takes {expected}."
            )
        if (cond.context is not None) != unet_cross_attends(self.unet.config):
            raise ValueError(
                f"{mode.input_name} {'gives' if cond.context is not None else 'gives no'} cross-attention tokens, "
                f"but this UNet {'has no' if cond.context is not None else 'needs'} cross-attention."
            )

    def check_inputs(
        self, values: dict, height, width, num_inference_steps, guidance_scale, eta, generator, latents,
        num_images_per_prompt, batch_size, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs,
    ) -> None:
        """Refuse bad arguments before anything is encoded or sampled (as diffusers pipelines'
        ``check_inputs``), with a ``TypeError`` / ``ValueError`` that names the argument and what it accepts.
        The conditioning mode checks its own inputs (:meth:`ConditioningMode.check_inputs`); what depends on
        the batch (generator list, ``latents`` shape) is checked once the batch size is known."""
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value is None:
                continue
            if not is_int(value):
                raise TypeError(f"{name} must be an int (a multiple of the autoencoder's factor f={f}) or None, "
                                f"got {shown(value)}.")
            if value < f:
                raise ValueError(f"{name} must be a positive multiple of the autoencoder's factor f={f}, got {value}.")
        steps_limit = self.max_inference_steps()
        if not is_int(num_inference_steps):
            raise TypeError(f"num_inference_steps must be an int in 1..{steps_limit}, got {shown(num_inference_steps)}.")
        if not 1 <= num_inference_steps <= steps_limit:
            raise ValueError(f"num_inference_steps must lie in 1..{steps_limit} (this {type(self.scheduler).__name__} "
                             f"has {self.scheduler.config.num_train_timesteps} training timesteps), "
                             f"got {num_inference_steps}.")
        for name, value, meaning in (
            ("guidance_scale", guidance_scale, "1 = no guidance, > 1 = classifier-free guidance"),
            ("eta", eta, "DDIM's noise: 0 = deterministic, 1 = DDPM-like"),
        ):
            if not is_real(value):
                raise TypeError(f"{name} must be a float >= 0 ({meaning}), got {shown(value)}.")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 ({meaning}), got {value}.")
        for name, value in (("num_images_per_prompt", num_images_per_prompt), ("batch_size", batch_size)):
            if not is_int(value):
                raise TypeError(f"{name} must be a positive int, got {shown(value)}.")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value}.")
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {shown(output_type)}.")
        generators = generator if isinstance(generator, (list, tuple)) else [generator]
        if generator is not None and (not generators or not all(isinstance(g, torch.Generator) for g in generators)):
            raise TypeError(f"generator must be a torch.Generator, a list of them (one per image) or None, "
                            f"got {shown(generator)}.")
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"latents must be a torch.Tensor [batch, channels, height/f, width/f] or None, "
                                f"got {shown(latents)}.")
            if not torch.isfinite(latents).all():
                raise ValueError(f"latents contain {'NaN' if torch.isnan(latents).any() else 'inf'} values; pass finite "
                                 "starting noise (or latents=None to draw it from generator).")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable (pipe, step, timestep, tensors) -> dict | None, "
                            f"got {shown(callback_on_step_end)}.")
        names = callback_on_step_end_tensor_inputs
        if not isinstance(names, (list, tuple)) or any(k not in self._callback_tensor_inputs for k in names):
            raise ValueError(f"callback_on_step_end_tensor_inputs must list names from {self._callback_tensor_inputs}, "
                             f"got {shown(callback_on_step_end_tensor_inputs)}.")
        if values.get("negative_prompt") is not None and values.get("prompt") is None:
            raise ValueError("negative_prompt was given without prompt: it is the text-to-image mode's unconditional "
                             "input; pass prompt too (or drop negative_prompt).")

    def max_inference_steps(self) -> int:
        """The most sampler steps this scheduler takes: its training timesteps, less one where it offsets the
        timesteps (DDIM, PLMS index past the table at 1000 of 1000) or ends on t = 0 (DPM-Solver++ gives NaN)."""
        total = self.scheduler.config.num_train_timesteps
        return total if type(self.scheduler).__name__ == "DDPMScheduler" else total - 1

    @staticmethod
    def _check_batch(total: int, generator) -> None:
        """A generator list needs one generator per image (``latents`` is checked in :meth:`prepare_latents`)."""
        if isinstance(generator, (list, tuple)) and len(generator) != total:
            raise ValueError(f"generator is a list of {len(generator)} generators, but the call makes {total} images "
                             "(batch x num_images_per_prompt); pass one generator per image, or a single one.")

    @staticmethod
    def _check_finite_conditioning(mode, cond: Conditioning, null: Conditioning | None) -> None:
        """The encoded condition (and its null version) must be finite: a NaN here would turn every latent NaN."""
        for which, c in (("", cond), ("the null (unconditional) version of ", null)):
            for part, tensor in (("cross-attention tokens", None if c is None else c.context),
                                 ("concatenated channels", None if c is None else c.concat)):
                if tensor is not None and not torch.isfinite(tensor).all():
                    bad = "NaN" if torch.isnan(tensor).any() else "inf"
                    raise ValueError(
                        f"{which}the encoded {mode.input_name} ({part}) contains {bad}: check the input's values and "
                        f"the weights of {', '.join(mode.components) or 'the autoencoder'}; sampling was not started."
                    )

    # -- sampling -------------------------------------------------------------------------------
    def _eps(self, model_input: torch.Tensor, t, context: torch.Tensor | None) -> torch.Tensor:
        fast = self.fast_sampling
        unet = self.unet if fast is None else fast.unet
        if isinstance(self.unet, UNet2DModel):  # diffusers' unconditional LDM UNet takes no context argument
            return self._timed("unet", model_input, unet, model_input, t).sample
        return self._timed("unet", model_input, unet, model_input, t, encoder_hidden_states=context).sample

    def _timed(self, name: str, tensor: torch.Tensor, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; with fast sampling the first call of each input shape is timed as compilation."""
        fast = self.fast_sampling
        if fast is None:
            return fn(*args, **kwargs)
        return fast.timed(name, tuple(tensor.shape), fn, *args, **kwargs)

    def _check_size(self, height, width, fixed=None):
        f = self.vae_scale_factor
        if fixed is not None:
            if (height or fixed[0], width or fixed[1]) != tuple(fixed):
                raise ValueError(f"The conditioning input fixes the output size to {fixed[0]}x{fixed[1]}; "
                                 f"got height={height}, width={width}.")
            height, width = fixed
        default = (self.unet.config.sample_size or 32) * f
        height, width = height or default, width or default
        if height % f or width % f:
            raise ValueError(f"height and width must be divisible by the autoencoder's factor f={f}; got {height}x{width}.")
        return height, width

    def prepare_latents(self, shape, dtype, generator, latents):
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        elif tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}.")
        return latents.to(self._execution_device, dtype) * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor, tiling=None) -> torch.Tensor:
        """x = D(z / scaling_factor): images [B, 3, H, W] in about [-1, 1]. VQ models quantise in ``decode``;
        with ``tiling`` the latent is decoded window by window (see ``enable_tiled_sampling``)."""
        fast = self.fast_sampling
        decode = self.vae.decode if fast is None else fast.decode

        def decoded(z, _origins):
            return self._timed("decode", z, decode, z / latent_scaling_factor(self.vae)).sample

        return self.tiled(decoded, latents, tiling, self.vae_scale_factor)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        layout: list | None = None,
        image=None,
        mask_image=None,
        segmentation_map=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        tile_size: int | None = None,
        tile_stride: int | None = None,
        **mode_inputs,
    ):
        """Generate images. The inputs choose the mode: nothing (unconditional; ``batch_size`` images),
        ``prompt`` (+ ``negative_prompt``), ``class_labels``, ``layout`` (list of (class, (x0, y0, x1, y1))),
        ``image`` (super-resolution), ``image`` + ``mask_image`` (inpainting), ``segmentation_map``, or the inputs of
        a mode registered with ``ldm_diffusers.register_mode`` (``mode_inputs``). ``guidance_scale`` > 1 turns on
        classifier-free guidance; ``eta``: DDIM's noise (default: the mode's, 1 for super-resolution, else 0);
        ``output_type``: pil, np, pt or latent; ``tile_size`` / ``tile_stride`` (pixels): see enable_tiled_sampling."""
        unknown = sorted(set(mode_inputs) - set(input_names()))
        if unknown:
            raise TypeError(f"LDMPipeline.__call__() got unexpected keyword argument(s) {unknown}; the conditioning "
                            f"modes read {', '.join(input_names())}.")
        values = {
            "prompt": prompt, "negative_prompt": negative_prompt, "class_labels": class_labels, "layout": layout,
            "image": image, "mask_image": mask_image, "segmentation_map": segmentation_map, **mode_inputs,
        }
        self.check_inputs(values, height, width, num_inference_steps, guidance_scale, 0.0 if eta is None else eta,
                          generator, latents, num_images_per_prompt, batch_size, output_type, callback_on_step_end,
                          callback_on_step_end_tensor_inputs)
        mode = self.select_mode(values)
        eta = mode.default_eta if eta is None else eta
        mode.check_inputs(self, values)
        f = self.vae_scale_factor
        if latents is not None and latents.ndim == 4 and height is None and width is None:
            height, width = latents.shape[-2] * f, latents.shape[-1] * f  # the size of the given starting noise
        height, width = self._check_size(height, width, mode.output_size(self, values))
        # unconditional: as many images as starting latents were given (unless batch_size says otherwise)
        values["batch_size"] = latents.shape[0] // num_images_per_prompt if latents is not None and batch_size == 1 else batch_size
        tiling = self.call_tiling(tile_size, tile_stride)
        cond, null = mode.encode(self, values, (height // f, width // f))
        self._check_conditioning(mode, cond)
        self._check_finite_conditioning(mode, cond, null if guidance_scale > 1.0 else None)
        n = mode.batch_size(values)
        guided = guidance_scale > 1.0
        if guided and null is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional input, which {mode.input_name} "
                             "does not have; use guidance_scale=1.")
        total = n * num_images_per_prompt
        self._check_batch(total, generator)
        cond = cond.repeat_interleave(num_images_per_prompt)
        if guided:
            cond = Conditioning.cat([null.repeat_interleave(num_images_per_prompt), cond])

        shape = (total, self.unet.config.out_channels, height // f, width // f)
        latents = self.denoise(cond, guidance_scale if guided else None, shape, num_inference_steps, eta, generator,
                               latents, callback_on_step_end, callback_on_step_end_tensor_inputs, tiling,
                               self.window_contexts(mode, cond, tiling, shape[-2:]))
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents.to(self.vae.dtype), tiling)
            images = self.image_processor.postprocess(mode.finish(self, values, decoded), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def denoise(self, cond: Conditioning, guidance_scale: float | None, shape: tuple, num_inference_steps: int,
                eta: float, generator, latents, callback_on_step_end=None, callback_on_step_end_tensor_inputs=(),
                tiling=None, window_contexts=None):
        """The sampler's loop from z_T ([B, c, h, w] ``shape``, or the given ``latents``) to z_0: eps_theta on
        ``cond`` (its batch is [null, cond] when ``guidance_scale`` is set; over ``tiling``'s windows when given,
        with ``window_contexts(origins)`` where the tokens depend on the window), guided, one scheduler step each."""
        # timesteps stay on the CPU, where the schedulers' tables (alphas_cumprod, sigmas) live: on a GPU,
        # device timesteps make every step() index a CPU table with a GPU scalar, a synchronising copy
        # (measured on an H100: 1.28x the stock pipeline's time per image with DPM++, 1.01x without;
        # benchmarks/results/stage2_h100/). They are set before the starting noise is scaled: LMS / Euler's
        # init_noise_sigma depends on the first sampled timestep.
        self.scheduler.set_timesteps(num_inference_steps)
        latents = self.prepare_latents(shape, self.unet.dtype, generator, latents)
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra["generator"] = generator
        watch = NonFiniteWatch(self.scheduler.timesteps, deferred=latents.device.type != "cpu")
        guided = guidance_scale is not None
        # compiled CUDA graphs take device inputs only: the UNet's timesteps are copied to the device once
        fast_on_device = self.fast_sampling is not None and latents.device.type != "cpu"
        unet_timesteps = self.scheduler.timesteps.to(latents.device) if fast_on_device else self.scheduler.timesteps
        # in the UNet's dtype once (e.g. a half-precision text encoder in front of a float32 UNet), not every step
        context = None if cond.context is None else cond.context.to(latents.dtype)

        def eps_of(x, t, origins):
            if origins is None or context is None:
                return self._eps(x, t, context)
            windows = context.repeat(len(origins), 1, 1) if window_contexts is None else window_contexts(origins)
            return self._eps(x, t, windows.to(latents.dtype))

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            eps = self.tiled(lambda x, places: eps_of(x, unet_timesteps[i], places), cond.model_input(model_input), tiling)  # noqa: B023
            if guided:
                eps_null, eps_cond = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
            latents = self.scheduler.step(eps, t, latents, **extra).prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = (outputs or {}).get("latents", latents)
            watch.check(latents, i)  # a NaN/inf in z_t is reported with the step where it appeared
        watch.finish()
        return latents
