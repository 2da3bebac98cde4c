"""diffusers' own LDM repositories load into ``LDMPipeline`` and sample as diffusers' pipelines do (issue 13, item 6).

The three layouts on the Hub, rebuilt as tiny random folders with diffusers' own pipeline classes and
``save_pretrained`` (the Hub is not reachable from the tests):

* ``CompVis/ldm-text2im-large-256``: ``LDMTextToImagePipeline`` (vqvae = AutoencoderKL, bert = LDMBertModel,
  tokenizer = BertTokenizer, unet = UNet2DConditionModel, scheduler = DDIMScheduler);
* ``CompVis/ldm-celebahq-256``: diffusers' unconditional ``LDMPipeline`` (vqvae = VQModel, unet = UNet2DModel,
  scheduler = DDIMScheduler);
* ``CompVis/ldm-super-resolution-4x-openimages``: ``LDMSuperResolutionPipeline`` (vqvae = VQModel, unet =
  UNet2DModel with 6 input channels, scheduler = DDIMScheduler).

Each case runs diffusers' pipeline and ours on the same inputs (the same starting noise or generator, eta, guidance
scale, low-resolution image) and compares ``output_type="np"`` images. Both run the same float32 operations in the
same order, so the images are compared for exact equality, except where a case says why not.

DDIM with eta > 0: diffusers' pipelines do not pass their generator to ``scheduler.step``, so its noise comes from
the global torch generator; ours passes the call's generator. :func:`_global_rng_continues` puts the global
generator where the call's generator stands after drawing the starting noise, so that both draw the same noise.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_diffusers import LDMPipeline
from ldm_diffusers.conditioning.text import bert_tokenizer

STEPS = 3
PROMPTS = ["an emoji of a cat", "a red heart"]


def _ddim():
    from diffusers import DDIMScheduler

    # the LDM schedule, as the Hub repositories' scheduler configs
    return DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False)


def _eval(*modules):
    for module in modules:
        module.eval()  # freshly built models are in training mode (LDMBert has dropout)


def _save(stock, folder):
    """Save diffusers' pipeline in its layout and load it back with its own class, as a user of the Hub repository
    would: both pipelines then hold weights loaded the same way. (The CPU's matrix-vector kernels round differently
    for differently aligned weights: a freshly built model against the same weights loaded from safetensors differs
    by ~1e-6 with a batch of one, which is no difference of the pipelines.)"""
    stock.save_pretrained(folder, safe_serialization=True)
    stock = type(stock).from_pretrained(folder, use_safetensors=True)
    stock.set_progress_bar_config(disable=True)
    return stock, json.loads((folder / "model_index.json").read_text())


def _load(folder) -> LDMPipeline:
    pipe = LDMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _global_rng_continues(seed: int, shape) -> None:
    """Set the global generator to the state of ``Generator().manual_seed(seed)`` after it drew the starting noise
    ``shape`` (as both pipelines draw it: ``randn_tensor`` on the CPU)."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(seed)
    randn_tensor(shape, generator=generator)
    torch.set_rng_state(generator.get_state())


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# -- CompVis/ldm-text2im-large-256 ----------------------------------------------------------------------------
def _text2im(folder, scaling_factor=None):
    from diffusers import AutoencoderKL, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion import LDMBertModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

    torch.manual_seed(0)
    # f = 8, as the Hub model: diffusers' LDMTextToImagePipeline hard-codes latents of height // 8
    extra = {} if scaling_factor is None else {"scaling_factor": scaling_factor}
    vqvae = AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                          sample_size=64, **extra)
    bert = LDMBertModel(LDMBertConfig(vocab_size=30522, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                      head_dim=16, encoder_ffn_dim=64, max_position_embeddings=77))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8)
    _eval(vqvae, bert, unet)
    stock = LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=bert_tokenizer(), unet=unet, scheduler=_ddim())
    return _save(stock, folder)


@pytest.fixture(scope="module")
def text2im(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ldm-text2im-large-256")
    stock, index = _text2im(folder)
    return stock, index, _load(folder)


def test_text_to_image_layout_loads_with_diffusers_and_transformers_classes(text2im):
    _, index, pipe = text2im
    assert index["_class_name"] == "LDMTextToImagePipeline"
    assert {k: tuple(v) for k, v in index.items() if not k.startswith("_")} == {
        "vqvae": ("diffusers", "AutoencoderKL"), "bert": ("latent_diffusion", "LDMBertModel"),
        "tokenizer": ("transformers", "BertTokenizer"), "unet": ("diffusers", "UNet2DConditionModel"),
        "scheduler": ("diffusers", "DDIMScheduler"),
    }
    names = {k: type(getattr(pipe, k)).__name__ for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    assert names == {"vae": "AutoencoderKL", "text_encoder": "LDMBertModel", "tokenizer": "BertTokenizer",
                     "unet": "UNet2DConditionModel", "scheduler": "DDIMScheduler"}
    assert pipe.vae_scale_factor == 8


# Both guide with the empty prompt "" (padded to 77 tokens) as the null input, as one batch [null, prompt], with
# eps_null + s * (eps_prompt - eps_null). diffusers decodes ``1 / scaling_factor * latents``, ours
# ``latents / scaling_factor``: with the KL default 0.18215 the two round differently in the last bit of some
# latents, which the decoder carries to differences below 1e-6 in [0, 1] images (7e-7 measured). atol 1e-5 leaves
# room for other CPUs' kernels and stays far below any real difference (a changed guidance or noise shows at 1e-3
# and up). Everything before the decode is the same ops in the same order: the final latents are compared exactly,
# as are the images of a model whose scaling factor is a power of two (both roundings then exact).
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_text_to_image_samples_as_ldm_text_to_image_pipeline(text2im, guidance_scale):
    stock, _, pipe = text2im
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(latents=latents, guidance_scale=guidance_scale, num_inference_steps=STEPS)
    theirs = stock(prompt=PROMPTS, output_type="np", **kwargs).images
    ours = pipe(prompt=PROMPTS, output_type="np", **kwargs).images
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)

    # the final latents, exactly: diffusers' pipeline has no "latent" output, so catch its last scheduler step
    caught = []
    step = stock.scheduler.step
    stock.scheduler.step = lambda *a, **k: (caught.append(out := step(*a, **k)), out)[1]
    try:
        stock(prompt=PROMPTS, output_type="np", **kwargs)
    finally:
        del stock.scheduler.step
    ours_latents = pipe(prompt=PROMPTS, output_type="latent", **kwargs).images
    assert len(caught) == STEPS
    torch.testing.assert_close(ours_latents, caught[-1].prev_sample, rtol=0, atol=0)


def test_text_to_image_with_generator_and_eta(text2im):
    """The starting noise from a generator, DDIM noise with eta = 0.5 (see the module docstring)."""
    stock, _, pipe = text2im
    kwargs = dict(guidance_scale=2.0, eta=0.5, num_inference_steps=STEPS, output_type="np")
    _global_rng_continues(5, (2, 4, 8, 8))
    theirs = stock(prompt=PROMPTS, generator=torch.Generator().manual_seed(5), **kwargs).images
    ours = pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(5), **kwargs).images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # decode rounding, as above


def test_text_to_image_exact_with_power_of_two_scaling_factor(tmp_path):
    stock, _ = _text2im(tmp_path, scaling_factor=0.5)
    pipe = _load(tmp_path)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    kwargs = dict(latents=latents, guidance_scale=4.0, num_inference_steps=STEPS, output_type="np")
    np.testing.assert_array_equal(pipe(prompt=PROMPTS[0], **kwargs).images, stock(prompt=PROMPTS[0], **kwargs).images)


def test_text_to_image_guidance_below_one(text2im):
    """A documented difference: diffusers' LDMTextToImagePipeline guides whenever guidance_scale != 1 (0.5 moves
    towards the empty prompt); LDMPipeline guides only above 1, as CompVis' samplers (scale 1 = no guidance), so a
    scale in [0, 1] samples the conditional model alone."""
    stock, _, pipe = text2im
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(latents=latents, num_inference_steps=STEPS, output_type="np")
    ours = pipe(prompt=PROMPTS[0], guidance_scale=0.5, **kwargs).images
    np.testing.assert_array_equal(ours, pipe(prompt=PROMPTS[0], guidance_scale=1.0, **kwargs).images)
    assert _max_diff(ours, stock(prompt=PROMPTS[0], guidance_scale=0.5, **kwargs).images) > 1e-3


# -- CompVis/ldm-celebahq-256 ---------------------------------------------------------------------------------
def _vq_and_unet(in_channels: int):
    """A VQ-f4 autoencoder with 3 latent channels and a UNet2DModel taking ``in_channels`` (seed 0, eval mode)."""
    from diffusers import UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(block_out_channels=(32,) * 3, down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=3, num_vq_embeddings=16,
                    norm_num_groups=32, sample_size=32)
    unet = UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=32, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    _eval(vqvae, unet)
    return vqvae, unet


def _uncond(folder):
    from diffusers import LDMPipeline as StockLDMPipeline

    # f = 4 with 3 latent channels, as the Hub model (scaling_factor: VQModel's default, written by save_pretrained)
    vqvae, unet = _vq_and_unet(in_channels=3)
    stock = StockLDMPipeline(vqvae=vqvae, unet=unet, scheduler=_ddim())
    return _save(stock, folder)


@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ldm-celebahq-256")
    stock, index = _uncond(folder)
    return stock, index, _load(folder), folder


def test_unconditional_layout_loads(uncond):
    _, index, pipe, _ = uncond
    assert index["_class_name"] == "LDMPipeline"
    assert {k: tuple(v) for k, v in index.items() if not k.startswith("_")} == {
        "vqvae": ("diffusers", "VQModel"), "unet": ("diffusers", "UNet2DModel"), "scheduler": ("diffusers", "DDIMScheduler"),
    }
    assert type(pipe.vae).__name__ == "VQModel" and type(pipe.unet).__name__ == "UNet2DModel"
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.vae_scale_factor == 4


@pytest.mark.parametrize("batch_size, eta, generators", [(1, 0.0, False), (2, 0.0, True), (2, 1.0, False)])
def test_unconditional_samples_as_diffusers_ldm_pipeline(uncond, batch_size, eta, generators):
    """Same ops in the same order (including latents / scaling_factor before the decode): exactly equal images."""
    stock, _, pipe, _ = uncond

    def generator():
        if generators:  # one generator per image
            return [torch.Generator().manual_seed(10 + i) for i in range(batch_size)]
        return torch.Generator().manual_seed(7)

    kwargs = dict(batch_size=batch_size, eta=eta, num_inference_steps=STEPS, output_type="np")
    if eta:
        _global_rng_continues(7, (batch_size, 3, 8, 8))
    theirs = stock(generator=generator(), **kwargs).images
    ours = pipe(generator=generator(), **kwargs).images
    assert ours.shape == theirs.shape == (batch_size, 32, 32, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_unconditional_hub_config_without_scaling_factor(uncond, tmp_path):
    """A deliberate difference. The Hub's ``CompVis/ldm-celebahq-256/vqvae/config.json`` predates VQModel's
    ``scaling_factor`` (CompVis' VQ LDMs use no latent scale), so diffusers falls back to its default 0.18215 and its
    unconditional pipeline divides the latents by it before decoding (huggingface/diffusers#6725: "weird images",
    fixed by removing that division). Ours reads an unset VQ scaling factor as 1.0
    (``ldm_diffusers.models.autoencoders.latent_scaling_factor``): it samples as diffusers' pipeline would with
    ``scaling_factor=1.0``, not as its buggy default."""
    from diffusers import LDMPipeline as StockLDMPipeline

    _, _, _, folder = uncond
    shutil.copytree(folder, tmp_path / "hub", dirs_exist_ok=True)
    config_file = tmp_path / "hub" / "vqvae" / "config.json"
    config = json.loads(config_file.read_text())
    del config["scaling_factor"]
    config_file.write_text(json.dumps(config))
    pipe = _load(tmp_path / "hub")
    stock = StockLDMPipeline.from_pretrained(tmp_path / "hub", use_safetensors=True)
    stock.set_progress_bar_config(disable=True)
    assert stock.vqvae.config.scaling_factor == 0.18215

    def sample(pipeline, vae):
        """The images, and the latents the pipeline hands its VQ decoder."""
        decoded, decode = [], vae.decode
        vae.decode = lambda z, *a, **k: (decoded.append(z), decode(z, *a, **k))[1]
        try:
            images = pipeline(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(8),
                              output_type="np").images
        finally:
            del vae.decode
        return images, decoded[0]

    ours, ours_z = sample(pipe, pipe.vae)
    buggy, buggy_z = sample(stock, stock.vqvae)
    stock.vqvae.register_to_config(scaling_factor=1.0)
    fixed, fixed_z = sample(stock, stock.vqvae)
    np.testing.assert_array_equal(ours, fixed)
    torch.testing.assert_close(ours_z, fixed_z, rtol=0, atol=0)
    torch.testing.assert_close(buggy_z, fixed_z / 0.18215, rtol=0, atol=0)  # diffusers: 5.5 times too large
    assert not np.array_equal(ours, buggy)


# -- CompVis/ldm-super-resolution-4x-openimages -----------------------------------------------------------------
def _super_resolution(folder):
    from diffusers import LDMSuperResolutionPipeline

    # f = 4, 3 latent channels; the UNet takes z_t and the low-resolution image: 6 channels
    vqvae, unet = _vq_and_unet(in_channels=6)
    stock = LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=_ddim())
    return _save(stock, folder)


@pytest.fixture(scope="module")
def super_resolution(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ldm-super-resolution-4x-openimages")
    stock, index = _super_resolution(folder)
    return stock, index, _load(folder)


def _low_res(size=(32, 32), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_super_resolution_layout_loads(super_resolution):
    _, index, pipe = super_resolution
    assert index["_class_name"] == "LDMSuperResolutionPipeline"
    assert {k: tuple(v) for k, v in index.items() if not k.startswith("_")} == {
        "vqvae": ("diffusers", "VQModel"), "unet": ("diffusers", "UNet2DModel"), "scheduler": ("diffusers", "DDIMScheduler"),
    }
    assert pipe.unet.config.in_channels == 6 and pipe.vae_scale_factor == 4
    # diffusers' super-resolution pipeline decodes the latents as they are, whatever the saved scaling factor
    assert pipe.vae.config.scaling_factor == 1.0


@pytest.mark.parametrize("image_kind, eta", [("pil", 0.0), ("pil", 1.0), ("tensor", 0.0), ("tensor", 0.5)])
def test_super_resolution_samples_as_ldm_super_resolution_pipeline(super_resolution, image_kind, eta):
    """The low-resolution image concatenated to z_t at the latent size, decoded without a latent scale, f = 4 times
    larger; a PIL image (diffusers: /255, then 2x - 1; ours: VaeImageProcessor, the same float32 ops) or a [-1, 1]
    tensor batch taken as it is. Same ops in the same order: exactly equal images."""
    stock, _, pipe = super_resolution
    if image_kind == "pil":
        image, batch = _low_res(), 1
    else:
        image, batch = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1, 2
    size = (32, 32) if image_kind == "pil" else (16, 24)
    if eta:
        _global_rng_continues(9, (batch, 3, *size))
    kwargs = dict(image=image, eta=eta, num_inference_steps=STEPS, output_type="np")
    theirs = stock(generator=torch.Generator().manual_seed(9), **kwargs).images
    ours = pipe(generator=torch.Generator().manual_seed(9), **kwargs).images
    assert ours.shape == theirs.shape == (batch, 4 * size[0], 4 * size[1], 3)
    np.testing.assert_array_equal(ours, theirs)


def test_super_resolution_pil_image_not_a_multiple_of_32(super_resolution):
    """A documented difference: LDMSuperResolutionPipeline's preprocess() squashes a PIL image whose sides are not
    multiples of 32 down to them (Lanczos: 40x48 -> 32x32, output 128x128); LDMPipeline upsamples the image at its
    own size (output 160x192)."""
    stock, _, pipe = super_resolution
    low = _low_res((48, 40))
    kwargs = dict(image=low, num_inference_steps=STEPS, output_type="np")
    theirs = stock(generator=torch.Generator().manual_seed(9), **kwargs).images
    ours = pipe(generator=torch.Generator().manual_seed(9), **kwargs).images
    assert theirs.shape[1:3] == (128, 128) and ours.shape[1:3] == (4 * low.height, 4 * low.width)


def _lms_pair(super_resolution):
    """diffusers' super-resolution pipeline and ours, both with LMSDiscreteScheduler (which LDMSuperResolutionPipeline
    accepts; the Hub repositories use DDIM)."""
    from diffusers import LMSDiscreteScheduler

    stock, _, pipe = super_resolution
    stock = type(stock)(vqvae=stock.vqvae, unet=stock.unet,
                        scheduler=LMSDiscreteScheduler.from_config(stock.scheduler.config))
    pipe = LDMPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=LMSDiscreteScheduler.from_config(pipe.scheduler.config))
    for pipeline in (stock, pipe):
        pipeline.set_progress_bar_config(disable=True)
    return stock, pipe


def _scale_z_t_only(stock):
    """diffusers' pipeline with ``scale_model_input`` applied to z_t's channels only (see below)."""
    scale = stock.scheduler.scale_model_input
    stock.scheduler.scale_model_input = lambda sample, t: torch.cat([scale(sample[:, :3], t), sample[:, 3:]], dim=1)


def test_super_resolution_lms_scales_only_z_t(super_resolution):
    """A documented difference with sigma-based schedulers (LMS, Euler). diffusers' pipeline applies
    ``scale_model_input`` (1 / sqrt(sigma^2 + 1)) to the concatenation [z_t, low-res image], shrinking the
    low-resolution image too; ours scales z_t only and concatenates the image as it is, as CompVis and k-diffusion
    do (c_in scales x, not the concatenated condition). With DDIM (the Hub's scheduler) scale_model_input is the
    identity and the two agree exactly (above). Ours
    equals diffusers' pipeline with its scaling restricted to z_t's channels, exactly."""
    stock, pipe = _lms_pair(super_resolution)
    kwargs = dict(image=_low_res(), num_inference_steps=STEPS, output_type="np")
    ours = pipe(generator=torch.Generator().manual_seed(9), **kwargs).images
    theirs = stock(generator=torch.Generator().manual_seed(9), **kwargs).images
    assert _max_diff(ours, theirs) > 1e-3
    _scale_z_t_only(stock)
    np.testing.assert_array_equal(ours, stock(generator=torch.Generator().manual_seed(9), **kwargs).images)


def test_super_resolution_lms_starting_noise_scale(super_resolution):
    """LMS / Euler: the starting noise is scaled by the first sampled timestep's sigma (timesteps set first), as in
    diffusers' pipelines (it was the training schedule's largest sigma: 83.8 instead of 6.55 with 3 steps)."""
    stock, pipe = _lms_pair(super_resolution)
    _scale_z_t_only(stock)  # the documented difference above, taken out
    kwargs = dict(image=_low_res(), num_inference_steps=STEPS, output_type="np")
    np.testing.assert_array_equal(pipe(generator=torch.Generator().manual_seed(9), **kwargs).images,
                                  stock(generator=torch.Generator().manual_seed(9), **kwargs).images)


def test_components_passed_to_from_pretrained_replace_the_saved_ones(super_resolution, text2im, tmp_path):
    """As in ``DiffusionPipeline.from_pretrained``: a scheduler (or any component, by our name or diffusers') passed to
    ``from_pretrained`` replaces the saved one, and samples as diffusers' pipeline loaded with the same scheduler."""
    from diffusers import DPMSolverMultistepScheduler

    stock, _, _ = super_resolution
    folder = tmp_path / "sr"
    stock.save_pretrained(folder, safe_serialization=True)
    dpm = DPMSolverMultistepScheduler.from_config(stock.scheduler.config)
    pipe = LDMPipeline.from_pretrained(folder, scheduler=dpm)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler is dpm
    stock = type(stock).from_pretrained(folder, scheduler=DPMSolverMultistepScheduler.from_config(dpm.config),
                                        use_safetensors=True)
    stock.set_progress_bar_config(disable=True)
    kwargs = dict(image=_low_res(), num_inference_steps=STEPS, output_type="np")
    np.testing.assert_array_equal(pipe(generator=torch.Generator().manual_seed(9), **kwargs).images,
                                  stock(generator=torch.Generator().manual_seed(9), **kwargs).images)
    assert pipe.vae.config.scaling_factor == 1.0  # the super-resolution layout's decode, as before

    text_stock, _, text_pipe = text2im
    text_stock.save_pretrained(tmp_path / "text", safe_serialization=True)
    loaded = LDMPipeline.from_pretrained(tmp_path / "text", bert=text_pipe.text_encoder, vae=text_pipe.vae)
    assert loaded.text_encoder is text_pipe.text_encoder and loaded.vae is text_pipe.vae
    assert type(loaded.unet).__name__ == "UNet2DConditionModel"


def test_model_classes_load_from_safetensors_only_whatever_their_slot(uncond, tmp_path, monkeypatch):
    """A diffusers-layout folder whose model_index.json names a model class in the tokenizer or scheduler slot, with
    only pickled weights there, is refused, not unpickled."""
    _, _, pipe, folder = uncond
    shutil.copytree(folder, tmp_path / "bad")
    index = json.loads((tmp_path / "bad" / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UNet2DModel"]
    (tmp_path / "bad" / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(tmp_path / "bad" / "scheduler")
    pipe.unet.save_pretrained(tmp_path / "bad" / "scheduler", safe_serialization=False)
    assert not list((tmp_path / "bad" / "scheduler").glob("*.safetensors"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(EnvironmentError, match="safetensors"):
        LDMPipeline.from_pretrained(tmp_path / "bad")
