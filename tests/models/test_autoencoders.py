import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from helpers.models import tiny_kl, tiny_vq

from ldm_diffusers import LDMAutoencoderKL, LDMVQModel, estimate_scaling_factor, load_autoencoder
from ldm_diffusers.utils.model_files import CheckpointError


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16, 32])
def test_kl_latent_shapes_for_every_f(f):
    model = tiny_kl(f, latent_channels=3)
    x = torch.randn(2, 3, 64, 64)
    posterior = model.encode(x).latent_dist
    assert model.downsampling_factor == f
    assert posterior.mean.shape == (2, 3, 64 // f, 64 // f)
    assert model.latent_shape(64, 64) == (3, 64 // f, 64 // f)
    assert model.decode(posterior.mode()).sample.shape == x.shape


@pytest.mark.parametrize("f", [1, 2, 4, 8, 16, 32])
def test_vq_latent_shapes_for_every_f(f):
    model = tiny_vq(f, latent_channels=3, vq_embed_dim=5, num_vq_embeddings=16)
    x = torch.randn(2, 3, 64, 64)
    h = model.encode(x).latents
    assert h.shape == (2, 5, 64 // f, 64 // f)
    out = model(x)
    assert out.sample.shape == x.shape
    assert out.quantizer.indices.shape == (2, 64 // f, 64 // f)
    assert int(out.quantizer.indices.max()) < 16


@pytest.mark.parametrize("f", [0, 3, 64])
def test_invalid_downsampling_factor(f):
    with pytest.raises(ValueError, match="downsampling_factor"):
        tiny_kl(f) if f else LDMAutoencoderKL.from_downsampling_factor(f)


def test_vq_decode_quantizes_pre_quantization_latents():
    model = tiny_vq().eval()
    x = torch.randn(1, 3, 32, 32)
    h = model.encode(x).latents
    q = model.quantize_latents(h)
    # encode gives latents that are not yet on the codebook; decode snaps them.
    codebook = model.quantize.embedding.weight
    assert not torch.isin(h.permute(0, 2, 3, 1).reshape(-1, 4)[:, 0], codebook[:, 0]).all()
    torch.testing.assert_close(q.quantized, codebook[q.indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(model.decode(h).sample, model.decode(q.quantized, force_not_quantize=True).sample)
    torch.testing.assert_close(model(x).sample, model.decode(h).sample)


def test_vq_scaling_factor_is_never_stable_diffusions(tmp_path):
    model = tiny_vq()
    assert model.config.scaling_factor == 1.0
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["scaling_factor"]  # a CompVis-era folder without the key
    (tmp_path / "config.json").write_text(json.dumps(config))
    from diffusers import VQModel

    from ldm_diffusers.models.autoencoders import latent_scaling_factor

    loaded = LDMVQModel.from_pretrained(tmp_path)
    assert loaded.config.scaling_factor == VQModel.from_pretrained(tmp_path).config.scaling_factor  # the parent's
    assert latent_scaling_factor(loaded) == 1.0  # what the pipeline and training scale latents by


def test_estimate_scaling_factor_is_inverse_latent_std():
    model = tiny_vq().eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    factor = estimate_scaling_factor(model, batches)
    with torch.no_grad():
        z = torch.cat([model.encode(b).latents for b in batches])
    assert factor == pytest.approx(1.0 / z.double().std(unbiased=False).item(), rel=1e-5)
    assert model.config.scaling_factor == pytest.approx(factor)
    # max_images stops early
    assert estimate_scaling_factor(model, batches, max_images=4, update_config=False) == pytest.approx(
        1.0 / model.encode(batches[0]).latents.double().std(unbiased=False).item(), rel=1e-5
    )


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_save_load_round_trip_and_stock_diffusers_loading(tmp_path, kind):
    model = (tiny_kl() if kind == "kl" else tiny_vq()).eval()
    model.register_to_config(scaling_factor=0.7)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    x = torch.randn(2, 3, 32, 32)
    loaded = load_autoencoder(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.scaling_factor == 0.7
    stock_cls = AutoencoderKL if kind == "kl" else VQModel
    stock = stock_cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        if kind == "kl":
            z = model.encode(x).latent_dist.mode()
            torch.testing.assert_close(loaded.encode(x).latent_dist.mode(), z, rtol=0, atol=0)
            torch.testing.assert_close(stock.encode(x).latent_dist.mode(), z, rtol=0, atol=0)
            ref = model.decode(z).sample
            torch.testing.assert_close(stock.decode(z).sample, ref, rtol=0, atol=0)
        else:
            h = model.encode(x).latents
            torch.testing.assert_close(stock.encode(x).latents, h, rtol=0, atol=0)
            ref = model.decode(h).sample  # both quantise with diffusers' quantiser: bit-identical
            torch.testing.assert_close(stock.decode(h).sample, ref, rtol=0, atol=0)
            # our forward's straight-through estimator rounds differently only in the last bits
            torch.testing.assert_close(stock(x).sample, model(x).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded.decode(model.encode(x)[0] if kind == "vq" else z).sample, ref, rtol=0, atol=0)


def test_wrong_image_size_and_channels_give_clear_errors():
    model = tiny_kl(8)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor f=8"):
        model.encode(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="takes 3-channel images but got 1"):
        model.encode(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        model.encode(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="Expected latents"):
        model.decode(torch.randn(1, 7, 4, 4))
    vq = tiny_vq(4)
    with pytest.raises(ValueError, match="not divisible"):
        vq(torch.randn(1, 3, 30, 30))


def test_corrupt_pickle_and_missing_checkpoints_give_clear_errors(tmp_path):
    model = tiny_kl()
    good = tmp_path / "good"
    model.save_pretrained(good)

    corrupt = tmp_path / "corrupt"
    model.save_pretrained(corrupt)
    weights = corrupt / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        LDMAutoencoderKL.from_pretrained(corrupt)

    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(CheckpointError, match="only pickle checkpoints"):
        LDMAutoencoderKL.from_pretrained(pickled)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(CheckpointError, match="No weights"):
        LDMAutoencoderKL.from_pretrained(no_weights)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(CheckpointError, match="No config.json"):
        load_autoencoder(no_config)

    with pytest.raises(CheckpointError, match="does not exist"):
        LDMAutoencoderKL.from_pretrained(good, subfolder="vae")

    # the good folder still loads
    assert isinstance(LDMAutoencoderKL.from_pretrained(good), LDMAutoencoderKL)


def test_latent_scaling_factor_never_gives_a_vq_model_stable_diffusions_value(tmp_path):
    from ldm_diffusers.models.autoencoders import latent_scaling_factor

    vq = tiny_vq()
    vq.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["scaling_factor"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    stock = VQModel.from_pretrained(tmp_path)
    assert stock.config.scaling_factor == 0.18215  # diffusers' default ...
    assert latent_scaling_factor(stock) == 1.0  # ... is not used for decoding
    config["scaling_factor"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert latent_scaling_factor(VQModel.from_pretrained(tmp_path)) == 0.5
    kl = tiny_kl()
    kl.register_to_config(scaling_factor=0.3)
    assert latent_scaling_factor(kl) == 0.3
