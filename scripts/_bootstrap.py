"""Imported first by every script in this folder: puts the repository root at the front of
``sys.path``, so ``python path/to/scripts/<name>.py`` runs this checkout's code from any folder,
without installing the project or setting PYTHONPATH."""
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
