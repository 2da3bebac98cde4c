import math

import numpy as np
import pytest
import torch

from ldm_diffusers.evaluation import InceptionFeatureExtractor, evaluate_autoencoder, psnr, ssim


def test_psnr_formula():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.5
    expected = [10 * math.log10(1 / 0.01), 10 * math.log10(1 / 0.25)]
    assert psnr(y, x).tolist() == pytest.approx(expected, rel=1e-5)


def test_ssim_identity_and_order():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (ssim((x + 0.05 * torch.randn_like(x)).clamp(0, 1), x) > ssim(torch.rand_like(x), x)).all()


def test_inception_features_shape_and_determinism():
    net = InceptionFeatureExtractor()
    x = torch.rand(2, 3, 32, 32)
    f = net(x)
    assert f.shape == (2, 2048)
    torch.testing.assert_close(net(x), f)
    # quantised to 8 bits first, as in the TF protocol
    torch.testing.assert_close(net((x * 255).round().to(torch.uint8)), f)


def test_evaluate_autoencoder_perfect_reconstruction():
    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return type("Out", (), {"sample": x})()

    torch.manual_seed(0)
    batches = [{"pixel_values": torch.rand(4, 3, 16, 16) * 2 - 1} for _ in range(2)]
    results = evaluate_autoencoder(Identity(), batches, max_samples=6, show_progress=False)
    assert results["num_images"] == 6
    assert results["psnr"] > 100  # MSE clamped at 1e-12
    assert results["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert abs(results["rfid"]) < 1e-3
