"""Measure the ideal-regressor floor and R_b/E_b per Haar band of the demo targets.

The program is guided_diffusion/commands/demo_floors.py (installed as ``fast-cwdm-demo-floors``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.demo_floors import run

if __name__ == "__main__":
    run()
