"""The command-line programs, one module each (layer 5, above everything else in the package).

Each module has ``parse_args(argv)``, ``main(argv) -> exit code`` (what the tests call) and
``run()``, the console entry point of ``pyproject.toml`` (``fast-cwdm-<name>``) that
``scripts/<name>.py`` also calls. Shared plumbing is :mod:`guided_diffusion.cli`.
"""
