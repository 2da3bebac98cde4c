"""Our models are drop-in subclasses of diffusers' ``AutoencoderKL``, ``VQModel`` and ``UNet2DConditionModel``.

Each test builds the same config in the stock class and in ours, gives both the same weights and compares what
the parent's public surface returns: forward defaults, ``return_dict=False`` tuples, encode / decode, save / load
in float16 and bfloat16, variants and sharded checkpoints (each class loading the other's folder), gradient
checkpointing, attention-processor switching, fused QKV, slicing / tiling and LoRA adapters through PEFT.

Where both run the same code on the same inputs in one process the outputs must be bit-identical
(``torch.equal``); nothing here depends on the thread count, since both sides use the same kernels.

Two differences are deliberate and tested elsewhere (tests/models/test_autoencoders.py): ``from_pretrained`` refuses
pickle-only folders (unpickling runs code), and the autoencoders refuse images whose sides are not divisible by f
(the parent returns a reconstruction of another size).
"""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel, VQModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ldm_diffusers import LDMAutoencoderKL, LDMUNet2DConditionModel, LDMUNet2DModel, LDMVQModel

KL_CONFIG = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 sample_size=16)
VQ_CONFIG = dict(KL_CONFIG, latent_channels=3, num_vq_embeddings=16, vq_embed_dim=3)
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, cross_attention_dim=8,
                   attention_head_dim=4)


def pair(stock_cls, our_cls, config):
    """(stock, ours) with the same config and the same (random) weights, in eval mode."""
    torch.manual_seed(0)
    stock = stock_cls(**config).eval()
    ours = our_cls(**config).eval()
    missing, unexpected = ours.load_state_dict(stock.state_dict(), strict=True)
    assert not missing and not unexpected
    return stock, ours


def assert_same(a, b):
    assert type(a) is type(b) or isinstance(a, torch.Tensor), (type(a), type(b))
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.fixture
def images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


# -- configs, defaults, signatures --------------------------------------------------------------------------------
@pytest.mark.parametrize("stock_cls,our_cls", [(AutoencoderKL, LDMAutoencoderKL), (VQModel, LDMVQModel),
                                               (UNet2DConditionModel, LDMUNet2DConditionModel),
                                               (UNet2DModel, LDMUNet2DModel)])
def test_same_constructor_defaults_and_method_signatures(stock_cls, our_cls):
    """The config keys and their defaults (the constructor's parameters) and forward / encode / decode's
    parameters and defaults are the parent's; the only addition is the VQ commitment weight ``beta``."""
    import inspect

    def parameters(cls, name):
        return {k: p.default for k, p in inspect.signature(getattr(cls, name)).parameters.items()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    ours, theirs = parameters(our_cls, "__init__"), parameters(stock_cls, "__init__")
    # beta: used only by our VQ forward's loss terms; attention_head_counts: per-level heads of LDMUNet2DModel
    assert set(ours) - set(theirs) <= {"beta", "attention_head_counts"}
    assert {k: v for k, v in ours.items() if k not in ("beta", "attention_head_counts")} == theirs
    for name in ("forward", "encode", "decode"):
        if hasattr(stock_cls, name):
            ours, theirs = parameters(our_cls, name), parameters(stock_cls, name)
            assert list(ours) == list(theirs), name  # same names in the same order
            for key, default in theirs.items():  # a required argument may become optional, no default changes
                assert default is inspect.Parameter.empty or ours[key] == default, (name, key)


# -- KL --------------------------------------------------------------------------------------------------------------
def test_kl_forward_is_deterministic_like_the_parent(images):
    stock, ours = pair(AutoencoderKL, LDMAutoencoderKL, KL_CONFIG)
    with torch.no_grad():
        assert torch.equal(ours(images).sample, ours(images).sample)  # the mode, not a sample
        assert_same(ours(images).sample, stock(images).sample)
        assert_same(ours(images, return_dict=False), stock(images, return_dict=False))
        assert len(ours(images, return_dict=False)) == 1
        sampled = [m(images, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
                   for m in (stock, ours)]
        assert_same(*sampled)
        assert not torch.equal(sampled[1], ours(images).sample)
        assert_same(ours.encode(images).latent_dist.mean, stock.encode(images).latent_dist.mean)
        assert_same(ours.encode(images, return_dict=False)[0].mean, stock.encode(images, return_dict=False)[0].mean)
        z = torch.randn(2, 4, 8, 8)
        assert_same(ours.decode(z).sample, stock.decode(z).sample)
        assert_same(ours.decode(z, return_dict=False), stock.decode(z, return_dict=False))


def test_kl_slicing_and_tiling_match_the_parent():
    stock, ours = pair(AutoencoderKL, LDMAutoencoderKL, dict(KL_CONFIG, sample_size=8))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for model in (stock, ours):
        model.enable_slicing()
        model.enable_tiling()
    with torch.no_grad():
        assert_same(ours(x).sample, stock(x).sample)
        z = torch.randn(2, 4, 16, 16)
        assert_same(ours.decode(z).sample, stock.decode(z).sample)


# -- VQ --------------------------------------------------------------------------------------------------------------
def test_vq_forward_encode_decode_match_the_parent(images):
    stock, ours = pair(VQModel, LDMVQModel, VQ_CONFIG)
    with torch.no_grad():
        h = stock.encode(images).latents
        assert_same(ours.encode(images).latents, h)
        assert_same(ours.decode(h).sample, stock.decode(h).sample)
        assert_same(ours.decode(h, return_dict=False)[0], stock.decode(h, return_dict=False)[0])
        assert_same(ours.decode(h, force_not_quantize=True).sample, stock.decode(h, force_not_quantize=True).sample)
        # forward quantises with our quantiser (both loss terms kept apart): the same codes and values as the
        # parent's; the straight-through sum z_e + (z_q - z_e) reaches the decoder in another memory layout, so the
        # convolutions may round differently (observed: 1.8e-6 on outputs of magnitude ~1)
        ours_out, stock_out = ours(images), stock(images)
        assert torch.equal(ours.quantize_latents(h).indices.flatten(), stock.quantize(h)[2][2].flatten())
        torch.testing.assert_close(ours_out.sample, stock_out.sample, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(ours_out.commit_loss, stock_out.commit_loss, rtol=1e-5, atol=0)
        tuple_out = ours(images, return_dict=False)
        assert len(tuple_out) == len(stock(images, return_dict=False)) == 2
        assert torch.equal(tuple_out[0], ours_out.sample)


# -- UNet ------------------------------------------------------------------------------------------------------------
def unet_inputs(config=UNET_CONFIG, tokens=8):
    g = torch.Generator().manual_seed(4)
    sample = torch.randn(2, config["in_channels"], 8, 8, generator=g)
    return sample, torch.tensor([10, 500]), torch.randn(2, 5, tokens, generator=g)


@pytest.mark.parametrize("variant", ["int", "per-block tuple", "class labels", "text projection"])
def test_unet_configs_the_parent_accepts_work_the_same(variant):
    config = dict(UNET_CONFIG)
    kwargs, tokens = {}, 8
    if variant == "per-block tuple":
        config["cross_attention_dim"] = (8, 8)
    elif variant == "class labels":
        config["num_class_embeds"] = 3
        kwargs["class_labels"] = torch.tensor([0, 2])
    elif variant == "text projection":
        config.update(encoder_hid_dim=12, encoder_hid_dim_type="text_proj")
        tokens = 12
    stock, ours = pair(UNet2DConditionModel, LDMUNet2DConditionModel, config)
    sample, t, context = unet_inputs(config, tokens)
    with torch.no_grad():
        assert_same(ours(sample, t, context, **kwargs).sample, stock(sample, t, context, **kwargs).sample)
        assert_same(ours(sample, t, context, return_dict=False, **kwargs),
                    stock(sample, t, context, return_dict=False, **kwargs))
        assert_same(ours(sample, t, encoder_hidden_states=context, **kwargs).sample,
                    stock(sample, t, encoder_hidden_states=context, **kwargs).sample)
    with pytest.raises(ValueError, match=f"{tokens} wide, got {tokens + 1}"):
        ours(sample, t, torch.randn(2, 5, tokens + 1), **kwargs)


def test_unet_attention_processors_and_fused_qkv_match_the_parent():
    stock, ours = pair(UNet2DConditionModel, LDMUNet2DConditionModel, UNET_CONFIG)
    sample, t, context = unet_inputs()
    assert ours.attn_processors.keys() == stock.attn_processors.keys()
    with torch.no_grad():
        sdpa = ours(sample, t, context).sample
        for model in (stock, ours):
            model.set_attn_processor(AttnProcessor())
        assert all(isinstance(p, AttnProcessor) for p in ours.attn_processors.values())
        assert_same(ours(sample, t, context).sample, stock(sample, t, context).sample)
        torch.testing.assert_close(ours(sample, t, context).sample, sdpa, rtol=1e-4, atol=1e-5)
        for model in (stock, ours):
            model.set_default_attn_processor()
        assert all(type(p) is AttnProcessor for p in ours.attn_processors.values())
        assert_same(ours(sample, t, context).sample, stock(sample, t, context).sample)
        for model in (stock, ours):
            model.set_attn_processor(AttnProcessor2_0())
            model.fuse_qkv_projections()
        assert_same(ours(sample, t, context).sample, stock(sample, t, context).sample)
        torch.testing.assert_close(ours(sample, t, context).sample, sdpa, rtol=1e-4, atol=1e-5)
        for model in (stock, ours):
            model.unfuse_qkv_projections()
        assert_same(ours(sample, t, context).sample, stock(sample, t, context).sample)


@pytest.mark.parametrize("kind", ["kl", "unet"])
def test_gradient_checkpointing_gives_the_parents_gradients(kind, images):
    if kind == "kl":
        stock, ours = pair(AutoencoderKL, LDMAutoencoderKL, KL_CONFIG)
        run = lambda m: m(images).sample  # noqa: E731
    else:
        stock, ours = pair(UNet2DConditionModel, LDMUNet2DConditionModel, UNET_CONFIG)
        sample, t, context = unet_inputs()
        run = lambda m: m(sample, t, context).sample  # noqa: E731
    grads = []
    for model in (stock, ours):
        model.train()
        model.enable_gradient_checkpointing()
        assert model.is_gradient_checkpointing
        run(model).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    ours.disable_gradient_checkpointing()
    assert not ours.is_gradient_checkpointing


# -- save / load -----------------------------------------------------------------------------------------------------
CASES = {"kl": (AutoencoderKL, LDMAutoencoderKL, KL_CONFIG), "vq": (VQModel, LDMVQModel, VQ_CONFIG),
         "unet": (UNet2DConditionModel, LDMUNet2DConditionModel, UNET_CONFIG)}


def _outputs(model, images):
    with torch.no_grad():
        if isinstance(model, UNet2DConditionModel):
            sample, t, context = unet_inputs()
            return model(sample.to(model.dtype), t, context.to(model.dtype)).sample
        return model.decode(model.encode(images.to(model.dtype))[0] if isinstance(model, VQModel)
                            else model.encode(images.to(model.dtype)).latent_dist.mode()).sample


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_save_load_both_ways(kind, dtype, images, tmp_path):
    stock_cls, our_cls, config = CASES[kind]
    stock, ours = pair(stock_cls, our_cls, config)
    ours.to(dtype).save_pretrained(tmp_path / "ours")
    stock.to(dtype).save_pretrained(tmp_path / "stock")
    loaded = [our_cls.from_pretrained(tmp_path / "stock", torch_dtype=dtype),
              stock_cls.from_pretrained(tmp_path / "ours", torch_dtype=dtype),
              our_cls.from_pretrained(tmp_path / "ours", torch_dtype=dtype)]
    assert [type(m) for m in loaded] == [our_cls, stock_cls, our_cls]
    for model in loaded:
        assert model.dtype == dtype
        for name, value in model.state_dict().items():
            assert torch.equal(value, ours.state_dict()[name]), name
    if dtype == torch.bfloat16:  # float16 convolutions are not implemented on every CPU
        reference = _outputs(stock, images)
        for model in loaded:
            assert_same(_outputs(model, images), reference)
    assert our_cls.from_pretrained(tmp_path / "ours").dtype == torch.float32 or dtype != torch.float32


@pytest.mark.parametrize("kind", sorted(CASES))
def test_sharded_and_variant_checkpoints_load_both_ways(kind, tmp_path):
    stock_cls, our_cls, config = CASES[kind]
    stock, ours = pair(stock_cls, our_cls, config)
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    stock.save_pretrained(tmp_path / "variant", variant="fp16")
    for loaded in (our_cls.from_pretrained(tmp_path / "sharded"), stock_cls.from_pretrained(tmp_path / "sharded"),
                   our_cls.from_pretrained(tmp_path / "variant", variant="fp16")):
        for name, value in loaded.state_dict().items():
            assert torch.equal(value, stock.state_dict()[name]), name


# -- LoRA / PEFT -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "unet"])
def test_lora_adapters_work_as_on_the_parent(kind, images, tmp_path):
    """PEFT adapters (diffusers' ``add_adapter`` / ``save_lora_adapter`` / ``load_lora_adapter``); VQModel has no
    adapter support in diffusers, so neither does ours."""
    import peft
    stock_cls, our_cls, config = CASES[kind]
    stock, ours = pair(stock_cls, our_cls, config)
    targets = ["to_q", "to_k", "to_v"] if kind == "unet" else ["conv1", "conv2"]
    before = _outputs(ours, images)
    for model in (stock, ours):
        torch.manual_seed(5)
        model.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    with_lora = _outputs(ours, images)
    assert_same(with_lora, _outputs(stock, images))
    assert not torch.equal(with_lora, before)
    ours.disable_adapters()
    assert_same(_outputs(ours, images), before)
    ours.enable_adapters()
    if kind == "unet":  # save_lora_adapter / load_lora_adapter are the UNet loaders' (diffusers: not on AutoencoderKL)
        ours.save_lora_adapter(tmp_path / "lora")
        fresh = pair(stock_cls, our_cls, config)[0]
        fresh.load_lora_adapter(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors", prefix=None)
        assert_same(_outputs(fresh, images), with_lora)


def test_per_level_heads_unet_is_the_parent_with_its_heads(images, tmp_path):
    """``LDMUNet2DModel`` has the parent's weights; with head counts that give one head width it computes what the
    parent computes; its own folders keep their head counts, and a stock folder loads as the parent's model."""
    config = dict(block_out_channels=(32, 64), down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), layers_per_block=1, norm_num_groups=8, sample_size=16)
    stock = UNet2DModel(**config, attention_head_dim=16).eval()
    ours = LDMUNet2DModel(**config, attention_head_counts=(2, 4)).eval()
    ours.load_state_dict(stock.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(images, 10).sample, stock(images, 10).sample)
    uneven = LDMUNet2DModel(**config, attention_head_counts=(4, 2)).eval()  # head widths 8 and 32
    uneven.load_state_dict(stock.state_dict())
    with torch.no_grad():
        assert (uneven(images, 10).sample - stock(images, 10).sample).abs().max() > 1e-4
    uneven.save_pretrained(tmp_path / "ours")
    again = LDMUNet2DModel.from_pretrained(tmp_path / "ours")
    assert [a.heads for a in again.down_blocks[0].attentions] == [4] and again.mid_block.attentions[0].heads == 2
    stock.save_pretrained(tmp_path / "stock")
    loaded = LDMUNet2DModel.from_pretrained(tmp_path / "stock").eval()
    with torch.no_grad():
        assert torch.equal(loaded(images, 10).sample, stock(images, 10).sample)
    with pytest.raises(ValueError, match="attention_head_counts"):
        LDMUNet2DModel(**config, attention_head_counts=(3, 4))
