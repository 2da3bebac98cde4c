"""Tiny random models and pipelines (32x32 images, f = 4) for every mode, and images to feed them."""

import numpy as np
import torch
from PIL import Image

from ldm_diffusers import ClassEmbedder, LayoutEncoder, LDMPipeline, LDMUNet2DConditionModel, ldm_scheduler
from ldm_diffusers.conditioning import bert_tokenizer, build_text_transformer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    """The two modules hold the same parameter and buffer names with bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        assert torch.equal(value, sb[name]), name


def tiny_kl(f: int = 4, **kwargs):
    from ldm_diffusers import LDMAutoencoderKL

    return LDMAutoencoderKL.from_downsampling_factor(
        f, base_channels=8, channel_multipliers=[1] * (f.bit_length()), layers_per_block=1, norm_num_groups=4,
        sample_size=32, **kwargs,
    )


def tiny_vq(f: int = 4, **kwargs):
    from ldm_diffusers import LDMVQModel

    kwargs.setdefault("num_vq_embeddings", 32)
    kwargs.setdefault("vq_embed_dim", 4)
    return LDMVQModel.from_downsampling_factor(
        f, base_channels=8, channel_multipliers=[1] * (f.bit_length()), layers_per_block=1, norm_num_groups=4,
        sample_size=32, **kwargs,
    )


def tiny_unet(context_dim=16, concat_channels=0, latent_channels=3):
    return LDMUNet2DConditionModel.from_ldm_config(
        latent_channels=latent_channels, concat_channels=concat_channels, context_dim=context_dim, base_channels=16,
        channel_multipliers=(1, 2), attention_head_dim=8, layers_per_block=1, norm_num_groups=8, sample_size=8,
    )


def make_pipe(mode="class", vae="kl", sampler="ddim"):
    torch.manual_seed(0)
    ae = tiny_kl(4, latent_channels=3) if vae == "kl" else tiny_vq(4, latent_channels=3, vq_embed_dim=3)
    ae.register_to_config(scaling_factor=0.8)
    kwargs = {}
    if mode == "class":
        kwargs["class_embedder"] = ClassEmbedder(num_classes=5, context_dim=16)
    elif mode == "prompt":
        kwargs["tokenizer"] = bert_tokenizer()
        kwargs["text_encoder"] = build_text_transformer(kwargs["tokenizer"].vocab_size, 16, depth=1, num_heads=2)
    unet = tiny_unet(context_dim=None if mode == "unconditional" else 16)
    preset = {"prompt": "text"}.get(mode, mode)
    pipe = LDMPipeline(vae=ae, unet=unet, scheduler=ldm_scheduler(sampler, preset), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def concat_pipe(concat_channels, vae="kl"):
    torch.manual_seed(0)
    ae = tiny_kl(4, latent_channels=3) if vae == "kl" else tiny_vq(4, latent_channels=3, vq_embed_dim=3)
    pipe = LDMPipeline(vae=ae, unet=tiny_unet(context_dim=None, concat_channels=concat_channels),
                       scheduler=ldm_scheduler("ddim", "unconditional"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo_pipe(mode: str) -> LDMPipeline:
    """A tiny random pipeline of ``mode`` (32x32 images; layouts and classes: 5 classes, segmentation: 6)."""
    if mode in ("text", "class", "unconditional"):
        return make_pipe({"text": "prompt"}.get(mode, mode))
    if mode == "layout":
        torch.manual_seed(0)
        pipe = LDMPipeline(vae=tiny_kl(4, latent_channels=3), unet=tiny_unet(context_dim=16),
                           scheduler=ldm_scheduler("ddim", "class"),
                           layout_encoder=LayoutEncoder(num_classes=5, context_dim=16, max_objects=4, depth=1,
                                                        num_heads=2))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return concat_pipe({"super_resolution": 3, "inpainting": 4, "segmentation": 6}[mode])


def painted(size: int, box: tuple[int, int, int, int], color=(255, 0, 255)) -> Image.Image:
    """A transparent RGBA layer of ``size`` x ``size`` with ``box`` painted in ``color`` (an image editor layer)."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    layer.paste((*color, 255), box)
    return layer


def gradient(width: int, height: int) -> Image.Image:
    """An RGB test image with distinct pixels."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))
