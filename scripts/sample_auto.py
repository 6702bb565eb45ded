"""Fill in the missing modality of every case in a folder (BraSyn "auto" mode).

The program is guided_diffusion/commands/sample_auto.py (installed as ``fast-cwdm-sample-auto``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.sample_auto import run

if __name__ == "__main__":
    run()
