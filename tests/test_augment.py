import math

import pytest
import torch

from vit_mqa.data.augment import (
    AugmentConfig,
    affine_theta,
    augment,
    elastic_displacement,
    mix_batch,
    random_affine,
    random_blur,
    random_contrast,
    random_erase,
    random_hflip,
    random_lowres,
    random_stroke,
    warp,
)
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


def test_later_stages_leave_the_affine_draws_unchanged():
    """Switching flips / erasing on must not move the affine stage's random draws, so
    runs recorded before these stages existed replay exactly."""
    x = torch.rand(8, 1, 28, 28)
    base = AugmentConfig()
    affine_only = augment(x, base, torch.Generator().manual_seed(5))
    reference = random_affine(x, base, torch.Generator().manual_seed(5))
    torch.testing.assert_close(affine_only, reference)
    flipped = augment(x, AugmentConfig(hflip=1.0), torch.Generator().manual_seed(5))
    torch.testing.assert_close(flipped, affine_only.flip(-1))
    off = AugmentConfig(rotate=0, scale_min=1, scale_max=1, translate=0)
    assert augment(x, off, torch.Generator().manual_seed(0)) is x


def test_hflip_mirrors_about_half_the_images():
    x = torch.rand(400, 1, 6, 9)
    out = random_hflip(x, 0.5, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    unchanged = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((mirrored ^ unchanged).all())  # every image is one or the other
    assert 160 < int(mirrored.sum()) < 240


def test_erase_zeroes_one_rectangle_of_the_drawn_size():
    x = torch.ones(300, 2, 20, 30)
    cfg = AugmentConfig(erase=0.5, erase_min_area=0.1, erase_max_area=0.2, erase_ratio=2.0)
    out = random_erase(x, cfg, torch.Generator().manual_seed(1))
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1])  # the same rectangle in every channel
    erased = zero[:, 0].flatten(1).any(1)
    assert 110 < int(erased.sum()) < 190
    for mask in zero[erased, 0]:
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert int(mask.sum()) == h * w  # one solid rectangle
        assert 0.1 * 600 * 0.8 <= h * w <= 0.2 * 600 * 1.2  # area, up to rounding
        assert 1 / 2.0 / 1.5 <= h / w <= 2.0 * 1.5  # aspect ratio, up to rounding


def test_erase_and_flip_bad_settings():
    with pytest.raises(VitMqaError, match="probabilities"):
        AugmentConfig(hflip=1.5).validate()
    with pytest.raises(VitMqaError, match="erase_min_area"):
        AugmentConfig(erase=0.5, erase_min_area=0.5, erase_max_area=0.2).validate()


def _numbered_batch(n=6, size=16):
    """Image i is filled with the value i + 1; label i is i."""
    images = (torch.arange(n, dtype=torch.float32) + 1)[:, None, None, None]
    return images.expand(n, 1, size, size).clone(), torch.arange(n)


def test_mixup_blends_each_image_with_its_partner_and_the_targets_alike():
    images, labels = _numbered_batch()
    cfg = AugmentConfig(mixup=0.4)
    mixed, targets = mix_batch(images, labels, 8, cfg, torch.Generator().manual_seed(3))
    assert targets.shape == (6, 8)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    for i in range(6):  # image i is w * (i + 1) + (1 - w) * (partner + 1), uniformly
        partner = 5 - i
        w = targets[i, i].item() if i != partner else 1.0
        assert w == pytest.approx(targets[partner, partner].item())  # one weight per batch
        torch.testing.assert_close(mixed[i], w * images[i] + (1 - w) * images[partner])
        assert targets[i, partner].item() == pytest.approx(1 - w)


def test_cutmix_pastes_one_box_and_weighs_targets_by_its_area():
    images, labels = _numbered_batch(size=20)
    cfg = AugmentConfig(cutmix=1.0)
    for seed in range(8):
        mixed, targets = mix_batch(images, labels, 6, cfg, torch.Generator().manual_seed(seed))
        pasted = mixed[0] == images[5]  # image 0's partner is image 5
        share = pasted.float().mean().item()
        assert targets[0, 5].item() == pytest.approx(share)
        assert targets[0, 0].item() == pytest.approx(1 - share)
        if share:  # the pasted pixels form one rectangle
            rows, cols = pasted[0].any(1).nonzero(), pasted[0].any(0).nonzero()
            box = pasted[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert bool(box.all())


def test_mixing_is_seeded_and_off_means_one_hot_targets():
    images, labels = _numbered_batch()
    cfg = AugmentConfig(mixup=0.8, cutmix=1.0)
    a = mix_batch(images, labels, 6, cfg, torch.Generator().manual_seed(1))
    b = mix_batch(images, labels, 6, cfg, torch.Generator().manual_seed(1))
    c = mix_batch(images, labels, 6, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    for off in (AugmentConfig(), AugmentConfig(mixup=0.8, mix_prob=0.0)):
        same, targets = mix_batch(images, labels, 6, off, torch.Generator().manual_seed(1))
        assert same is images and torch.equal(targets, torch.eye(6))
    # With both on, batches take either: some pasted boxes, some blends.
    kinds = set()
    for seed in range(20):
        mixed, _ = mix_batch(images, labels, 6, cfg, torch.Generator().manual_seed(seed))
        blended = not torch.isin(mixed[0], images.unique()).all()
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.parametrize("kw", [dict(mixup=-0.1), dict(cutmix=1000.0), dict(mix_prob=1.5)])
def test_mix_bad_settings(kw):
    with pytest.raises(VitMqaError, match="need mixup and cutmix in"):
        AugmentConfig(**kw)


# ----- the stages for real digits: slant, width, elastic, stroke, low-res, blur, contrast ---

def _bar(height: int = 28, width: int = 28) -> torch.Tensor:
    """A vertical bar 4 px wide through the middle: one image (1, 1, H, W)."""
    x = torch.zeros(1, 1, height, width)
    x[:, :, 4:height - 4, width // 2 - 2:width // 2 + 2] = 1.0
    return x


def _column_centre(rows: torch.Tensor) -> float:
    """Ink-weighted mean column of some rows (R, W)."""
    cols = torch.arange(rows.shape[-1], dtype=rows.dtype)
    return float((rows * cols).sum() / rows.sum())


_STILL = {"rotate": 0.0, "scale_min": 1.0, "scale_max": 1.0, "translate": 0.0}


def test_slant_shears_a_vertical_bar_and_keeps_its_height():
    x = _bar().repeat(64, 1, 1, 1)
    out = random_affine(x, AugmentConfig(**_STILL, slant=30.0), torch.Generator().manual_seed(0))
    tilt = [_column_centre(o[0, 5:9]) - _column_centre(o[0, -9:-5]) for o in out]
    # Both directions occur, up to tan(30 deg) * 15 rows ~ 8.7 px, and every row keeps ink.
    assert min(tilt) < -2 and max(tilt) > 2 and max(abs(t) for t in tilt) < 9.5
    assert (out[:, 0, 6:-6].sum(dim=2) > 1).all()


def test_aspect_changes_the_width_not_the_height():
    x = _bar().repeat(64, 1, 1, 1)
    out = random_affine(x, AugmentConfig(**_STILL, aspect=1.5), torch.Generator().manual_seed(0))
    widths = out[:, 0, 14].sum(dim=1)  # ink across the middle row: the bar's width
    assert widths.min() < 3.4 and widths.max() > 4.8 and widths.max() < 6.2
    assert torch.allclose(out[:, 0, :, 14].sum(dim=1), x[:, 0, :, 14].sum(dim=1), atol=0.6)


def test_elastic_displacement_is_smooth_and_of_the_stated_size():
    g = torch.Generator().manual_seed(0)
    field = elastic_displacement(256, 28, 28, 3.0, g, torch.device("cpu"), torch.float32)
    assert field.shape == (256, 28, 28, 2)
    pixels = field * 14  # grid units to pixels at 28 px
    # Strengths are uniform in [0, 3]: about 0.9 px on average (1.6 px at full strength);
    # bicubic enlargement may overshoot the coarse noise's [-1, 1] a little.
    assert 0.6 < pixels.std().item() < 1.2 and pixels.abs().max() < 4.5
    # Neighbouring pixels move together: a distortion, not noise.
    step = (pixels[:, 1:] - pixels[:, :-1]).abs().mean()
    assert step < 0.2 * pixels.abs().mean()
    same = elastic_displacement(256, 28, 28, 3.0, torch.Generator().manual_seed(0),
                                torch.device("cpu"), torch.float32)
    assert torch.equal(field, same)


def test_elastic_distortion_moves_ink_but_keeps_it():
    x = _bar().repeat(8, 1, 1, 1)
    out = random_affine(x, AugmentConfig(**_STILL, elastic=3.0), torch.Generator().manual_seed(1))
    assert not torch.allclose(out, x, atol=0.05)
    # Local stretching changes the ink's area somewhat, never wholesale.
    assert torch.allclose(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.3)


def test_stroke_width_grows_and_shrinks_within_the_amount():
    x = _bar().repeat(200, 1, 1, 1)
    out = random_stroke(x, 2.0, torch.Generator().manual_seed(0))
    widths = out[:, 0, 14].sum(dim=1)  # 4 px to start with; +-2 px at most
    assert widths.min() < 2.6 and widths.max() > 5.4
    assert widths.min() >= 2.0 - 1e-4 and widths.max() <= 6.0 + 1e-4
    assert torch.allclose(out.flatten(1).amax(dim=1), torch.ones(200))  # ink stays white


def test_lowres_round_trip_blurs_edges_and_keeps_white_ink():
    x = _images()
    off = random_lowres(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(off, x)
    out = random_lowres(x, 1.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.allclose(out.flatten(1).amax(dim=1), torch.ones(4))  # re-stretched


def test_blur_softens_edges_per_image():
    x = _bar().repeat(32, 1, 1, 1)
    out = random_blur(x, 3.0, torch.Generator().manual_seed(0))
    edge = (out[:, 0, 14, 1:] - out[:, 0, 14, :-1]).abs().amax(dim=1)
    assert edge.min() < 0.6 and edge.max() > 0.9  # some blurred hard, some nearly not


def test_contrast_makes_faint_noisy_ink_on_the_chosen_images_only():
    x = _images().repeat(16, 1, 1, 1)
    out = random_contrast(x, 0.5, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(dim=1)
    assert 0 < changed.sum() < len(x)
    tops = out[changed].flatten(1).amax(dim=1)
    assert out.min() >= 0 and out.max() <= 1 and tops.min() < 0.9


def test_every_stage_is_seeded_and_changes_images():
    cfg = AugmentConfig(slant=15, aspect=1.25, elastic=3, stroke=1, lowres=0.5, blur=1,
                        contrast=0.5)
    x = _images()
    a = augment(x, cfg, torch.Generator().manual_seed(5))
    b = augment(x, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.parametrize("kw", [{"slant": -1}, {"slant": 61}, {"aspect": 0.9}, {"aspect": 5},
                                {"elastic": -1}, {"elastic": 11}, {"stroke": 5},
                                {"lowres": 1.5}, {"blur": -0.1}, {"blur": 5},
                                {"contrast": 2}, {"elastic": float("nan")}])
def test_real_digit_stage_bad_settings(kw):
    with pytest.raises(VitMqaError):
        AugmentConfig(**kw).validate()
