"""Build a pseudo-validation set: copy BraTS cases, dropping one modality per case.

The program is guided_diffusion/commands/drop_modality.py (installed as ``fast-cwdm-drop-modality``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.drop_modality import run

if __name__ == "__main__":
    run()
