"""A training process that loses another (a DataLoader worker, a peer rank) ends in one line, its checkpoint kept."""

from __future__ import annotations

import pytest

import mbn
from mbn.checkpoint import load_checkpoint
from tests.runs import VANILLA, one_line_error, train


def test_a_killed_dataloader_worker_is_one_line_with_the_checkpoint_kept(tmp_path, capsys, scratch_registry):
    import multiprocessing
    import os
    import signal

    @mbn.register_domain("kills_a_worker_test")
    class KillsAWorker(mbn.Domain):  # the OOM killer's SIGKILL, as it would pick a worker
        def generate(self, images, labels, ctx):
            if ctx.step == 2:
                workers = multiprocessing.active_children()
                assert workers, "the loader has workers"
                os.kill(workers[0].pid, signal.SIGKILL)
            return images, labels

    run = tmp_path / "run"
    code = train(VANILLA, run, "trainer.max_steps=8", "trainer.checkpoint_every_steps=1", "data.num_workers=2",
                 "domains.odd.type=kills_a_worker_test", "domains.odd.weight=0")  # fmt: skip
    assert code == 1
    err = one_line_error(capsys)
    assert "mbn-train: error: a DataLoader worker died (worker (pid" in err, err
    assert "out of memory? lower data.num_workers or data.batch_size" in err, err
    assert f"the last checkpoint in {run / 'checkpoints'} is kept (resume with: mbn-train --resume {run})" in err, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] >= 2


def test_a_dead_worker_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch):
    from mbn.train.loop import Trainer

    real = Trainer.train_step

    def dies_at_step_3(self, group):
        if self.state.step == 2:
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
        return real(self, group)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_3)
    run = tmp_path / "run"
    assert train(VANILLA, run, "trainer.max_steps=4", "trainer.checkpoint_every_steps=1") == 1
    err = one_line_error(capsys)
    assert err.startswith("mbn-train: error: a DataLoader worker died (worker (pid(s) 4242) exited unexpectedly)"), err
    assert err.endswith(f"the last checkpoint in {run / 'checkpoints'} is kept (resume with: mbn-train --resume {run})")


PEER = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]")


@pytest.mark.parametrize(
    ("error", "distributed", "expected"),
    [
        (PEER, True, "another rank stopped (its message is above, or it was killed)"),
        (PEER, False, None),  # one process has no peer
        (RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed."), False, "a DataLoader worker died"),
        (RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ..."), False, None),
        (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage, ncclInvalidUsage"), True, None),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), True, None),
    ],
)
def test_only_a_death_is_translated(error, distributed, expected):
    from mbn.cli.train import lost_process

    said = lost_process(error, distributed)
    assert said == expected if expected is None else said is not None and said.startswith(expected), said
