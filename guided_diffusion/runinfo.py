"""What is saved beside every run and result: package versions, machine, command line."""
from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "numpy", "nibabel", "torchmetrics", "scipy", "safetensors", "huggingface_hub",
            "fast-cwdm")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_info(argv: list[str] | None = None) -> dict:
    import torch

    info = {"argv": list(sys.argv if argv is None else argv), "versions": package_versions(),
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
