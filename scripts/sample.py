"""Synthesise one modality for cases with ground truth, write NIfTI on the input grid, score it.

The program is guided_diffusion/commands/sample.py (installed as ``fast-cwdm-sample``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.sample import run

if __name__ == "__main__":
    run()
