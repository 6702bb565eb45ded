"""Measure FATS wavelet energy statistics of one target modality (design step 1).

The program is guided_diffusion/commands/fats_stats.py (installed as ``fast-cwdm-fats-stats``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.fats_stats import run

if __name__ == "__main__":
    run()
