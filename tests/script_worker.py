"""A user's own training script under torchrun: builds a trainer from Python, never through ``mbn-train``.

Used by tests/test_distributed.py: every rank prints its rank, world size and whether DDP wraps the model, then
trains; the trainer must join the process group torchrun describes by itself.
"""

from __future__ import annotations

import sys

from mbn.config import load_recipe
from mbn.distributed import shutdown
from mbn.train import build_trainer

if __name__ == "__main__":
    recipe, run_dir, *overrides = sys.argv[1:]
    try:
        trainer = build_trainer(load_recipe(recipe, overrides), run_dir)
        dist = trainer.dist
        print(f"rank {dist.rank} of {dist.world_size}: ddp={trainer.runtime.ddp is not None}", flush=True)
        metrics = trainer.fit()
        print(f"rank {trainer.dist.rank}: steps={metrics['steps']} world_size={metrics['world_size']}", flush=True)
    finally:
        shutdown()
