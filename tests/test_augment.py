import math

import pytest
import torch

from vit_mqa.augment import AugmentConfig, affine_theta, random_affine, warp
from vit_mqa.errors import VitMqaError


def _images():
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 4:10, 12:16] = 1.0
    return x


def test_disabled_is_identity():
    x = _images()
    cfg = AugmentConfig(rotate=0, scale_min=1, scale_max=1, translate=0)
    assert random_affine(x, cfg, torch.Generator().manual_seed(0)) is x


def test_rotation_by_90_degrees_matches_rot90():
    x = torch.rand(2, 1, 16, 16)
    one, zero = torch.ones(2), torch.zeros(2)
    out = warp(x, affine_theta(one * math.pi / 2, one, zero, zero, 16, 16))
    candidates = [torch.rot90(x, k, dims=(2, 3)) for k in (1, 3)]
    assert min((out - c).abs().max().item() for c in candidates) < 1e-5


def test_rotation_on_non_square_images_keeps_shapes_round():
    """A centred disc stays a disc when rotated, even when the image is wide."""
    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(60.0), indexing="ij")
    disc = (((yy - 9.5) ** 2 + (xx - 29.5) ** 2) < 36).float()[None, None]
    one, zero = torch.ones(1), torch.zeros(1)
    out = warp(disc, affine_theta(one * 0.7, one, zero, zero, 20, 60))
    assert (out - disc).abs().mean() < 0.01


def test_seeded_and_per_image():
    x = _images()
    cfg = AugmentConfig(rotate=15, translate=0.1)
    a = random_affine(x, cfg, torch.Generator().manual_seed(3))
    b = random_affine(x, cfg, torch.Generator().manual_seed(3))
    c = random_affine(x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image draws its own transform
    assert a.shape == x.shape


def test_translation_moves_mass_and_keeps_it():
    x = _images()
    cfg = AugmentConfig(rotate=0, scale_min=1, scale_max=1, translate=0.1)
    out = random_affine(x, cfg, torch.Generator().manual_seed(0))
    centre = lambda t: (t.sum(2).squeeze(1) * torch.arange(28)).sum(-1) / t.sum((1, 2, 3))  # noqa
    assert (centre(out) - centre(x)).abs().max() > 0.3
    torch.testing.assert_close(out.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.05, atol=0)


def test_non_square_images():
    x = torch.rand(3, 2, 12, 30)
    out = random_affine(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def test_bad_ranges():
    with pytest.raises(VitMqaError, match="scale_min <= scale_max"):
        AugmentConfig(scale_min=1.2, scale_max=1.0).validate()
