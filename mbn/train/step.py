"""The multi-domain step: AdvProp's training step (Xie et al. 2020, Algorithm 1) for N domains and N BNs.

Read :meth:`MultiDomainStep.run` top to bottom::

    clean batch (B, C, H, W) in [0, 1]
      -> domains in dependency order, each on its input domain's batch     (generate)
      -> one forward per BN, or one split-batch forward for all BNs        (forward)
      -> each domain's objective on the logits of its head                 (losses)
      -> sum of weight x loss, back-propagated into .grad                  (backward)

In AdvProp's terms (2 BNs): the ``adv`` domain attacks the clean batch with PGD through the auxiliary BN
(``generate``); the clean images go through the main BN and the adversarial ones through the auxiliary BN, in one
forward (``forward``); their losses are added (``backward``). At test time only the main BN is kept.

Every value of a step flows through what the step returns (:class:`DomainBatch`, :class:`StepOutput`) or through the
:class:`UpdateLedger` of the optimisation step it belongs to (sample counts, attack gradients kept for the update);
nothing of a step is kept on ``self``. The randomness of a (micro-)batch is seeded from ``(trainer.seed, draw,
rank)``, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from mbn.config import DomainSpec
from mbn.domain import Domain, DomainContext
from mbn.domain_checks import ModelGuard, check_domain_output
from mbn.errors import DomainError
from mbn.gradnorm import SHARED, Owner
from mbn.objective import CLASSES, Objective
from mbn.rng import randperm
from mbn.routing import split_sources, use_source
from mbn.train.runtime import Batch, Runtime


@dataclass(frozen=True)
class StepPosition:
    """Where a (micro-)batch falls in training: what the domains' windows and seeds depend on."""

    step: int  # optimisation steps done before this one
    epoch: int
    draw: int  # which draw of randomness: step x grad_accum_steps + micro-batch
    fraction: float  # step / total steps: the domains' start/end windows


@dataclass(frozen=True)
class DomainBatch:
    """One domain's batch of a step: ``images`` (N, C, H, W) and ``targets``, made from ``source`` (its input)."""

    images: Tensor
    targets: Tensor
    source: Tensor  # the images the domain changed (its share of its input): the perturbation images


@dataclass(frozen=True)
class StepStats:
    """Each trained domain's loss, accuracy and batch size for one (micro-)batch, on the device."""

    losses: dict[str, Tensor]  # trained domains -> scalar loss
    accs: dict[str, Tensor]  # trained domains -> scalar accuracy
    sizes: dict[str, int]  # trained domains -> batch size
    finite: Tensor  # (len(losses),) bool: each trained domain's images were finite
    seconds: dict[str, float] = field(default_factory=dict)  # timed steps only: generate per domain, then "step"


@dataclass(frozen=True)
class StepOutput:
    """What one (micro-)batch produced: each domain's batch (image grids) and its statistics (logging)."""

    batches: dict[str, DomainBatch]  # every domain run this step (a domain only feeding another one too)
    stats: StepStats


@dataclass
class UpdateLedger:
    """What the micro-batches of one optimisation step leave for its update (:mod:`mbn.train.update`).

    ``counts``: weighted samples per parameter owner (``optim.grad_normalization=sample_mean``);
    ``reused``: attack gradients kept aside under DDP, averaged over the ranks before the update.
    """

    counts: dict[Owner, float] = field(default_factory=lambda: {SHARED: 0.0})
    reused: dict[Tensor, Tensor] = field(default_factory=dict)

    def count(self, samples: float, bn: str, head: str = CLASSES) -> None:
        """``samples`` reached the shared parameters, BN source ``bn`` and (unless the classifier) ``head``."""
        self.counts[SHARED] += samples
        self.counts[("bn", bn)] = self.counts.get(("bn", bn), 0.0) + samples
        if head != CLASSES:
            self.counts[("head", head)] = self.counts.get(("head", head), 0.0) + samples


class MultiDomainStep:
    """Generate, forward and back-propagate one (micro-)batch of every active domain.

    Args:
        runtime: device, forward, seeding (:class:`mbn.train.runtime.Runtime`).
        specs: the recipe's domains in dependency order.
        domains: the built domain plugins by name.
        objectives: how each domain is scored (head, loss).
        heads: auxiliary heads and their sizes.
        num_classes: the task's classes.
        total_steps: optimisation steps of the whole run (the domains' windows are fractions of it).
        accum_steps: micro-batches per optimisation step (``optim.grad_accum_steps``).
        sample_mean: ``optim.grad_normalization=sample_mean`` (losses summed over samples, counts ledgered).
        split_batch: ``trainer.split_batch`` (one forward for every BN).
        routed: the model has more than one BN source (else nothing is routed).
    """

    def __init__(
        self,
        runtime: Runtime,
        specs: Sequence[DomainSpec],
        domains: Mapping[str, Domain],
        objectives: Mapping[str, Objective],
        heads: Mapping[str, int],
        num_classes: int,
        *,
        total_steps: int,
        accum_steps: int = 1,
        sample_mean: bool = False,
        split_batch: bool = True,
        routed: bool = True,
    ) -> None:
        self.runtime, self.specs, self.domains, self.objectives = runtime, list(specs), dict(domains), dict(objectives)
        self.heads, self.num_classes = dict(heads), num_classes
        self.total_steps, self.accum_steps = total_steps, accum_steps
        self.sample_mean, self.split_batch, self.routed = sample_mean, split_batch, routed
        self.trainable = [p for p in runtime.model.parameters() if p.requires_grad]
        self.guard = ModelGuard(runtime.model)  # what a domain's generate() must leave as it found it
        self._by_name = {s.name: s for s in self.specs}
        self._checked: set[str] = set()  # domains whose first batch passed the contract check (once per run)

    @property
    def model(self) -> nn.Module:
        """The trained model (unwrapped: what the domains attack)."""
        return self.runtime.model

    def position(self, step: int, epoch: int, micro: int = 0) -> StepPosition:
        """The position of micro-batch ``micro`` of optimisation step ``step``."""
        return StepPosition(step, epoch, step * self.accum_steps + micro, step / max(1, self.total_steps))

    # ------------------------------------------------------------------------------------------- the step
    def run(self, batch: Batch, at: StepPosition, ledger: UpdateLedger, *, timed: bool = False) -> StepOutput:
        """One (micro-)batch: its gradients add to ``.grad``, its sample counts and reused gradients to ``ledger``.

        ``timed``: also measure each domain's ``generate`` and the whole (micro-)batch, in seconds (synchronising
        with the device around each: for a session's first step, not every step).
        """
        started = _clock(self.runtime.device) if timed else 0.0
        seconds: dict[str, float] = {}
        generator = self.runtime.seed_draw(at.draw)
        self.runtime.sync_buffers()  # every rank attacks with rank 0's BN statistics
        images, labels = self.runtime.to_device(batch)  # (B, C, H, W) in [0, 1], (B,)
        batches = self.generate(images, labels, at, generator, ledger, seconds if timed else None)
        trained = [s for s in self.specs if self.active(s, at)]  # a domain can run only to feed another's input
        losses, accs = self.forward_losses_or_blame(trained, batches)  # domain -> scalar, on the device
        sizes = {name: batches[name].images.shape[0] for name in losses}
        self.backward(losses, sizes, ledger)
        finite = torch.stack([torch.isfinite(batches[name].images).all() for name in losses])
        if timed:
            seconds["step"] = _clock(self.runtime.device) - started
        return StepOutput(batches, StepStats(losses, accs, sizes, finite, seconds))

    def generate(
        self,
        images: Tensor,
        labels: Tensor,
        at: StepPosition,
        generator: torch.Generator,
        ledger: UpdateLedger,
        seconds: dict[str, float] | None = None,
    ) -> dict[str, DomainBatch]:
        """Run every domain needed at ``at``, each on its ``input`` domain's batch or the clean one.

        ``seconds``: when given, each domain's ``generate`` time is added to it.
        """
        needed = self.needed(at)
        out: dict[str, DomainBatch] = {}
        shares: dict[str, tuple[Tensor, int]] = {}  # input -> (this draw's permutation, images handed out)
        for spec in self.specs:
            if spec.name not in needed:
                continue
            src = out[spec.input] if spec.input else None
            x, y = (src.images, src.targets) if src is not None else (images, labels)  # (N, C, H, W), (N, ...)
            if spec.fraction < 1.0:  # a seeded share of the input, disjoint from the other shares of that input
                x, y = _share(spec, x, y, generator, shares)  # (round(fraction x N), C, H, W)
            ctx = self.context(spec, at, generator, ledger)
            began = _clock(self.runtime.device) if seconds is not None else 0.0
            with self.runtime.autocast(attack=True):
                made = self.guard.generate(self.domains[spec.name], spec.name, spec.type, x, y, ctx, at.step + 1)
            if seconds is not None:
                seconds[spec.name] = _clock(self.runtime.device) - began
            if spec.name not in self._checked:  # the first batch only: no host sync in later steps
                made = check_domain_output(spec.name, made, x, self.target_size(spec.name))
                self._checked.add(spec.name)
            out[spec.name] = DomainBatch(made[0], made[1], x)
        return out

    def context(
        self, spec: DomainSpec, at: StepPosition, generator: torch.Generator, ledger: UpdateLedger
    ) -> DomainContext:
        """A fresh context for ``spec``'s domain at ``at``; gradient reuse adds to ``ledger``."""
        return DomainContext(
            model=self.model,
            bn=spec.bn,
            step=at.step,
            epoch=at.epoch,
            generator=generator,
            seed=(generator.initial_seed() + zlib.crc32(spec.name.encode())) % 2**63,  # per domain, host-side
            num_classes=self.num_classes,
            objective=self.objectives[spec.name],
            accumulate=partial(self.reuse_attack_gradient, ledger),  # Fast AdvProp: ctx.reuse_gradient adds here
        )

    def forward_losses(
        self, trained: Sequence[DomainSpec], batches: Mapping[str, DomainBatch]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward each trained domain's batch through its BN; per-domain objectives (weighted in backward)."""
        groups: dict[str, list[DomainSpec]] = {}
        for spec in trained:  # domains sharing a BN are normalised together (adversarial training)
            groups.setdefault(spec.bn, []).append(spec)
        logits = self.forward(groups, batches)  # domain -> logits of the head scoring it
        losses, accs = {}, {}
        for spec in trained:
            objective, targets = self.objectives[spec.name], batches[spec.name].targets
            losses[spec.name] = objective.loss(logits[spec.name], targets)
            accs[spec.name] = objective.correct(logits[spec.name], targets).mean()
        return losses, accs  # finiteness is checked on the device (StepMeter), read on logging steps

    def forward(self, groups: Mapping[str, list[DomainSpec]], batches: Mapping[str, DomainBatch]) -> dict[str, Tensor]:
        """Logits per domain: each BN's domains joined, every BN routed (one split forward, or one per BN)."""
        heads = tuple(dict.fromkeys(self.objectives[s.name].head for specs in groups.values() for s in specs))  # unique
        chunks = {bn: _cat([batches[s.name].images for s in specs]) for bn, specs in groups.items()}  # bn -> (sum N)
        ddp = self.runtime.ddp is not None
        per_bn: dict[str, dict[str, Tensor]]
        if not self.routed:  # one BN source: nothing to route
            per_bn = {bn: self.runtime.forward(x, heads) for bn, x in chunks.items()}
        elif (self.split_batch or ddp) and len(chunks) > 1:  # DDP: one forward per backward, so every BN in one
            shapes = {bn: tuple(x.shape[1:]) for bn, x in chunks.items()}
            if ddp and len(set(shapes.values())) > 1:
                raise DomainError(
                    f"under torchrun the batches of every BN go through one forward, so they need one image size; "
                    f"got {shapes}"
                )
            sizes = {bn: x.shape[0] for bn, x in chunks.items()}
            with split_sources(self.model, sizes):  # each BN layer normalises its rows with their source's BN
                joined = self.runtime.forward(torch.cat(list(chunks.values())), heads)  # head -> (sum of sizes, K)
            per_bn = {bn: {} for bn in sizes}
            for head, logits in joined.items():
                for bn, part in zip(sizes, logits.split(list(sizes.values())), strict=True):
                    per_bn[bn][head] = part
        else:
            per_bn = {}
            for bn, x in chunks.items():
                with use_source(self.model, bn):
                    per_bn[bn] = self.runtime.forward(x, heads)
        logits_of = {}
        for bn, specs in groups.items():  # each BN's logits back into its domains
            sizes_in_bn = [batches[s.name].images.shape[0] for s in specs]
            parts = {head: out.split(sizes_in_bn) for head, out in per_bn[bn].items()}
            logits_of.update({s.name: parts[self.objectives[s.name].head][i] for i, s in enumerate(specs)})
        return logits_of

    def backward(self, losses: Mapping[str, Tensor], sizes: Mapping[str, int], ledger: UpdateLedger) -> None:
        """Add the gradients of ``sum(weight x loss)`` (over ``grad_accum_steps``) to ``.grad``.

        With ``sample_mean`` the sum is over samples and the update divides each parameter's gradient by the
        weighted count of samples that reached it (:mod:`mbn.gradnorm`), which ``ledger`` counts.
        """
        # sample_mean: x N makes a per-sample sum (divided in the update by the ledger's counts); else the mean loss
        # over the micro-batches of the step
        terms = []
        for name, loss in losses.items():
            spec = self._by_name[name]
            terms.append(spec.weight * (sizes[name] if self.sample_mean else 1.0 / self.accum_steps) * loss)
            if self.sample_mean:
                ledger.count(spec.weight * sizes[name], spec.bn, self.objectives[name].head)
        total = terms[0]  # summed in recipe order, left to right (the order 0.3 summed in: bit-identical weights)
        for term in terms[1:]:
            total = total + term
        self.runtime.backward(total)  # out of memory: one line naming the keys to lower

    def reuse_attack_gradient(
        self, ledger: UpdateLedger, loss: Tensor, images: Tensor, weight: float, bn: str
    ) -> Tensor:
        """An attack step's ``d loss / d images``; ``weight`` x its parameter gradients join this step's update."""
        n = images.shape[0]
        scaled = loss * (weight * n if self.sample_mean else weight / self.accum_steps)
        grads = torch.autograd.grad(self.runtime.scaler.scale(scaled), [images, *self.trainable], allow_unused=True)
        # under DDP they are kept aside and averaged over the ranks after the backward (a parameter the training
        # forward does not reach would otherwise keep its rank's own gradient)
        kept = self.runtime.ddp is not None
        for p, g in zip(self.trainable, grads[1:], strict=True):
            if g is None:
                continue
            if kept:
                ledger.reused[p] = g if p not in ledger.reused else ledger.reused[p].add_(g)
            else:
                p.grad = g if p.grad is None else p.grad.add_(g)
        if self.sample_mean:
            ledger.count(weight * n, bn)
        return grads[0]

    # ------------------------------------------------------------------------------------------ helpers
    def forward_losses_or_blame(  # on failure, re-check every batch to name the domain at fault
        self, trained: Sequence[DomainSpec], batches: Mapping[str, DomainBatch]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`forward_losses`; when it fails, a domain whose batch breaks the contract is named instead."""
        try:
            return self.forward_losses(trained, batches)
        except (RuntimeError, IndexError, ValueError):
            for name, made in batches.items():  # the contract check again, on every batch of this step
                check_domain_output(name, (made.images, made.targets), made.source, self.target_size(name))
            raise

    def target_size(self, name: str) -> int:
        """Outputs of the head that scores domain ``name`` (the class count for the classifier)."""
        head = self.objectives[name].head
        return self.num_classes if head == CLASSES else self.heads[head]

    def active(self, spec: DomainSpec, at: StepPosition) -> bool:
        """``spec`` trains at ``at`` (its ``[start, end)`` window holds the fraction of training done)."""
        return spec.start <= at.fraction < spec.end

    def needed(self, at: StepPosition) -> set[str]:
        """The active domains and every domain they take their input from."""
        needed: set[str] = set()
        for spec in self.specs:
            cur: DomainSpec | None = spec if self.active(spec, at) else None
            while cur is not None and cur.name not in needed:
                needed.add(cur.name)
                cur = self._by_name[cur.input] if cur.input else None
        return needed


def _share(
    spec: DomainSpec, x: Tensor, y: Tensor, generator: torch.Generator, shares: dict[str, tuple[Tensor, int]]
) -> Batch:
    """``round(fraction * N)`` images of the input: the next slice of one seeded permutation per input and draw.

    Domains with a ``fraction`` of the same input get disjoint slices in recipe order while their fractions
    sum to at most 1 (Fast AdvProp: clean 0.8, attacked 0.2); beyond that the slices wrap around.
    """
    key, n = spec.input or "", x.shape[0]
    if key not in shares:  # drawn before any domain's own draws: reproducible whatever the domains do
        shares[key] = (randperm(n, generator=generator, device=x.device), 0)
    perm, used = shares[key]
    keep = max(1, round(spec.fraction * n))
    pick = perm[(torch.arange(used, used + keep, device=x.device) % n)] if used + keep > n else perm[used : used + keep]
    shares[key] = (perm, used + keep)
    return x.index_select(0, pick), y.index_select(0, pick)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # (sum of N, C, H, W)


def _clock(device: torch.device) -> float:
    """Seconds now, after the device's queued work (timed steps only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
