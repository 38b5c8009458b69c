"""Tests for mbn.eval.metrics on hand-made numbers with exact expected values."""

from __future__ import annotations

import pytest

from mbn.eval.corruptions import CORRUPTIONS, SEVERITIES
from mbn.eval.metrics import (
    ce,
    corruption_errors,
    mce,
    mean_corruption_accuracy,
    mean_corruption_error,
    per_corruption_ce,
    per_corruption_mean,
    relative_ce,
    relative_mce,
)

EXACT = {"abs": 1e-12, "rel": 0}


def _table(fn):
    return {(c, s): fn(i, s) for i, c in enumerate(CORRUPTIONS) for s in SEVERITIES}


def test_mean_corruption_accuracy():
    # corruption i, severity s: 0.9 - 0.1 s + 0.01 (i - 7); offsets cancel over i = 0..14, mean over s is 0.9 - 0.3
    acc = _table(lambda i, s: 0.9 - 0.1 * s + 0.01 * (i - 7))
    assert mean_corruption_accuracy(acc) == pytest.approx(0.6, **EXACT)
    assert mean_corruption_error(acc) == pytest.approx(0.4, **EXACT)
    # a subset, and extra keys are ignored
    acc[("speckle_noise", 1)] = 0.0
    assert mean_corruption_accuracy(acc, corruptions=["gaussian_noise"], severities=[1, 3]) == pytest.approx(
        ((0.8 - 0.07) + (0.6 - 0.07)) / 2, **EXACT
    )


def test_per_corruption_mean_and_errors():
    acc = _table(lambda i, s: 1.0 - 0.1 * s - 0.02 * i)
    err = corruption_errors(acc)
    assert err[("fog", 2)] == pytest.approx(0.2 + 0.02 * CORRUPTIONS.index("fog"), **EXACT)
    means = per_corruption_mean(err)
    assert list(means) == list(CORRUPTIONS)
    assert means["gaussian_noise"] == pytest.approx(0.3, **EXACT)
    assert means["jpeg_compression"] == pytest.approx(0.3 + 0.28, **EXACT)


def test_ce_single_corruption():
    model = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}  # sum 1.5
    reference = {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 5: 1.0}  # sum 3.0
    assert ce(model, reference) == pytest.approx(0.5, **EXACT)
    assert ce(reference, model) == pytest.approx(2.0, **EXACT)


def test_mce_and_per_corruption_ce():
    # reference error 0.4 everywhere; model error 0.2 on the first 5 corruptions (CE 0.5), 0.4 (CE 1) on 5,
    # 0.6 (CE 1.5) on the last 5 -> mCE 1.0; and an uneven one: errors (0.1, 0.3) vs (0.2, 0.2) -> CE 1.0
    reference = _table(lambda i, s: 0.4)
    model = _table(lambda i, s: 0.2 * (1 + i // 5))
    per = per_corruption_ce(model, reference)
    assert per["gaussian_noise"] == pytest.approx(0.5, **EXACT)
    assert per["motion_blur"] == pytest.approx(1.0, **EXACT)
    assert per["jpeg_compression"] == pytest.approx(1.5, **EXACT)
    assert mce(model, reference) == pytest.approx(1.0, **EXACT)

    two_model = {("snow", 1): 0.1, ("snow", 2): 0.3, ("fog", 1): 0.1, ("fog", 2): 0.1}
    two_ref = {("snow", 1): 0.2, ("snow", 2): 0.2, ("fog", 1): 0.4, ("fog", 2): 0.4}
    # snow: 0.4 / 0.4 = 1; fog: 0.2 / 0.8 = 0.25; mean 0.625
    assert mce(two_model, two_ref, corruptions=["snow", "fog"], severities=[1, 2]) == pytest.approx(0.625, **EXACT)


def test_relative_ce_and_mce():
    model = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5}  # sum 1.5, clean 0.05 -> gap 1.25
    reference = {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 5: 1.0}  # sum 3.0, clean 0.1 -> gap 2.5
    assert relative_ce(model, 0.05, reference, 0.1) == pytest.approx(0.5, **EXACT)
    table = {(c, s): model[s] for c in CORRUPTIONS for s in SEVERITIES}
    ref_table = {(c, s): reference[s] for c in CORRUPTIONS for s in SEVERITIES}
    assert relative_mce(table, 0.05, ref_table, 0.1) == pytest.approx(0.5, **EXACT)


def test_exception():
    full = _table(lambda i, s: 0.5)
    partial = dict(full)
    del partial[("fog", 3)]
    with pytest.raises(ValueError, match=r"lacks 1 of 75 .*'fog', 3"):
        mean_corruption_accuracy(partial)
    with pytest.raises(ValueError, match="not a percentage"):
        mean_corruption_accuracy({**full, ("fog", 3): 55.0})
    with pytest.raises(ValueError, match="same non-empty severities"):
        ce({1: 0.1, 2: 0.2}, {1: 0.1})
    with pytest.raises(ValueError, match="must not all be 0"):
        ce({1: 0.1}, {1: 0.0})
    with pytest.raises(ValueError, match="lacks"):
        mce(full, partial)
    with pytest.raises(ValueError, match="differ from reference_clean_error"):
        relative_ce({1: 0.1}, 0.0, {1: 0.2}, 0.2)
