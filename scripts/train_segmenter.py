"""Train the downstream tumour segmenter (MONAI SegResNet) on the real four modalities of BraTS cases.

The program is guided_diffusion/commands/train_segmenter.py (installed as ``fast-cwdm-train-segmenter``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.train_segmenter import run

if __name__ == "__main__":
    run()
