"""The "none of these" benchmark's pictures and figures (benchmarks/none_of_these.py)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from none_of_these import auroc, fpr_at_tpr  # noqa: E402
from none_of_these_styles import (  # noqa: E402
    DIGIT_LIKE,
    LETTER_SOURCES,
    LETTERS,
    NOT_DIGITS,
    OBJECTS,
    drawn_object,
    held_out_letter_fonts,
    render_not_digit,
    source_rng,
)


def edge_density(data: bytes) -> float:
    """Share of pixels whose grey level steps by over 10 % to a neighbour."""
    a = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255
    step = np.maximum(np.abs(np.diff(a, axis=0))[:, :-1], np.abs(np.diff(a, axis=1))[:-1])
    return float((step > 0.1).mean())


def test_not_digits_render_the_same_every_time_and_look_their_kind():
    fonts = held_out_letter_fonts()
    assert not any(f.name.startswith(("DejaVu", "Liberation")) for f in fonts)
    assert not set(LETTERS) & set(DIGIT_LIKE + "0123456789")
    clothing = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    sources = [s for s in NOT_DIGITS if fonts or s not in LETTER_SOURCES]
    for source in sources:
        images = [render_not_digit(source, i, 7, fonts, clothing) for i in range(4)]
        assert images == [render_not_digit(source, i, 7, fonts, clothing) for i in range(4)]
        assert len({data for data, _ in images}) == 4, source
        density = [edge_density(data) for data, _ in images]
        if source == "scenes":  # smooth colour, no strokes
            assert max(density) < 1e-3, density
        elif source in ("letters-print-clean", "letters-hand"):  # ink, not a blank page
            assert min(density) > 5e-3, (source, density)
    for kind in OBJECTS:
        assert edge_density(drawn_object(source_rng(7, "objects", 0), kind)[0]) > 5e-3, kind
    if not fonts:
        pytest.skip("no held-out font (FreeFont, Noto, URW) installed: letters not drawn")


def test_auroc_and_fpr95_on_hand_made_scores():
    low, high = np.array([0.1, 0.2, 0.3]), np.array([0.7, 0.8, 0.9, np.inf])
    assert auroc(high, low) == 1.0 and fpr_at_tpr(high, low) == 0.0
    assert auroc(low, high) == 0.0 and fpr_at_tpr(low, high) == 1.0
    same = np.full(5, 0.5)
    assert auroc(same, same[:3]) == 0.5 and fpr_at_tpr(same, same[:3]) == 1.0
    # One positive of four ties one negative of two: (3 * 2 + 1 + 0.5) / 8 pairs.
    assert auroc(np.array([1.0, 2.0, 3.0, 0.5]), np.array([0.5, 0.0])) == 7.5 / 8
    # 95 % of 20 positives: the 19th highest is the threshold; negatives at or above it.
    positives = np.arange(20.0)
    assert fpr_at_tpr(positives, np.array([0.5, 1.0, 1.5, -1.0])) == 0.5
