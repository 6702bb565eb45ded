"""torchrun worker of test_ddp.py: ``scripts/train.py``'s program (guided_diffusion.commands.train), after which every rank saves
the weights it ended with to ``<run_dir>/<target>/rank<r>.pt`` (train.py itself saves on rank 0 only).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py <train.py flags>
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from guided_diffusion.commands import train  # noqa: E402


class RecordingTrainer(train.Trainer):
    def run(self, callback=None):
        summary = super().run(callback)
        torch.save({"model": self.model.state_dict(), "ema": self.ema.state_dict(), "step": self.step,
                    "rank": self.dist.rank, "world": self.dist.world,
                    "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None},
                   self.run_dir / f"rank{self.dist.rank}.pt")
        return summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    train.Trainer = RecordingTrainer
    sys.exit(train.main(sys.argv[1:]))
