"""Budget matching: train a recipe for the compute another recipe would spend (Fast AdvProp's "same budget").

The cost of a step is counted in forward-backward passes per image of the clean batch: every image a domain
trains on costs one, and a domain spends :meth:`~mbn.domain.Domain.generation_cost` passes per input image
making its batch (a PGD-k attack: k). A domain gets ``fraction`` of its input's images and is active for
``end - start`` of the run. With ``trainer.budget_of=vanilla``, ``trainer.epochs`` is read as the baseline's
epochs and the run trains ``round(epochs * cost(baseline) / cost(recipe))`` epochs; the learning-rate milestones,
warm-up and domain windows are fractions of the run and scale with it. Example: Fast AdvProp (4 in 5 images
trained clean, 1 in 5 attacked by PGD-1 and trained adversarially) costs ``0.8 + 0.2 * (1 + 1) = 1.2`` per step,
so 105 vanilla epochs become 88, as in the official code. An epoch of a recipe with ``data.aug_repeats=k`` is k
passes over the images and costs k times as much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mbn.config import DomainSpec, RecipeError, domain_specs, load_recipe
from mbn.domain import Domain
from mbn.shipped import shipped_recipes


def step_cost(specs: Sequence[DomainSpec], domains: Mapping[str, Domain]) -> float:
    """Average forward-backward passes per clean-batch image of one step over the run."""
    by_name = {s.name: s for s in specs}

    def share(spec: DomainSpec) -> float:  # of the clean batch's images this domain receives
        return spec.fraction * (share(by_name[spec.input]) if spec.input else 1.0)

    return sum((s.end - s.start) * share(s) * (1.0 + domains[s.name].generation_cost()) for s in specs)


def baseline_path(name: str) -> Path:
    """A shipped recipe's name (``vanilla``) or a recipe file."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = shipped_recipes().get(name, path)
    if not path.is_file():
        raise RecipeError(f"key 'trainer.budget_of': no recipe {name!r} (a shipped recipe name or a YAML file)")
    return path


def matched_epochs(
    epochs: int, specs: Sequence[DomainSpec], domains: Mapping[str, Domain], baseline: str, *, repeats: int | None = 1
) -> int:
    """Epochs of this recipe that cost what ``epochs`` of ``baseline`` cost (at least 1).

    ``repeats``: this recipe's ``data.aug_repeats`` (an epoch is that many passes over the images); the baseline's
    own is read from it.
    """
    from mbn.builders import build_domains

    try:
        base_cfg = load_recipe(baseline_path(baseline))
    except RecipeError as err:  # the message names the baseline's file; say which key pointed at it
        raise RecipeError(f"key 'trainer.budget_of': {err}") from None
    base_specs = domain_specs(base_cfg)
    base_cost = step_cost(base_specs, build_domains(base_specs)) * passes(base_cfg.data.get("aug_repeats"))
    cost = step_cost(specs, domains) * passes(repeats)
    return max(1, round(round(epochs * base_cost / cost, 9)))  # 87.4999... is 87.5


def passes(aug_repeats: int | None) -> int:
    """Passes over the training images an epoch makes: ``data.aug_repeats`` (0 or 1: one)."""
    return max(1, int(aug_repeats or 0))
