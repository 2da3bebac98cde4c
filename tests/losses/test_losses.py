import math

import pytest
import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from helpers.models import tiny_kl, tiny_vq

from ldm_diffusers.losses import (
    LPIPS,
    AutoencoderLoss,
    EfficientNetPerceptualLoss,
    NLayerDiscriminator,
    adaptive_weight,
    build_perceptual_loss,
    discriminator_factor,
    hinge_d_loss,
    l1_loss,
    l2_loss,
    vanilla_d_loss,
)
from ldm_diffusers.losses.perceptual import _vgg16_features


def test_pixel_losses():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert l1_loss(a, b).tolist() == [0.5, 3.0]
    assert l2_loss(a, b).tolist() == [0.25, 9.0]


def test_hinge_and_vanilla_losses_match_formulas():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # hinge: relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 1.5] -> mean 5/6
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 5 / 6))
    expected = 0.5 * (sum(math.log1p(math.exp(-r)) for r in real.tolist()) / 3
                      + sum(math.log1p(math.exp(f)) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    # a perfect critic beyond the margins has zero hinge loss
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight_matches_gradient_norm_ratio():
    torch.manual_seed(0)
    last = nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 4)
    out = x @ last.T
    rec = out.pow(2).mean()
    gan = -(out * 0.01).mean()
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    w = adaptive_weight(rec, gan, last)
    assert w.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not w.requires_grad
    # clamped at max_weight
    assert adaptive_weight(rec, gan * 1e-9, last, max_weight=10.0).item() == 10.0


def test_discriminator_start():
    assert discriminator_factor(9, disc_start=10) == 0.0
    assert discriminator_factor(10, disc_start=10, factor=0.7) == 0.7


def test_patchgan_shapes_and_norms():
    for norm in ("batch", "group", "none"):
        d = NLayerDiscriminator(base_channels=8, n_layers=3, norm=norm)
        assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert NLayerDiscriminator(base_channels=8, n_layers=2)(torch.randn(1, 3, 64, 64)).shape == (1, 1, 14, 14)
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="layer")


def _kl_loss(**kwargs):
    return AutoencoderLoss("kl", perceptual_loss=None, discriminator=NLayerDiscriminator(base_channels=8, n_layers=2),
                           **kwargs)


def test_kl_generator_loss_matches_formula_before_disc_start():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec = torch.rand(2, 3, 16, 16) * 2 - 1
    params = torch.randn(2, 8, 4, 4)
    posterior = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:].clamp(-30, 20)
    kl_closed_form = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum() / 2
    loss_fn = _kl_loss(kl_weight=1e-3, logvar_init=0.5, disc_start=100)
    loss, logs = loss_fn.generator_loss(x, rec, global_step=5, posterior=posterior)
    nll = ((rec - x).abs() / math.exp(0.5) + 0.5).sum() / 2
    assert logs["kl_loss"].item() == pytest.approx(kl_closed_form.item(), rel=1e-5)
    assert loss.item() == pytest.approx((nll + 1e-3 * kl_closed_form).item(), rel=1e-5)
    assert "g_loss" not in logs
    d_loss, d_logs = loss_fn.discriminator_loss(x, rec, global_step=5)
    assert d_loss.item() == 0.0


def test_kl_generator_loss_after_disc_start_adds_weighted_adversarial_term():
    torch.manual_seed(0)
    model = tiny_kl(2)
    loss_fn = _kl_loss(disc_start=0, disc_weight=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    loss, logs = loss_fn.generator_loss(x, out.sample, 0, last_layer=model.last_layer(), posterior=out.posterior)
    g_loss = -loss_fn.discriminator(out.sample).mean()
    nll = (out.sample - x).abs().sum() / 2  # logvar = 0
    kl = out.posterior.kl().sum() / 2
    lam = adaptive_weight(nll, g_loss, model.last_layer()) * 0.5
    assert logs["d_weight"].item() == pytest.approx(lam.item(), rel=1e-4)
    assert loss.item() == pytest.approx((nll + 1e-6 * kl + lam * g_loss).item(), rel=1e-4)
    # the discriminator step sees detached reconstructions: no gradient reaches the autoencoder
    d_loss, _ = loss_fn.discriminator_loss(x, out.sample, 0)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_vq_codebook_and_commitment_terms():
    torch.manual_seed(0)
    model = tiny_vq(2, num_vq_embeddings=8, vq_embed_dim=3)
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = model.quantize_latents(z_e)
    codebook = model.quantize.embedding.weight
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(flat, codebook.detach()).argmin(1)
    assert torch.equal(q.indices.flatten(), nearest)
    expected = (flat - codebook.detach()[nearest]).pow(2).mean()
    assert q.codebook_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert q.commitment_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the codebook term moves only the codebook, the commitment term only the encoder output
    g_code = torch.autograd.grad(q.codebook_loss, [z_e, codebook], retain_graph=True, allow_unused=True)
    assert g_code[0] is None and g_code[1].abs().sum() > 0
    g_commit = torch.autograd.grad(q.commitment_loss, [z_e, codebook], retain_graph=True, allow_unused=True)
    assert g_commit[0].abs().sum() > 0 and g_commit[1] is None
    # straight-through: forward value is the codebook entry, gradient is the identity
    torch.testing.assert_close(q.quantized.detach(), codebook.detach()[q.indices].permute(0, 3, 1, 2))
    (g_st,) = torch.autograd.grad(q.quantized.sum(), z_e)
    torch.testing.assert_close(g_st, torch.ones_like(z_e))
    # perplexity and usage from the code histogram
    counts = torch.bincount(nearest, minlength=8).float()
    p = counts / counts.sum()
    assert q.perplexity.item() == pytest.approx(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item(), rel=1e-5)
    assert q.usage.item() == pytest.approx((counts > 0).float().mean().item())


def test_vq_perplexity_of_uniform_usage_equals_codes_used():
    model = tiny_vq(2, num_vq_embeddings=4, vq_embed_dim=2)
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z = torch.tensor([[0.1, 0.0], [9.9, 0.2], [0.0, 10.1], [10.0, 9.8]]).T.reshape(1, 2, 2, 2)
    q = model.quantize_latents(z)
    assert q.perplexity.item() == pytest.approx(4.0, rel=1e-5)
    assert q.usage.item() == 1.0


def test_vq_generator_loss_matches_formula():
    torch.manual_seed(0)
    model = tiny_vq(2)
    loss_fn = AutoencoderLoss("vq", perceptual_loss=None, discriminator=NLayerDiscriminator(base_channels=8, n_layers=2),
                              commitment_beta=0.25, codebook_weight=2.0, disc_start=10)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    loss, logs = loss_fn.generator_loss(x, out.sample, 0, quantizer=out.quantizer)
    q = out.quantizer
    expected = (out.sample - x).abs().mean() + 2.0 * (q.codebook_loss + 0.25 * q.commitment_loss)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_fn.generator_parameters() == []  # no learned log-variance for VQ
    assert out.commit_loss.item() == pytest.approx((q.codebook_loss + 0.25 * q.commitment_loss).item())


def test_missing_regularizer_inputs_raise():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="posterior"):
        _kl_loss().generator_loss(x, x, 0)
    with pytest.raises(ValueError, match="quantizer"):
        AutoencoderLoss("vq", discriminator=NLayerDiscriminator(base_channels=8)).generator_loss(x, x, 0)
    with pytest.raises(ValueError, match="regularization"):
        AutoencoderLoss("ae")


@pytest.fixture(scope="module")
def effnet():
    return EfficientNetPerceptualLoss()


def test_efficientnet_perceptual_loss_is_a_graded_distance_with_gradients(effnet):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(effnet(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    small = (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)
    large = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    assert (effnet(small, x) < effnet(large, x)).all()
    y = small.clone().requires_grad_(True)
    effnet(y, x).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in effnet.parameters())
    effnet.train()
    assert not effnet.training  # the frozen backbone never switches batch-norm to training mode


def test_perceptual_term_trains_the_autoencoder(effnet):
    model = tiny_kl(2)
    loss_fn = AutoencoderLoss("kl", perceptual_loss=effnet, discriminator=NLayerDiscriminator(base_channels=8),
                              pixel_weight=0.0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    out = model(x)
    loss, _ = loss_fn.generator_loss(x, out.sample, 0, posterior=out.posterior)
    loss.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0


def test_lpips_loads_torchvision_vgg_and_lpips_heads(tmp_path):
    # The real VGG16 ImageNet file cannot be downloaded here; a state dict in the same layout tests the loader.
    vgg_state = {f"features.{k}": v for k, v in _vgg16_features().state_dict().items()}
    vgg_state["classifier.0.weight"] = torch.zeros(1)
    torch.save(vgg_state, tmp_path / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(heads, tmp_path / "vgg_heads.pth")
    lpips = LPIPS.from_files(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg_heads.pth"))
    torch.testing.assert_close(lpips.vgg[0].weight, vgg_state["features.0.weight"])
    torch.testing.assert_close(lpips.channel_weights[4].flatten(), heads["lin4.model.1.weight"].flatten())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lpips(x, x).abs().max() < 1e-6
    assert (lpips(x, torch.rand_like(x)) > 0).all()
    torch.save({"something": torch.zeros(1)}, tmp_path / "not_vgg.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        LPIPS.from_files(str(tmp_path / "not_vgg.pth"), str(tmp_path / "vgg_heads.pth"))


def test_build_perceptual_loss_choices():
    assert build_perceptual_loss("none") is None
    with pytest.raises(ValueError, match="vgg16_weights_path"):
        build_perceptual_loss("lpips")
    with pytest.raises(ValueError, match="Unknown perceptual loss"):
        build_perceptual_loss("alexnet")
