"""The self-supervision study: Kucer, Oyen & Kenyon, "On visual self-supervision and its effect on model
robustness" (2021), on CIFAR-10 with mbn's rotation domain.

Compared (one BN each, PGD L-inf eps 8/255 adversarial training as in Madry et al. 2018):

- ``at``: adversarial training;
- ``at_ssl_w05`` / ``at_ssl_w2``: plus the rotation loss of the rotated adversarial images "in tandem",
  weight 0.5 (Hendrycks et al. 2019) and 2;
- ``at_ssl_attack``: the rotation loss (weight 0.5) also drives the attack;
- ``at_pretrained``: adversarial training initialised from ``ssl_pretrain`` (rotation prediction only).

Claims checked, each against the seed spread: (a) tandem self-supervision raises robust accuracy at
eps_test <= eps_train and lowers it above, more so with a larger weight; (b) self-supervision in training
and attack is the most robust; (c) self-supervised pre-training helps adversarial training, while
self-supervision in tandem brings no gain in clean accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

EPS_TRAIN = 8.0  # 0-255; the recipes' eps
LINF_EPS = (2.0, 4.0, 8.0, 12.0, 16.0)  # eps_test from below to above eps_train
L2_EPS = (0.25, 0.5, 1.0)


class StudyConfig(NamedTuple):
    """A compared method: recipe, overrides, description, the config it starts from, and whether it is a row."""

    recipe: str
    overrides: tuple[str, ...] = ()
    about: str = ""
    init_from: str | None = None
    evaluate: bool = True
    attacks: bool = True  # has the ``adv`` domain that ATTACK_OVERRIDES tune


CONFIGS: dict[str, StudyConfig] = {
    "at": StudyConfig("recipes/advtrain_madry.yaml", about="adversarial training, PGD L-inf eps 8"),
    "at_ssl_w05": StudyConfig("recipes/advtrain_ssl.yaml", about="+ rotation loss in tandem, weight 0.5"),
    "at_ssl_w2": StudyConfig(
        "recipes/advtrain_ssl.yaml", ("domains.rot.weight=2",), "+ rotation loss in tandem, weight 2"
    ),
    "at_ssl_attack": StudyConfig(
        "recipes/advtrain_ssl_attack.yaml", about="+ rotation loss (0.5) in training and in the attack"
    ),
    "ssl_pretrain": StudyConfig(
        "recipes/ssl_pretrain.yaml", about="rotation prediction only (pre-training)", evaluate=False, attacks=False
    ),
    "at_pretrained": StudyConfig(
        "recipes/advtrain_madry.yaml", about="adversarial training from ssl_pretrain", init_from="ssl_pretrain"
    ),
}

#: Extra mbn-train overrides per scale (on top of the harness's scale settings).
SCALE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "smoke": (),
    # Within ~1 h on 2 idle cores for 3 seeds: half the cpu scale's training images, 3 epochs.
    "cpu": ("data.train_limit=5000", "trainer.epochs=3"),
    "gpu": (),  # the recipes as shipped: 30 epochs
}
#: Overrides of the training attack per scale, for the configs with one (cpu: PGD-3, step 3/255, eps 8).
ATTACK_OVERRIDES: dict[str, tuple[str, ...]] = {
    "smoke": (),
    "cpu": ("domains.adv.steps=3", "domains.adv.step_size=3"),
    "gpu": (),  # PGD-7, step 2/255 as shipped
}
EVAL_LIMIT = {"smoke": 16, "cpu": 500, "gpu": None}

METRICS = (
    "clean_acc",
    "corruption_acc",
    *(f"pgd_linf_{e:g}" for e in LINF_EPS),
    *(f"pgd_l2_{e:g}" for e in L2_EPS),
    "train_time_s",
)
HEADERS = {
    "clean_acc": "clean (%)",
    "corruption_acc": "C-10-C (%)",
    **{f"pgd_linf_{e:g}": f"L∞ {e:g}" for e in LINF_EPS},
    **{f"pgd_l2_{e:g}": f"L2 {e:g}" for e in L2_EPS},
    "train_time_s": "train (s)",
}


def run_values(metrics: Mapping[str, Any], evaluation: Mapping[str, Any]) -> dict[str, float | None]:
    """The table's numbers for one run."""
    adv = evaluation["adversarial"]
    return {
        "clean_acc": float(evaluation["clean_acc"]),
        "corruption_acc": float(evaluation["corruptions"]["mean_acc"]),
        **{f"pgd_linf_{e:g}": _get(adv["linf"], e) for e in LINF_EPS},
        **{f"pgd_l2_{e:g}": _get(adv["l2"], e) for e in L2_EPS},
        "train_time_s": float(metrics["train_time_s"]),
    }


def _get(table: Mapping[str, float], eps: float) -> float | None:
    return float(table[f"{eps:g}"]) if f"{eps:g}" in table else None


class Comparison(NamedTuple):
    """``a - b`` of one metric in points, the seed noise (larger seed std), and the judgement."""

    diff: float
    noise: float | None
    judged: str  # "higher", "lower" (beyond noise) or "within noise"


def compare(summary: Mapping[str, Mapping[str, Any]], a: str, b: str, metric: str) -> Comparison | None:
    """Difference of means of ``a`` and ``b`` against the larger of their seed standard deviations."""
    if a not in summary or b not in summary:
        return None
    sa, sb = summary[a][metric], summary[b][metric]
    if sa["mean"] is None or sb["mean"] is None:
        return None
    diff = (sa["mean"] - sb["mean"]) * 100
    stds = [s["std"] for s in (sa, sb) if s["std"] is not None]
    noise = max(stds) * 100 if len(stds) == 2 else None
    if noise is None or abs(diff) <= noise:
        return Comparison(diff, noise, "within noise")
    return Comparison(diff, noise, "higher" if diff > 0 else "lower")


def _fmt(c: Comparison | None) -> str:
    if c is None:
        return "n/a"
    noise = f"{c.noise:.2f}" if c.noise is not None else "n/a"
    return f"{c.diff:+.2f} (noise {noise}, {c.judged})"


def _outcome(supporting: Sequence[bool], contradicting: Sequence[bool]) -> str:
    if any(contradicting):
        return "did not hold"
    if supporting and all(supporting):
        return "held"
    return "within seed noise"


def verdicts(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One plain verdict per claim (held / did not hold / within seed noise), with the numbers behind it."""
    lines = []
    below = [e for e in LINF_EPS if e <= EPS_TRAIN]
    above = [e for e in LINF_EPS if e > EPS_TRAIN]
    for tandem in ("at_ssl_w05", "at_ssl_w2"):
        lo = [compare(summary, tandem, "at", f"pgd_linf_{e:g}") for e in below]
        hi = [compare(summary, tandem, "at", f"pgd_linf_{e:g}") for e in above]
        if any(c is None for c in lo + hi):
            continue
        outcome = _outcome(
            [c.judged == "higher" for c in lo] + [c.judged == "lower" for c in hi],  # type: ignore[union-attr]
            [c.judged == "lower" for c in lo] + [c.judged == "higher" for c in hi],  # type: ignore[union-attr]
        )
        detail = ", ".join(f"{e:g}: {_fmt(c)}" for e, c in zip(below + above, lo + hi, strict=True))
        lines.append(f"(a) {tandem} vs at, L∞ robust acc by eps_test (eps_train {EPS_TRAIN:g}): {outcome}; {detail}")
    trend = [compare(summary, "at_ssl_w2", "at_ssl_w05", f"pgd_linf_{e:g}") for e in above]
    if trend and all(c is not None for c in trend):
        outcome = _outcome([c.judged == "lower" for c in trend], [c.judged == "higher" for c in trend])  # type: ignore[union-attr]
        detail = ", ".join(f"{e:g}: {_fmt(c)}" for e, c in zip(above, trend, strict=True))
        lines.append(f"(a) larger weight lowers robust acc above eps_train more (w2 vs w0.5): {outcome}; {detail}")
    metric = f"pgd_linf_{EPS_TRAIN:g}"
    others = [c for c in CONFIGS if c not in ("at_ssl_attack", "ssl_pretrain")]
    rivals = {o: compare(summary, "at_ssl_attack", o, metric) for o in others}
    if rivals and all(c is not None for c in rivals.values()):
        outcome = _outcome(
            [c.judged == "higher" for c in rivals.values()],  # type: ignore[union-attr]
            [c.judged == "lower" for c in rivals.values()],  # type: ignore[union-attr]
        )
        detail = ", ".join(f"vs {o} {_fmt(c)}" for o, c in rivals.items())
        lines.append(f"(b) at_ssl_attack most robust (L∞ {EPS_TRAIN:g}): {outcome}; {detail}")
    pre = [compare(summary, "at_pretrained", "at", m) for m in (metric, "clean_acc")]
    if all(c is not None for c in pre):
        outcome = _outcome([c.judged == "higher" for c in pre[:1]], [c.judged == "lower" for c in pre[:1]])  # type: ignore[union-attr]
        lines.append(
            f"(c) self-supervised pre-training helps adversarial training (at_pretrained vs at, L∞ {EPS_TRAIN:g}): "
            f"{outcome}; robust {_fmt(pre[0])}; clean {_fmt(pre[1])}"
        )
    clean = {t: compare(summary, t, "at", "clean_acc") for t in ("at_ssl_w05", "at_ssl_w2")}
    if all(c is not None for c in clean.values()):
        # the claim is a null result: it holds unless tandem self-supervision raises clean accuracy beyond noise
        outcome = "did not hold" if any(c.judged == "higher" for c in clean.values()) else "held"  # type: ignore[union-attr]
        detail = ", ".join(f"{t} {_fmt(c)}" for t, c in clean.items())
        lines.append(f"(c) tandem self-supervision brings no clean-accuracy gain over at: {outcome}; {detail}")
    return lines


def render_table(summary: Mapping[str, Mapping[str, Any]], n_seeds: int) -> list[str]:
    """The markdown table: one row per evaluated config, mean ± std in percent (train time in seconds)."""
    lines = [
        "| config | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for config, stats in summary.items():
        cells = []
        for m in METRICS:
            st = stats[m]
            if st["mean"] is None:
                cells.append("-")
                continue
            scale, digits = (1.0, 0) if m == "train_time_s" else (100.0, 1)
            text = f"{st['mean'] * scale:.{digits}f}"
            if st["std"] is not None:
                text += f" ± {st['std'] * scale:.{digits}f}"
            if st["n"] < n_seeds:
                text += f" (n={st['n']})"
            cells.append(text)
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return lines
