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


# -- sample metrics: FID, precision / recall, IS ------------------------------------------------------
def test_frechet_distance_matches_the_gaussian_closed_form_and_scipy():
    import numpy as np
    import scipy.linalg

    from ldm_diffusers.evaluation import frechet_distance

    rng = np.random.default_rng(0)
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # full covariances against scipy's sqrtm
    m1, m2 = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(8), m2 @ m2.T + 0.1 * np.eye(8)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_fid_of_sampled_gaussian_features_approaches_the_closed_form():
    import numpy as np

    from ldm_diffusers.evaluation import fid_from_features

    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(20000, 4))
    y = rng.normal(0.5, 2.0, size=(20000, 4))
    closed = 4 * 0.5**2 + 4 * (1.0 - 2.0) ** 2  # = 5
    assert fid_from_features(x, y) == pytest.approx(closed, rel=0.03)


def test_fid_gram_form_equals_the_covariance_form_with_fewer_samples_than_dimensions():
    import numpy as np

    from ldm_diffusers.evaluation import fid_from_features, frechet_distance
    from ldm_diffusers.evaluation.fid import feature_statistics

    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(40, 64)) @ rng.normal(size=(64, 64))
    y = rng.normal(0.3, 1.5, size=(25, 64))
    full = frechet_distance(*feature_statistics(x), *feature_statistics(y))  # D x D eigendecompositions
    # rel 1e-7: the covariance form takes square roots of the rank-deficient product's zero eigenvalues, which eigh
    # returns as round-off of about 1e-16 * ||S|| each; sqrt turns each into ~1e-7 * sqrt(||S||) (observed 3e-9 rel)
    assert fid_from_features(x, y) == pytest.approx(full, rel=1e-7)  # N x M nuclear norm
    assert fid_from_features(x, x) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="same D"):
        fid_from_features(x, y[:, :10])


def test_precision_recall_on_constructed_sets():
    from ldm_diffusers.evaluation import precision_recall

    torch.manual_seed(0)
    real = torch.randn(200, 2)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    far = torch.randn(200, 2) + 100.0
    assert precision_recall(real, far) == {"precision": 0.0, "recall": 0.0}
    # half of the generated points copy real ones (jittered), half are far away: precision 1/2;
    # the copies sit on 100 of the 200 real points, and a generated point's k-NN ball reaches only a few
    # real neighbours, so recall lies strictly between 1/2 and 1
    fake = torch.cat([real[:100] + 1e-4, torch.randn(100, 2) + 100.0])
    pr = precision_recall(real, fake)
    assert pr["precision"] == 0.5
    assert 0.5 <= pr["recall"] < 1.0


def test_inception_score_closed_forms():
    from ldm_diffusers.evaluation import inception_score_from_logits

    uniform = torch.zeros(100, 10)
    assert inception_score_from_logits(uniform, splits=1)[0] == pytest.approx(1.0)
    one_hot = torch.full((100, 10), -1e4)
    one_hot[torch.arange(100), torch.arange(100) % 10] = 0
    mean, std = inception_score_from_logits(one_hot, splits=5)  # confident and balanced: IS = #classes
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    single = torch.full((100, 10), -1e4)
    single[:, 3] = 0  # confident but one class: IS = 1
    assert inception_score_from_logits(single, splits=2)[0] == pytest.approx(1.0, abs=1e-6)


def test_efficientnet_classifier_scores_real_emoji_above_noise(emoji16):
    from PIL import Image

    from ldm_diffusers.evaluation import EfficientNetClassifier, inception_score_from_logits

    files = sorted((emoji16 / "train").glob("*.png"))[:40]
    real = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]) / 255
    classifier = EfficientNetClassifier()
    flat = torch.full_like(real, 0.5)
    logits = classifier(real)
    assert logits.shape == (40, 1000) and logits.argmax(1).unique().numel() >= 5  # varied ImageNet guesses
    is_real = inception_score_from_logits(logits, splits=1)[0]
    is_flat = inception_score_from_logits(classifier(flat), splits=1)[0]
    assert is_flat == pytest.approx(1.0, abs=1e-6) and is_real > 1.1  # 16x16 emoji: low confidence, yet > 1


def test_reference_features_are_cached(tmp_path):
    from ldm_diffusers.evaluation import cached_reference_features

    calls = []

    def compute():
        calls.append(1)
        return np.ones((3, 2))

    a = cached_reference_features("ref", {"n": 3}, compute, tmp_path)
    b = cached_reference_features("ref", {"n": 3}, compute, tmp_path)
    assert np.array_equal(a, b) and len(calls) == 1
    cached_reference_features("ref", {"n": 4}, compute, tmp_path)
    assert len(calls) == 2
