"""``mbn-train`` under torchrun, instrumented for tests/test_distributed.py (run as a torchrun script).

With ``MBN_TEST_RECORD=DIR`` every rank writes ``DIR/rank<R>.pt``: the sample indices it trained on per epoch,
the seed of its domains' generator per step, a digest of each step's adversarial batch, and its final model
state, and ``DIR/rank<R>.pid`` when it starts. ``MBN_TEST_NAN_RANK``/``MBN_TEST_NAN_STEP`` make that rank's
clean loss NaN at that step. ``MBN_TEST_FAIL_STOP_SAVE=1`` makes rank 0's checkpoint after a stop signal fail to
write. ``MBN_TEST_BN_FREE=1`` trains :func:`tests.nets.bn_free_classifier` instead of the
recipe's network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import mbn.train.checkpoints
from mbn.cli.train import main
from mbn.data import ResumableBatches
from mbn.fileio import WriteError
from mbn.train.hooks import TrainHooks
from mbn.train.loop import Trainer
from mbn.train.step import MultiDomainStep

RANK = int(os.environ.get("RANK", "0"))
RECORD = os.environ.get("MBN_TEST_RECORD")
NAN_RANK = os.environ.get("MBN_TEST_NAN_RANK")
NAN_STEP = int(os.environ.get("MBN_TEST_NAN_STEP", "-1"))
log: dict[str, dict] = {"indices": {}, "seeds": {}, "adv": {}}

batch_indices = ResumableBatches.batch_indices


def recorded_batch_indices(self, epoch, start_batch=0):
    rows = batch_indices(self, epoch, start_batch)
    log["indices"].setdefault(epoch, []).extend(rows.flatten().tolist())
    return rows


generate = MultiDomainStep.generate


def recorded_generate(self, images, labels, at, generator, ledger, seconds=None):
    out = generate(self, images, labels, at, generator, ledger, seconds)
    log["seeds"][at.step] = generator.initial_seed()
    if "adv" in out:
        log["adv"][at.step] = float(out["adv"].images.double().sum())
    return out


forward_losses = MultiDomainStep.forward_losses
position = {"step": -1}


def nan_forward_losses(self, trained, batches):
    losses, accs = forward_losses(self, trained, batches)
    if NAN_RANK is not None and int(NAN_RANK) == RANK and position["step"] == NAN_STEP:
        losses["clean"] = losses["clean"] * float("nan")
    return losses, accs


run = MultiDomainStep.run


def positioned_run(self, batch, at, ledger, **kwargs):
    position["step"] = at.step
    return run(self, batch, at, ledger, **kwargs)


save_checkpoint = TrainHooks.save_checkpoint


def refuse_to_write(obj, path):
    raise WriteError(f"{Path(path).parent.name}/{Path(path).name}: cannot write (no space left on device)")


trainers: list[Trainer] = []


def failing_stop_save(self, state):
    if os.environ.get("MBN_TEST_FAIL_STOP_SAVE") and RANK == 0 and trainers and trainers[0].stopping:
        mbn.train.checkpoints.atomic_torch_save = refuse_to_write  # the write fails, after the ranks' collectives
    return save_checkpoint(self, state)


fit = Trainer.fit


def recorded_fit(self):
    trainers.append(self)
    try:
        return fit(self)
    finally:
        if RECORD:
            state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            torch.save({**log, "model": state}, Path(RECORD) / f"rank{RANK}.pt")


if os.environ.get("MBN_TEST_BN_FREE"):
    import mbn.builders
    from tests.nets import bn_free_classifier

    mbn.builders.create_model = bn_free_classifier  # type: ignore[assignment]

ResumableBatches.batch_indices = recorded_batch_indices
MultiDomainStep.generate = recorded_generate
MultiDomainStep.forward_losses = nan_forward_losses
MultiDomainStep.run = positioned_run
Trainer.fit = recorded_fit
TrainHooks.save_checkpoint = failing_stop_save

if __name__ == "__main__":
    if RECORD:
        (Path(RECORD) / f"rank{RANK}.pid").write_text(str(os.getpid()))
    sys.exit(main(sys.argv[1:]))
