"""Train a Fast-cWDM model for one target modality (or each modality in turn).

The program is guided_diffusion/commands/train.py (installed as ``fast-cwdm-train``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.train import run

if __name__ == "__main__":
    run()
