"""Optional dependencies (layer 0: imports nothing from the package).

The core (train, sample, complete missing modalities) needs only the dependencies that
``pyproject.toml`` lists under ``[project] dependencies``. Two side jobs need more, declared
as extras: ``demo`` (nilearn's MNI template, for the synthetic demo dataset) and ``figures``
(matplotlib, for PNG slice figures). Code that needs one imports it through
:func:`import_extra`, so a missing package is reported with the command that installs it.
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def import_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or MissingExtraError naming ``extra`` when its
    top-level package is not installed (any other import failure propagates unchanged, e.g. a
    missing submodule of an installed package).

    Args:
        module: e.g. ``"nilearn.datasets"``.
        extra: the ``[project.optional-dependencies]`` name that installs it, e.g. ``"demo"``.
        purpose: what needs it, for the message, e.g. ``"building the demo dataset"``.
    """
    package = module.partition(".")[0]
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as err:
        if err.name != package:
            raise
        raise MissingExtraError(f"{purpose} needs {package}, which is not installed: "
                                f"pip install 'fast-cwdm[{extra}]' (or pip install -e '.[{extra}]' in the repository)"
                                ) from None
    return importlib.import_module(module)
