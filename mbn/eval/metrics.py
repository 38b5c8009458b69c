"""Common-corruption metrics: mean corruption accuracy, Corruption Error (CE), mCE and relative mCE.

Follows Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations"
(ICLR 2019), Section 3:

* ``CE_c = sum_s E[s, c] / sum_s E_ref[s, c]``: the model's errors on corruption ``c`` summed over severities,
  divided by a reference model's (AlexNet on ImageNet-C; any chosen baseline on CIFAR-10-C).
* ``mCE`` = mean of ``CE_c`` over the 15 corruptions.
* relative ``CE_c = sum_s (E[s, c] - E_clean) / sum_s (E_ref[s, c] - E_ref_clean)``, and relative mCE its mean:
  how much accuracy is lost to corruption, relative to how much the reference loses.
* On CIFAR-10-C the usual headline is simpler: the mean accuracy (or error) over all 15 x 5 sets.

Conventions: accuracies and errors are fractions in [0, 1] (0.25 = 25 %). CE, mCE and their relative versions
are plain ratios, 1.0 meaning "as good as the reference"; the paper prints them times 100 (as %). Tables are
plain dicts keyed by ``(corruption, severity)``; every function checks that the table holds exactly the pairs it
averages over, so a missing set cannot quietly bias a mean.

Examples:
    >>> acc = {(c, s): 0.9 - 0.1 * s for c in CORRUPTIONS for s in SEVERITIES}
    >>> round(mean_corruption_accuracy(acc), 6)
    0.6
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from mbn.eval.corruptions import CORRUPTIONS, SEVERITIES

__all__ = [
    "ALEXNET_ERRORS",
    "ce",
    "corruption_errors",
    "imagenet_c_ce",
    "mce",
    "mean_corruption_accuracy",
    "mean_corruption_error",
    "per_corruption_ce",
    "per_corruption_mean",
    "relative_ce",
    "relative_mce",
]

Table = Mapping[tuple[str, int], float]
"""``{(corruption, severity): value}``, values in [0, 1]."""


def _check_fraction(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be a fraction in [0, 1] (not a percentage); got {value}")
    return value


def _select(
    table: Table, corruptions: Sequence[str], severities: Sequence[int], what: str
) -> dict[tuple[str, int], float]:
    """The entries of ``table`` for every (corruption, severity) pair, or a clear error naming missing ones."""
    keys = [(c, s) for c in corruptions for s in severities]
    missing = [k for k in keys if k not in table]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{what} lacks {len(missing)} of {len(keys)} (corruption, severity) entries: {shown}")
    return {k: _check_fraction(table[k], f"{what}[{k}]") for k in keys}


def corruption_errors(accuracies: Table) -> dict[tuple[str, int], float]:
    """Turn a table of accuracies into one of errors (``1 - accuracy``).

    Args:
        accuracies: ``{(corruption, severity): accuracy}``.

    Returns:
        ``{(corruption, severity): error}`` with the same keys.
    """
    return {k: 1.0 - _check_fraction(v, f"accuracies[{k}]") for k, v in accuracies.items()}


def mean_corruption_accuracy(
    accuracies: Table, corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES
) -> float:
    """Mean accuracy over all (corruption, severity) sets: the CIFAR-10-C headline number.

    Args:
        accuracies: ``{(corruption, severity): accuracy}``; must cover every requested pair (extra keys ignored).
        corruptions: Corruptions to average over (default: the 15 benchmark corruptions).
        severities: Severities to average over (default 1-5).

    Returns:
        The mean accuracy, a fraction.
    """
    return float(np.mean(list(_select(accuracies, corruptions, severities, "accuracies").values())))


def mean_corruption_error(
    accuracies: Table, corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES
) -> float:
    """``1 - mean_corruption_accuracy``: the unnormalised mean corruption error reported for CIFAR-10-C."""
    return 1.0 - mean_corruption_accuracy(accuracies, corruptions, severities)


def per_corruption_mean(
    table: Table, corruptions: Sequence[str] = CORRUPTIONS, severities: Sequence[int] = SEVERITIES
) -> dict[str, float]:
    """Average a table over severities, one value per corruption (e.g. for a per-corruption bar chart).

    Args:
        table: ``{(corruption, severity): accuracy or error}``.
        corruptions: Corruptions to report.
        severities: Severities to average over.

    Returns:
        ``{corruption: mean over severities}``.
    """
    values = _select(table, corruptions, severities, "table")
    return {c: float(np.mean([values[(c, s)] for s in severities])) for c in corruptions}


def ce(errors: Mapping[int, float], reference_errors: Mapping[int, float]) -> float:
    """Corruption Error of one corruption: ``sum_s errors[s] / sum_s reference_errors[s]``.

    Args:
        errors: ``{severity: error}`` of the evaluated model on one corruption.
        reference_errors: ``{severity: error}`` of the reference model on the same corruption and severities.

    Returns:
        The CE as a ratio (1.0 = as good as the reference; x100 for the paper's %).
    """
    if set(errors) != set(reference_errors) or not errors:
        raise ValueError(
            f"errors and reference_errors must cover the same non-empty severities; got {sorted(errors)} "
            f"and {sorted(reference_errors)}"
        )
    total = sum(_check_fraction(errors[s], f"errors[{s}]") for s in errors)
    ref_total = sum(_check_fraction(reference_errors[s], f"reference_errors[{s}]") for s in errors)
    if ref_total == 0:
        raise ValueError("reference_errors must not all be 0 (CE divides by their sum)")
    return total / ref_total


def _by_severity(table: Table, corruption: str, severities: Iterable[int]) -> dict[int, float]:
    return {s: table[(corruption, s)] for s in severities}


def per_corruption_ce(
    errors: Table,
    reference_errors: Table,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
) -> dict[str, float]:
    """CE of every corruption (see :func:`ce`).

    Args:
        errors: ``{(corruption, severity): error}`` of the evaluated model.
        reference_errors: The same for the reference model.
        corruptions: Corruptions to report (default: the 15 benchmark corruptions).
        severities: Severities summed over (default 1-5).

    Returns:
        ``{corruption: CE}``.
    """
    errors = _select(errors, corruptions, severities, "errors")
    reference_errors = _select(reference_errors, corruptions, severities, "reference_errors")
    return {
        c: ce(_by_severity(errors, c, severities), _by_severity(reference_errors, c, severities)) for c in corruptions
    }


def mce(
    errors: Table,
    reference_errors: Table,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
) -> float:
    """Mean Corruption Error: the mean of :func:`per_corruption_ce` over ``corruptions`` (a ratio; x100 for %)."""
    return float(np.mean(list(per_corruption_ce(errors, reference_errors, corruptions, severities).values())))


def relative_ce(
    errors: Mapping[int, float],
    clean_error: float,
    reference_errors: Mapping[int, float],
    reference_clean_error: float,
) -> float:
    """Relative CE of one corruption: ``sum_s (errors[s] - clean_error) / sum_s (ref[s] - ref_clean)``.

    Args:
        errors: ``{severity: error}`` of the evaluated model on one corruption.
        clean_error: The evaluated model's error on the clean test set.
        reference_errors: ``{severity: error}`` of the reference model.
        reference_clean_error: The reference model's clean error.

    Returns:
        The relative CE as a ratio.
    """
    if set(errors) != set(reference_errors) or not errors:
        raise ValueError(
            f"errors and reference_errors must cover the same non-empty severities; got {sorted(errors)} "
            f"and {sorted(reference_errors)}"
        )
    clean = _check_fraction(clean_error, "clean_error")
    ref_clean = _check_fraction(reference_clean_error, "reference_clean_error")
    gap = sum(_check_fraction(errors[s], f"errors[{s}]") - clean for s in errors)
    ref_gap = sum(_check_fraction(reference_errors[s], f"reference_errors[{s}]") - ref_clean for s in errors)
    if ref_gap == 0:
        raise ValueError("reference_errors must differ from reference_clean_error (relative CE divides by the gap)")
    return gap / ref_gap


def relative_mce(
    errors: Table,
    clean_error: float,
    reference_errors: Table,
    reference_clean_error: float,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
) -> float:
    """Relative mCE: the mean of :func:`relative_ce` over ``corruptions`` (a ratio; x100 for %)."""
    errors = _select(errors, corruptions, severities, "errors")
    reference_errors = _select(reference_errors, corruptions, severities, "reference_errors")
    values = [
        relative_ce(
            _by_severity(errors, c, severities),
            clean_error,
            _by_severity(reference_errors, c, severities),
            reference_clean_error,
        )
        for c in corruptions
    ]
    return float(np.mean(values))


ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
"""AlexNet's top-1 error on each ImageNet-C corruption, averaged over the five severities: the normaliser of
ImageNet-C's CE and mCE (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019; the values released with their ImageNet-C evaluation code and used by AugMix's
``imagenet.py`` as ``ALEXNET_ERR``)."""


def imagenet_c_ce(accuracies: Table, severities: Sequence[int] = SEVERITIES) -> dict[str, float]:
    """ImageNet-C CE of every benchmark corruption present with all ``severities``, against AlexNet.

    ``CE_c = mean_s error[c, s] / ALEXNET_ERRORS[c]`` (equal to ``sum_s E / sum_s E_AlexNet``, since AlexNet's
    constants are its means over the five severities).

    Args:
        accuracies: ``{(corruption, severity): accuracy}``.
        severities: the severities a corruption must have (the five, for numbers comparable with published ones).

    Returns:
        ``{corruption: CE}`` for each corruption of :data:`ALEXNET_ERRORS` that is complete in ``accuracies``.
    """
    out = {}
    for name, reference in ALEXNET_ERRORS.items():
        if all((name, s) in accuracies for s in severities):
            errors = [1.0 - _check_fraction(accuracies[(name, s)], f"accuracies[{(name, s)}]") for s in severities]
            out[name] = float(np.mean(errors)) / reference
    return out
