r"""Export completed BraTS cases as an nnU-Net v2 raw test set (imagesTs/<case>_000{0..3}.nii.gz + dataset.json).

    python scripts/export_nnunet.py --data_dir data/BraSyn/pseudo_validation \
        --synth_dir data/BraSyn/pseudo_validation_completed --out nnUNet_raw/Dataset900_BraSyn

(installed: ``fast-cwdm-export-nnunet``). Channels: 0000 = t1n, 0001 = t1c, 0002 = t2w, 0003 = t2f, the order
of nnU-Net's BraTS conversion script (guided_diffusion/nnunet_export.py cites it). A modality missing from a
case of --data_dir is taken from --synth_dir (sample_auto.py's output). --out must not exist or be empty;
files are copied, the inputs are only read. Incomplete cases are skipped and listed at the end (exit code 1).
"""
from __future__ import annotations

import logging

from guided_diffusion import cli
from guided_diffusion.nnunet_export import export_nnunet

logger = logging.getLogger("export_nnunet")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", required=True, help="BraTS-layout folder of cases (only read)")
    p.add_argument("--synth_dir", default=None,
                   help="folder of <case>/<case>-<mod>.nii.gz syntheses filling the modalities --data_dir lacks")
    p.add_argument("--out", required=True, help="nnU-Net dataset folder to create (must not exist or be empty)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    exported, errors = export_nnunet(args.data_dir, args.out, args.synth_dir)
    print(f"exported {len(exported)} cases to {args.out}/imagesTs (+ dataset.json)")
    return cli.report_failures(errors, "cases")


def run() -> None:
    """Console entry point ``fast-cwdm-export-nnunet`` (and ``python scripts/export_nnunet.py``)."""
    cli.main_guard(main)
