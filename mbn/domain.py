"""The Domain interface: a plugin that turns the clean batch into one data source's batch.

A domain runs on the training device inside the training step (AdvProp's adversarial examples are
generated on the fly against the current model, Xie et al. 2020 §3-4). The base class owns the
bookkeeping; a plugin fills :meth:`Domain.generate`.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mbn import rng
from mbn.errors import first_line
from mbn.heads import forward_heads
from mbn.objective import CLASSES, Objective
from mbn.routing import eval_mode, frozen_stats, use_source

ATTACK_BN_MODES: tuple[str, ...] = ("eval", "train", "train_update")


@dataclass(frozen=True)
class DomainContext:
    """What a domain may use while generating its batch; the trainer builds a fresh one per (micro-)batch (frozen).

    Attributes:
        model: the (unwrapped) classifier taking [0, 1] images; normalisation lives inside it.
        bn: the BN source this domain trains (and attacks) through.
        step: global optimisation step.
        epoch: current epoch.
        generator: seeded RNG on the training device; draw all randomness from it.
        seed: set by the trainer: a host integer unique to this domain and step, for libraries that draw from
            torch's global CPU generator (seed a forked one with it; reading ``generator`` on CUDA would sync).
        num_classes: number of classes of the task.
        objective: how the trainer scores this domain's batch (head and loss); an attack maximises it.
        accumulate: set by the trainer: ``(loss, images, weight, bn) -> d loss / d images`` that also adds
            ``weight`` times the loss's parameter gradients to this step's update (see :meth:`reuse_gradient`).
        stats_updates: filled by :meth:`attack_mode` ``("train_update")``: the domain asked to update BN statistics
            (the trainer refuses any other change to the model during ``generate``).
    """

    model: nn.Module
    bn: str
    step: int = 0
    epoch: int = 0
    generator: torch.Generator | None = None
    seed: int | None = None
    num_classes: int = 10
    objective: Objective = field(default_factory=Objective)
    accumulate: Callable[[Tensor, Tensor, float, str], Tensor] | None = None
    stats_updates: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        """The training device."""
        return next(self.model.parameters()).device

    # Random draws from ``generator`` (see :mod:`mbn.rng`): drawn on the generator's device, then moved to ``device``
    # (``None``: left where drawn). Use them rather than ``torch.rand(..., generator=ctx.generator)`` with
    # ``device=images.device``, which fails when the generator lives elsewhere (a CPU generator, CUDA images).

    def rand(self, shape: Sequence[int], *, device: rng.Device = None, dtype: torch.dtype | None = None) -> Tensor:
        """Uniform ``[0, 1)`` draws from ``ctx.generator``, on ``device``.

        Examples:
            >>> ctx = DomainContext(model=nn.Linear(1, 1), bn="clean", generator=torch.Generator().manual_seed(0))
            >>> images = torch.zeros(4, 3, 8, 8)
            >>> ctx.rand((4, 1, 1, 1), device=images.device, dtype=images.dtype).shape
            torch.Size([4, 1, 1, 1])
        """
        return rng.rand(shape, generator=self.generator, device=device, dtype=dtype)

    def randn(self, shape: Sequence[int], *, device: rng.Device = None, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normal draws from ``ctx.generator``, on ``device``."""
        return rng.randn(shape, generator=self.generator, device=device, dtype=dtype)

    def randint(self, low: int, high: int, shape: Sequence[int], *, device: rng.Device = None) -> Tensor:
        """int64 draws uniform in ``[low, high)`` from ``ctx.generator``, on ``device``."""
        return rng.randint(low, high, shape, generator=self.generator, device=device)

    def randperm(self, n: int, *, device: rng.Device = None) -> Tensor:
        """A random permutation of ``0 .. n-1`` from ``ctx.generator``, on ``device``."""
        return rng.randperm(n, generator=self.generator, device=device)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the objective's head for ``x``, routed through this domain's BN (train or eval mode)."""
        with use_source(self.model, self.bn):
            if self.objective.head == CLASSES:
                return self.model(x)
            return forward_heads(self.model, x, (self.objective.head,))[self.objective.head]

    def forward_heads(self, x: Tensor, heads: Sequence[str]) -> dict[str, Tensor]:
        """Logits of several heads from one forward of ``x`` through this domain's BN."""
        with use_source(self.model, self.bn):
            return forward_heads(self.model, x, heads)

    def reuse_gradient(self, weight: float) -> Callable[[Tensor, Tensor], Tensor]:
        """An ``input_grad`` for :mod:`mbn.attacks` that reuses the attack's backward pass for the weight update.

        Each attack step's loss gradient w.r.t. the images drives the attack as usual, and ``weight`` times its
        gradient w.r.t. the parameters is accumulated into this step's update ("free" adversarial training,
        Fast AdvProp's gradient reuse), so the attack's backward is not wasted.

        Raises:
            RuntimeError: outside the trainer (nothing to accumulate into).
        """
        accumulate = self.accumulate
        if accumulate is None:
            raise RuntimeError("gradient reuse needs the trainer's step to accumulate into (ctx.accumulate unset)")
        return lambda loss, images: accumulate(loss, images, weight, self.bn)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The objective's loss: what the trainer minimises on this batch and an attack maximises."""
        return self.objective.loss(logits, targets)

    @contextmanager
    def attack_mode(self, mode: str) -> Iterator[None]:
        """BN behaviour for attack forwards.

        ``eval``: running statistics, nothing updated (Xie's ImageNet adversarial-training attacker);
        ``train``: batch statistics, running statistics untouched;
        ``train_update``: batch statistics and running statistics updated (the Fast AdvProp code's attacker).
        """
        if mode == "eval":
            with eval_mode(self.model):
                yield
        elif mode == "train":
            with frozen_stats(self.model):
                yield
        elif mode == "train_update":
            self.stats_updates.append(self.bn)
            yield
        else:
            raise ValueError(f"attack_bn must be one of {list(ATTACK_BN_MODES)}, got {mode!r}")


class Domain(abc.ABC):
    """One data source: turns a clean ``(images, labels)`` batch into this source's batch.

    Subclasses take their recipe parameters as keyword arguments of ``__init__`` and implement
    :meth:`generate`. Images are float ``(N, C, H, W)`` in [0, 1] on the training device.

    Examples:
        >>> import mbn
        >>> @mbn.register_domain("invert_example")
        ... class Invert(mbn.Domain):
        ...     def generate(self, images, labels, ctx):
        ...         return 1.0 - images, labels
        >>> type(mbn.create_domain("invert_example")).__name__
        'Invert'
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Return this source's ``(images, targets)``; ``ctx.forward`` runs the model through its BN.

        Targets are what :meth:`objective` scores: class indices ``(N,)``, probabilities ``(N, K)``
        (soft labels), or a self-supervised head's targets.
        """

    def objective(self, default: Objective) -> Objective:
        """How the trainer scores this domain's batch; ``default``: the class head, the recipe's label smoothing."""
        return default

    def generation_cost(self) -> float:
        """Model forward-backward passes spent per input image to make the batch (budget matching); 0 by default."""
        return 0.0

    def heads(self) -> dict[str, int]:
        """Auxiliary heads this domain needs on the penultimate features, ``name -> outputs`` (none by default)."""
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"

    @classmethod
    def parameter_names(cls) -> list[str]:
        """Recipe parameters this domain accepts (its ``__init__`` keyword arguments)."""
        sig = inspect.signature(cls.__init__)
        return [p.name for p in list(sig.parameters.values())[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @classmethod
    def accepts_any_parameter(cls) -> bool:
        """True when ``__init__`` takes ``**kwargs``."""
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def build_domain(cls: type[Domain], name: str, params: dict[str, Any]) -> Domain:
    """Instantiate ``cls`` from recipe ``params``, naming the domain and parameter on any mismatch."""
    if not cls.accepts_any_parameter():
        allowed = cls.parameter_names()
        for key in params:
            if key not in allowed:
                raise ValueError(f"domain {name!r}: unknown parameter {key!r}; expected one of {allowed}")
    try:
        return cls(**params)
    except ValueError:
        raise
    except TypeError as err:
        raise ValueError(f"domain {name!r}: {err}") from err
    except (Exception, SystemExit, KeyboardInterrupt) as err:  # the plugin's own failure, not the user's Ctrl-C
        raise ValueError(f"domain {name!r}: its constructor raised {type(err).__name__}: {first_line(err)}") from err
