r"""Fill in the missing modality of every case in a folder (BraSyn "auto" mode).

    python scripts/sample_auto.py --data_dir data/demo/pseudo_validation --model_dir runs/demo \
        [--out_dir completed/] [--checkpoint t1c=hf://org/repo/t1c.pt@<revision>] [--nfe 4]

(installed: ``fast-cwdm-sample-auto`` with the same flags).

For each case with exactly one of t1n/t1c/t2w/t2f missing, detects which, picks that modality's
model (or the all-modality model, ``--checkpoint all=SOURCE`` / <model_dir>/all/best.pt, for every
modality without a model of its own; docs/all_modality.md),
synthesises it and writes <out_dir>/<case>/<case>-<missing>.nii.gz on the case's original
grid with its header. Default output: a new folder <data_dir>_completed; --in_place writes into
the input folder (never overwriting a file). Bad cases are reported at the end (exit code 1).
``--num_samples M`` > 1: the written modality is the mean of M samples, with its per-voxel std
<case>-<missing>_std.nii.gz beside it (docs/uncertainty.md).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from guided_diffusion import case_runner, cli
from guided_diffusion.bratsloader import (CaseError, expected_path, load_case, save_volume, synthesis_description,
                                         to_original_grid)
from guided_diffusion.checkpoints import CheckpointError, ModelKindError, load_model, resolve_model_source
from guided_diffusion.conditioning import zero_outside_head
from guided_diffusion.ensembles import case_ensemble, save_ensemble
from guided_diffusion.fileio import save_json
from guided_diffusion.constants import ALL_TARGET, MODALITIES
from guided_diffusion.provenance import model_provenance
from guided_diffusion.runinfo import run_info
from guided_diffusion.synthesis import synthesize
from guided_diffusion.timesteps import plan_timesteps

logger = logging.getLogger("sample_auto")
CHECKPOINT_NAMES = ("{m}/best.pt", "{m}/latest.pt", "{m}.safetensors", "{m}.pt")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", required=True, help="folder of cases, each with exactly one modality missing")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MOD=SOURCE",
                   help="model for one modality: a local .pt/.safetensors path or hf://<org>/<repo>/<file>[@revision]"
                        " (repeatable; overrides --model_dir); MOD 'all': an all-modality model for every modality "
                        "without a model of its own")
    p.add_renamed_flag("--model", "--checkpoint")
    p.add_argument("--model_dir", default=None,
                   help="folder with one model per modality: <mod>/best.pt, <mod>/latest.pt, <mod>.safetensors or "
                        "<mod>.pt, and/or an all-modality model for the others: all/best.pt, all/latest.pt, "
                        "all.safetensors or all.pt")
    p.add_argument("--out_dir", default=None, help="output folder (default: <data_dir>_completed)")
    p.add_argument("--in_place", action="store_true", help="write into --data_dir itself (never overwrites a file)")
    p.add_argument("--hf_cache", default=None, help="Hugging Face cache folder (default: the hub's own)")
    p.add_argument("--resume", action="store_true",
                   help="record each finished case; a re-run skips the cases whose outputs are complete and "
                        "verified (SHA-256) and reports all of them (start the job with it too)")
    cli.add_sampling_arguments(p)
    cli.add_ensemble_arguments(p)
    return p.parse_args(argv)


def model_sources(args) -> dict[str, str]:
    """MOD (or ``all``) -> checkpoint source. A modality's model: its own ``--checkpoint MOD=``, else
    ``--checkpoint all=``, else <model_dir>'s model of the modality, else <model_dir>'s all-modality
    model (:func:`model_key` reads the result in that order)."""
    sources = {}
    if args.model_dir and not Path(args.model_dir).is_dir():
        raise ValueError(f"--model_dir {args.model_dir}: folder does not exist or is not a folder")
    if args.model_dir:
        for m in (*MODALITIES, ALL_TARGET):
            for pattern in CHECKPOINT_NAMES:
                path = Path(args.model_dir) / pattern.format(m=m)
                if path.is_file():
                    sources[m] = str(path)
                    break
    explicit = {}
    for spec in args.checkpoint:
        mod, sep, source = spec.partition("=")
        if not sep or mod not in (*MODALITIES, ALL_TARGET) or not source:
            raise ValueError(f"--checkpoint {spec!r}: expected MOD=SOURCE with MOD one of {(*MODALITIES, ALL_TARGET)}")
        explicit[mod] = source
    if ALL_TARGET in explicit:  # an explicit all-modality model comes before every model of the folder
        sources = {}
    return {**sources, **explicit}


def model_key(mod: str, sources: dict[str, str]) -> str | None:
    """Which entry of :func:`model_sources` synthesises ``mod``: its own, else ``all``, else None."""
    return mod if mod in sources else ALL_TARGET if ALL_TARGET in sources else None


def check_model_kind(loaded, key: str, source: str) -> None:
    """ModelKindError (fatal, before any case) for an all-modality model given for one modality
    or a single-modality model given as ``all``."""
    if key == ALL_TARGET and not loaded.all_modality:
        trained = loaded.target_modality or "an unknown modality"
        raise ModelKindError(f"{source}: given as the all-modality model (--checkpoint all=... or <model_dir>/all) "
                             f"but it is a single-modality model (trained for {trained}); give it as "
                             f"--checkpoint {loaded.target_modality or 'MOD'}={source}")
    if key != ALL_TARGET and loaded.all_modality:
        raise ModelKindError(f"{source}: given as the {key} model (--checkpoint {key}=... or <model_dir>/{key}) but it "
                             f"is an all-modality model; give it as --checkpoint all={source}")


def unused_path(path: Path) -> Path:
    """``path``, or ``<stem>_1<suffix>``, ``<stem>_2<suffix>`` ... : the first that does not exist
    (a re-run, e.g. with --in_place, never replaces an earlier report)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.check_ensemble_arguments(args)
    if args.in_place and args.out_dir:
        return cli.fatal("--in_place and --out_dir are exclusive")
    data_dir = Path(args.data_dir)
    out_dir = data_dir if args.in_place else Path(args.out_dir or f"{data_dir.resolve()}_completed")  # '.' too
    ranks = case_runner.ranks_from_env()  # torchrun: each rank completes its share, rank 0 writes the report
    device = case_runner.rank_device(cli.default_device(args.device), ranks)
    sources = model_sources(args)
    if not args.in_place and data_dir.is_dir():  # writing into the dataset is what --in_place is for
        cli.check_output_dir(out_dir, input_dir=data_dir)
    cases, failures, geometry = cli.find_cases(str(data_dir), "auto", check_data=False)
    needed = sorted({c.missing for c in cases})
    models, configs, model_errors, provenance = {}, {}, {}, {}
    by_key = {}  # "all" or MOD -> (loaded, config, provenance) | CheckpointError: the all-modality model loads once
    for mod in needed:
        key = model_key(mod, sources)
        if key is None:
            model_errors[mod] = (f"no model for {mod}: pass --checkpoint {mod}=<checkpoint> (or all=<all-modality "
                                 f"checkpoint>) or a --model_dir with {mod}/best.pt or all/best.pt")
            continue
        try:
            if key not in by_key:
                try:
                    path = resolve_model_source(sources[key], args.hf_cache)
                    loaded = load_model(path, device=device, cwdm_args=args.cwdm_args)
                    check_model_kind(loaded, key, sources[key])  # ModelKindError: fatal, nothing written
                    cli.check_fits_model(geometry, loaded, sources[key], str(data_dir))  # a CaseError is fatal too
                    cfg = cli.sample_config_from_args(args, cli.checkpoint_sample_defaults(loaded))
                    cli.check_sampler(cfg, loaded, sources[key])  # e.g. --sampler ddpm with a flow model
                    by_key[key] = (loaded, cfg, model_provenance(loaded, sources[key], path, cfg))
                except ModelKindError:
                    raise
                except CheckpointError as err:
                    by_key[key] = err
            if isinstance(by_key[key], CheckpointError):
                raise by_key[key]
            loaded, configs[mod], provenance[mod] = by_key[key]
            cli.check_model_target(loaded, mod, sources[key])
            models[mod] = loaded
        except ModelKindError:
            raise
        except CheckpointError as err:
            model_errors[mod] = str(err)
    order, share = [c.case_id for c in cases], case_runner.split_cases(cases, ranks)
    failures = failures if ranks.is_main else []  # every rank found the same bad cases: rank 0 reports them
    journal = case_runner.CaseJournal(out_dir) if args.resume else None
    settings = {mod: case_runner.settings_digest({
        "model_sha256": provenance[mod]["sha256"] if journal else None, "target": mod,
        "sample_config": configs[mod].to_dict(),
        "timesteps": plan_timesteps(models[mod].schedule, models[mod].fats_state, configs[mod].nfe,
                                    configs[mod].warm_start_t)[0],
        "keep_background": args.keep_background,
        **({"num_samples": args.num_samples, "save_samples": args.save_samples} if args.num_samples > 1 else {})})
        for mod in models}
    written, interrupted = [], None
    for case in tqdm(share, desc="complete", dynamic_ncols=True):
        target = case.missing
        out_path = expected_path(out_dir / case.case_id, target)
        try:
            if target in model_errors:
                raise CaseError(case.folder, model_errors[target])
            done = journal.completed(out_path, settings[target]) if journal else None
            if done is not None:  # finished by an earlier, interrupted run
                written.append(done)
                continue
            if out_path.exists():
                raise CaseError(out_path, "output exists; refusing to overwrite it")
            loaded = models[target]
            cfg = configs[target]
            timesteps, origin = plan_timesteps(loaded.schedule, loaded.fats_state, cfg.nfe, cfg.warm_start_t)
            data = load_case(case, geometry)
            volumes = torch.from_numpy(data.volumes)[None]
            progress = cli.step_progress(len(timesteps), f"{case.case_id} {target}")
            description = synthesis_description(target, cfg.sampler, len(timesteps), provenance[target]["sha256"])
            if args.num_samples > 1:  # the mean of an ensemble, its std map beside it
                ensemble = case_ensemble(loaded, volumes, target, cfg, case.case_id, args.num_samples, timesteps,
                                         keep_background=args.keep_background, callback=progress)
                save_ensemble(out_path, target, ensemble, geometry, data.reference, description,
                              save_samples=args.save_samples)
            else:
                pred = synthesize(loaded, volumes, target, cfg, [case.case_id], timesteps, callback=progress)
                pred = (pred if args.keep_background else zero_outside_head(pred, volumes, target))[0]
                save_volume(out_path, to_original_grid(pred.numpy(), geometry), data.reference,
                            description=description)
            written.append({"case_id": case.case_id, "missing": target, "output": str(out_path), "nfe": len(timesteps),
                            "timesteps_origin": origin,
                            **({"num_samples": args.num_samples} if args.num_samples > 1 else {})})
            if journal:
                journal.record(out_path, settings[target], written[-1])
        except Exception as err:  # any problem of one case is one line; the batch goes on
            failures.append(cli.case_error(err, out_path, log=logger))
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the temporary file is gone; report what was done
            interrupted = err
            if out_path.exists() and not any(w["output"] == str(out_path) for w in written):  # absent at the start
                written.append({"case_id": case.case_id, "missing": target, "output": str(out_path),
                                "note": "published just before the interruption"})
            else:
                failures.append(CaseError(out_path, f"not done: {err or 'interrupted'}"))
            break
    if not case_runner.collect(ranks, written, failures, "completed", order):  # rank 0 writes the report
        return cli.EXIT_OK  # and returns the exit code of all ranks
    if written or interrupted:
        save_json({"completed": written, "interrupted": (str(interrupted) or "interrupted") if interrupted else None, "models": sources, "model_provenance": provenance,
                   "background": cli.background_note(args.keep_background), "run": run_info(),
                   "failures": [str(f) for f in failures]}, unused_path(out_dir / "completion_report.json"))
    print(f"completed {len(written)} cases into {out_dir}; {len(failures)} failed")
    case_runner.finish(ranks)
    code = cli.report_failures(failures, "cases")
    return cli.interrupt_exit_code(interrupted) if interrupted else code


def run() -> None:
    """Console entry point ``fast-cwdm-sample-auto`` (and ``python scripts/sample_auto.py``)."""
    cli.main_guard(main)
