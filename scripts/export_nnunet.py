"""Export completed BraTS cases as an nnU-Net v2 raw test set.

The program is guided_diffusion/commands/export_nnunet.py (installed as ``fast-cwdm-export-nnunet``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.export_nnunet import run

if __name__ == "__main__":
    run()
