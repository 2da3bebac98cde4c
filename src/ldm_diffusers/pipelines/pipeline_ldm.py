"""``LDMPipeline``: sampling from a Latent Diffusion Model, one ``__call__`` for every conditioning mode.

The algorithm, as the paper gives it:

1. encode the condition y with tau_theta into cross-attention tokens (and its "null" version for
   classifier-free guidance);
2. start from z_T ~ N(0, I) in the stage-1 latent space [B, c, H/f, W/f];
3. for each sampler step: eps = eps_theta(z_t, t, tau(y)), with guidance
   eps = eps(null) + s * (eps(y) - eps(null)) computed as one batch [null, y]; z_{t-1} = step(eps);
4. decode once: x = D(z_0 / scaling_factor).

Modes implemented so far: unconditional (no condition), ``class_labels`` and ``prompt``.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..conditioning.text import encode_prompts
from ..models.autoencoders import latent_scaling_factor

LIBRARY = "ldm_diffusers"


class LDMPipeline(DiffusionPipeline):
    """Components: ``vae`` (KL or VQ stage-1 model), ``unet`` (eps_theta), ``scheduler``, and the
    conditioning encoders the model uses: ``text_encoder`` + ``tokenizer`` for prompts,
    ``class_embedder`` for class labels (each optional)."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "class_embedder"]

    def __init__(self, vae, unet, scheduler, text_encoder=None, tokenizer=None, class_embedder=None):
        super().__init__()
        self.register_modules(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
            class_embedder=class_embedder,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def register_modules(self, **kwargs):
        # diffusers records a third-party component's library as its full module path
        # ("ldm_diffusers.models.unet"); record the package itself, which exports every class, so
        # that saved folders keep loading when a class moves between modules.
        super().register_modules(**kwargs)
        for name in kwargs:
            library, class_name = self.config.get(name, (None, None)) or (None, None)
            if isinstance(library, str) and library.startswith(LIBRARY + "."):
                self.register_to_config(**{name: (LIBRARY, class_name)})

    # -- the conditioning switch ---------------------------------------------------------------
    def _mode(self, prompt, class_labels) -> str:
        given = [name for name, value in (("prompt", prompt), ("class_labels", class_labels)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"Pass one conditioning input, got {' and '.join(given)}.")
        mode = given[0] if given else "unconditional"
        needs = {"prompt": ("text_encoder", "tokenizer"), "class_labels": ("class_embedder",)}.get(mode, ())
        missing = [c for c in needs if getattr(self, c, None) is None]
        if missing:
            raise ValueError(f"`{mode}` needs the pipeline component(s) {missing}, which this pipeline lacks.")
        if mode == "unconditional" and self._unet_cross_attends():
            known = [m for m, c in (("prompt", "text_encoder"), ("class_labels", "class_embedder")) if getattr(self, c, None) is not None]
            raise ValueError(f"This model is conditional: pass {' or '.join(known) or 'a condition'}.")
        return mode

    def _unet_cross_attends(self) -> bool:
        return any("CrossAttn" in t for t in self.unet.config.down_block_types)

    def encode_condition(self, mode, prompt=None, negative_prompt=None, class_labels=None, num_images_per_prompt=1):
        """(context, null_context, batch): tokens [B, n, d] for the UNet's cross-attention and their
        unconditional counterpart (None where the mode has none), repeated per image."""
        device = self._execution_device
        if mode == "prompt":
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if negative_prompt is None:
                negatives = [""] * len(prompts)
            else:
                negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(negatives) != len(prompts):
                    raise ValueError(
                        f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; pass one each."
                    )
            context = encode_prompts(self.tokenizer, self.text_encoder, prompts)
            null = encode_prompts(self.tokenizer, self.text_encoder, negatives)
        elif mode == "class_labels":
            labels = torch.as_tensor(class_labels, device=device).reshape(-1)
            context = self.class_embedder(labels)
            null = self.class_embedder.null(labels.shape[0])
        else:
            return None, None, 1
        context = context.repeat_interleave(num_images_per_prompt, dim=0)
        null = null.repeat_interleave(num_images_per_prompt, dim=0)
        return context, null, context.shape[0] // num_images_per_prompt

    # -- sampling -------------------------------------------------------------------------------
    def _check_size(self, height, width):
        f = self.vae_scale_factor
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

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """x = D(z / scaling_factor): images [B, 3, H, W] in about [-1, 1]. VQ models quantise in ``decode``."""
        return self.vae.decode(latents / latent_scaling_factor(self.vae)).sample

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        batch_size: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate images. The inputs choose the mode: nothing (unconditional; ``batch_size`` images),
        ``class_labels`` or ``prompt`` (+ ``negative_prompt``). ``guidance_scale`` > 1 turns on
        classifier-free guidance; ``output_type``: "pil", "np", "pt" or "latent"."""
        mode = self._mode(prompt, class_labels)
        height, width = self._check_size(height, width)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got '{output_type}'.")
        context, null, n_cond = self.encode_condition(mode, prompt, negative_prompt, class_labels, num_images_per_prompt)
        total = (n_cond if mode != "unconditional" else batch_size) * num_images_per_prompt
        guided = guidance_scale > 1.0 and null is not None
        if guided:
            context = torch.cat([null, context])

        f = self.vae_scale_factor
        shape = (total, self.unet.config.out_channels, height // f, width // f)
        latents = self.prepare_latents(shape, self.unet.dtype, generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        extra = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            extra["generator"] = generator

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input, t, encoder_hidden_states=context).sample
            if guided:
                eps_null, eps_cond = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
            latents = self.scheduler.step(eps, t, latents, **extra).prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = (outputs or {}).get("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode_latents(latents.to(self.vae.dtype))
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
