"""Write a small synthetic BraTS-layout dataset (see guided_diffusion/demo_data.py).

The program is guided_diffusion/commands/make_demo_data.py (installed as ``fast-cwdm-make-demo-data``); --help lists its flags."""
import _bootstrap  # noqa: F401  (makes the repository importable from any folder)
from guided_diffusion.commands.make_demo_data import run

if __name__ == "__main__":
    run()
