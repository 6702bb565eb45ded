"""Learn K-step sampling timesteps for a checkpoint on held-out cases and store them in it.

The program is guided_diffusion/commands/fats_fit_steps.py (installed as ``fast-cwdm-fats-fit-steps``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.fats_fit_steps import run

if __name__ == "__main__":
    run()
