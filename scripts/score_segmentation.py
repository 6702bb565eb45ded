"""Score a folder of syntheses by downstream segmentation (Dice / HD95 with each synthesis in place of the real modality).

The program is guided_diffusion/commands/score_segmentation.py (installed as ``fast-cwdm-score-segmentation``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.score_segmentation import run

if __name__ == "__main__":
    run()
