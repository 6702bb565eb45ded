"""Seconds per synthesised volume and peak memory at K network evaluations (NFE).

One volume = ``guided_diffusion.synthesis.synthesize_volumes``, the pipeline ``sample.py`` runs:
DWT of the three conditioning volumes (once), the case's seeded noise, deterministic DDIM
(eta = 0) over ``plan_timesteps(schedule, None, K)`` (K uniform steps) of the linear schedule
with cWDM's clipping (IDWT -> clamp [0, 1] -> DWT of every x0 prediction), the precision applied
by the denoiser, the IDWT of the result; then the copy to the host and writing it as a gzipped
NIfTI with nibabel (on the network grid; the crop back to BraTS's grid is not included).

The network is wrapped in a timing module (device synchronised before and after each call;
the bf16 autocast and the cast back stay in the denoiser around it), and the sampler's callback
marks the end of the loop, so each volume's time splits into network time, the sampling loop,
NIfTI writing time and the rest (wavelet transforms, clipping, sampler arithmetic).

K values above ``--max_measured_k`` are not run: their time is extrapolated as
seconds(K) = fixed + per_step * K, with the once-per-volume time and the sampling loop's time
per step measured at the largest measured K, and they are marked ``"extrapolated": true``.

Peak memory: see benchmarks/common.py; in a fresh worker process, counted from before the
model is built and reset before every volume. fp32 and bf16 volumes alternate
in that process so that both see the same machine load.

The JSON also holds an audit of what the sampler does on the host per step: the sampler runs
once with model and data on the ``meta`` device, and a dispatch mode records every operation
that copies between the host and the device or runs on host tensors, with its source line.
On CUDA, each such copy from pageable memory is a synchronising ``cudaMemcpy``.

Run:
  python benchmarks/bench_sampling.py --config demo --device cpu --repeats 3
  python benchmarks/bench_sampling.py --config full --device cpu --k 1 --repeats 1 --warmup 0
  python benchmarks/bench_sampling.py --config full --device cuda --max_measured_k 100
Results are merged into benchmarks/results/sampling.json under the key "<config>/<device>".
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    PeakMemory, benchmark_parser, command_line, default_cpu_memory_limit, machine, preset, run_isolated, save_entry,
    setup_worker, skip_reason, sync, warm_runtime,
)
from guided_diffusion.config import SampleConfig  # noqa: E402
from guided_diffusion.constants import PRECISIONS  # noqa: E402
from guided_diffusion.diffusion import randn  # noqa: E402
from guided_diffusion.factory import build_model  # noqa: E402
from guided_diffusion.timesteps import plan_timesteps  # noqa: E402
from guided_diffusion.schedules import linear  # noqa: E402
from guided_diffusion.synthesis import synthesize_volumes  # noqa: E402

K_VALUES = (1, 2, 4, 10, 100, 1000)
TARGET_MODALITY = "t2f"
REPO_ROOT = Path(__file__).resolve().parents[1]


class TimedNetwork(nn.Module):
    """Wraps the network: device sync around the call, time and count; records the first call's start."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.seconds, self.calls, self.first_start = 0.0, 0, None

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        sync(x.device)
        start = time.perf_counter()
        out = self.model(x, t, **kwargs)
        sync(x.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.first_start = start if self.first_start is None else self.first_start
        return out


def synthesize_volume(net: TimedNetwork, schedule, volumes: torch.Tensor, k: int, precision: str,
                      out_path: Path) -> dict:
    """One full synthesis (``synthesize_volumes``) at K NFEs, written to ``out_path``; its timings
    (seconds) and NFE.

    volumes: (1, 4, X, Y, Z) on the device. ``loop_s`` runs from the first network call to the
    sampler's last callback; ``fixed_s`` is everything else done once per volume (conditioning
    DWT, x_T, final IDWT, copy to host, NIfTI write), of which ``nifti_write_s`` is the write.
    """
    device = volumes.device
    net.reset()
    loop_end = []

    def mark_step(_info: dict) -> None:
        sync(device)
        loop_end[:] = [time.perf_counter()]

    cfg = SampleConfig(sampler="ddim", eta=0.0, precision=precision, seed=0)
    sync(device)
    start = time.perf_counter()
    synthesis = synthesize_volumes(net, schedule, volumes, TARGET_MODALITY, cfg, ["bench"],
                                   plan_timesteps(schedule, None, k)[0], callback=mark_step)
    volume = synthesis[0].cpu().numpy()
    io_start = time.perf_counter()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(out_path))
    end = time.perf_counter()
    total, loop = end - start, loop_end[0] - net.first_start
    return {"total_s": total, "network_s": net.seconds, "loop_s": loop, "fixed_s": total - loop,
            "nifti_write_s": end - io_start, "nfe": net.calls}


def measure_sampling(spec: dict) -> dict:
    """All measured K for one (config, device), the precisions interleaved volume by volume so
    that they see the same machine load. Runs in a worker process."""
    device, cfg, shape = setup_worker(spec)
    warm_runtime(device)
    memory = PeakMemory(device).start()
    results = {p: {} for p in spec["precisions"]}
    try:
        torch.manual_seed(0)
        net = TimedNetwork(build_model(cfg).to(device).eval().requires_grad_(False))
        schedule = linear()
        volumes = torch.rand((1, 4, *shape), generator=torch.Generator(device).manual_seed(0), device=device)
        with tempfile.TemporaryDirectory() as tmp:
            out_path = Path(tmp) / "synthesis.nii.gz"
            for _ in range(spec["warmup"]):
                for precision in spec["precisions"]:
                    synthesize_volume(net, schedule, volumes, 1, precision, out_path)
            for k in spec["k_values"]:
                for _ in range(spec["repeats"]):
                    for precision in spec["precisions"]:
                        memory.reset_peak()
                        run = synthesize_volume(net, schedule, volumes, k, precision, out_path)
                        run["peak_memory_bytes"] = memory.peak_bytes()
                        results[precision].setdefault(k, []).append(run)
    except Exception as err:  # noqa: BLE001 - recorded as a skip
        return {"skipped": True, "reason": skip_reason(err)}
    return {"skipped": False, "by_precision": results, "peak_memory_method": memory.method}


def _summary(k: int, runs: list[dict]) -> dict:
    med = {key: statistics.median(r[key] for r in runs)
           for key in ("total_s", "network_s", "nifti_write_s", "fixed_s", "loop_s")}
    outside = [(r["total_s"] - r["network_s"]) / r["total_s"] for r in runs]
    return {
        "k": k, "nfe": runs[0]["nfe"], "extrapolated": False, "seconds_per_volume": med["total_s"],
        "times_s": [r["total_s"] for r in runs], "network_seconds": med["network_s"],
        "network_seconds_per_nfe": med["network_s"] / max(runs[0]["nfe"], 1),
        "nifti_write_seconds": med["nifti_write_s"], "fixed_per_volume_seconds": med["fixed_s"],
        "loop_seconds": med["loop_s"],
        "outside_network_seconds": statistics.median(r["total_s"] - r["network_s"] for r in runs),
        "outside_network_seconds_excluding_nifti": statistics.median(
            r["total_s"] - r["network_s"] - r["nifti_write_s"] for r in runs),
        "outside_network_fraction": statistics.median(outside),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
    }


def _extrapolate(k: int, measured: list[dict], runs_at_kmax: list[dict]) -> dict:
    """seconds(K) = fixed + per_step * K, both taken from the largest measured K (most steps,
    so the least noisy per-step figure): fixed = the once-per-volume work, per_step = the
    sampling loop's time per step; the network time per NFE likewise."""
    kmax = measured[-1]["k"]
    fixed = statistics.median(r["fixed_s"] for r in runs_at_kmax)
    per_step = statistics.median(r["loop_s"] / r["nfe"] for r in runs_at_kmax)
    net_per_nfe = statistics.median(r["network_s"] / r["nfe"] for r in runs_at_kmax)
    nfe = len(plan_timesteps(linear(n_bands=1), None, k)[0])
    total, network = fixed + per_step * nfe, net_per_nfe * nfe
    return {
        "k": k, "nfe": nfe, "extrapolated": True, "extrapolated_from_k": kmax,
        "seconds_per_volume": total, "network_seconds": network,
        "outside_network_fraction": max(total - network, 0.0) / total,
        "fit_seconds": {"fixed_per_volume_s": fixed, "per_step_s": per_step, "network_per_nfe_s": net_per_nfe},
        "peak_memory_bytes": None,
    }


# --------------------------------------------------------------------------- host-side audit

class _HostAudit(TorchDispatchMode):
    """Records ops that move data between host and device, or run on host tensors."""

    def __init__(self, watch: dict[str, tuple[int, ...]] | None = None):
        super().__init__()
        self.events: Counter = Counter()
        self.bytes: Counter = Counter()
        self.watch = watch or {}  # name -> shape: also count ops that read a tensor of that shape

    def _watched(self, func, args, kwargs) -> None:
        shapes = {tuple(a.shape) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for name, shape in self.watch.items():
            if shape in shapes:
                self.events[(f"reads_{name}", str(func.overloadpacket.__name__), _call_site())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.watch:
            self._watched(func, args, kwargs)
        devs_in = {a.device.type for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        devs_out = {o.device.type for o in tree_leaves(out) if isinstance(o, torch.Tensor)}
        if devs_in == {"cpu"} and "cpu" not in devs_out and devs_out:
            kind = "host_to_device_copy"
        elif devs_out == {"cpu"} and devs_in and "cpu" not in devs_in:
            kind = "device_to_host_copy"
        elif devs_in <= {"cpu"} and devs_out <= {"cpu"}:
            kind = "host_op"
        else:
            return out
        key = (kind, str(func.overloadpacket.__name__), _call_site())
        self.events[key] += 1
        if kind != "host_op":
            self.bytes[key] += sum(o.numel() * o.element_size()
                                   for o in tree_leaves(out) if isinstance(o, torch.Tensor))
        return out


def _call_site() -> str:
    """Innermost frame of project code (not this benchmark), as 'path:line: code'."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if REPO_ROOT in path.parents and path.parent.name != "benchmarks":
            return f"{path.relative_to(REPO_ROOT)}:{frame.lineno}: {(frame.line or '').strip()}"
    return "?"


def audit_host_work(config: str = "tiny", sampler: str = "ddim") -> dict:
    """Per-step host<->device copies and host ops of ``synthesize_volumes``, found on the meta device.

    Runs the synthesis (without I/O) for K = 1 and K = 3 with the model on ``meta`` (shapes only,
    so any config is cheap; host-side work is real); the per-step figures are
    (count(K=3) - count(K=1)) / 2, i.e. those of an intermediate step.
    """
    cfg, shape = preset(config)
    device = torch.device("meta")
    model = build_model(cfg).to(device).eval()
    schedule = linear()
    sample_cfg = SampleConfig(sampler=sampler, eta=0.0, seed=0)
    counts, sizes = {}, {}
    for k in (1, 3):
        half = tuple(s // 2 for s in shape)
        watch = {"conditioning_volumes": (1, 3, *shape), "conditioning_subbands": (1, 24, *half)}
        volumes = torch.rand((1, 4, *shape), device=device)
        with torch.no_grad(), _HostAudit(watch) as audit:
            synthesize_volumes(model, schedule, volumes, TARGET_MODALITY, sample_cfg, ["audit"],
                               plan_timesteps(schedule, None, k)[0])
        counts[k], sizes[k] = audit.events, audit.bytes
    per_step, per_volume = [], []
    for key in sorted(set(counts[1]) | set(counts[3])):
        n1, n3 = counts[1].get(key, 0), counts[3].get(key, 0)
        kind, op, site = key
        if n3 != n1:
            row = {"kind": kind, "op": op, "site": site, "per_step": (n3 - n1) / 2}
            if kind != "host_op":
                row["bytes_per_step"] = (sizes[3].get(key, 0) - sizes[1].get(key, 0)) / 2
            per_step.append(row)
        if n1 - (n3 - n1) / 2 > 0:
            per_volume.append({"kind": kind, "op": op, "site": site, "count": n1 - (n3 - n1) / 2})
    totals, total_bytes = Counter(), Counter()
    for e in per_step:
        totals[e["kind"]] += e["per_step"]
        total_bytes[e["kind"]] += e.get("bytes_per_step", 0)
    result = {"sampler": sampler, "config": config, "generators": "one CPU torch.Generator per case (synthesis)",
              "per_step": per_step, "once_per_volume": per_volume, "per_step_totals": dict(totals),
              "host_to_device_bytes_per_step": total_bytes["host_to_device_copy"]}
    if sampler == "ddpm":  # what the per-step noise costs the host at this size
        gen = [torch.Generator().manual_seed(0)]
        noise_shape = (1, 8, *(s // 2 for s in shape))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            randn(noise_shape, gen, "cpu")
            times.append(time.perf_counter() - start)
        result["host_noise_draw_seconds_per_step"] = statistics.median(times)
    return result


def constant_work_findings(ddim_audit: dict, ddpm_audit: dict) -> dict:
    """What the samplers redo or transfer every step although it is constant across steps."""
    def total(audit, kind):
        return sum(e["per_step"] for e in audit["per_step"] if e["kind"] == kind)

    def sites(audit, kind):
        return sorted({e["site"] for e in audit["per_step"] if e["kind"] == kind})

    return {
        "conditioning_volume_ops_per_step": total(ddim_audit, "reads_conditioning_volumes"),
        "conditioning_subbands_computed_once": total(ddim_audit, "reads_conditioning_volumes") == 0,
        "conditioning_subband_reads_per_step": total(ddim_audit, "reads_conditioning_subbands"),
        "conditioning_subband_read_sites": sites(ddim_audit, "reads_conditioning_subbands"),
        "ddim_host_to_device_copies_per_step": total(ddim_audit, "host_to_device_copy"),
        "ddim_host_to_device_copy_sites": sites(ddim_audit, "host_to_device_copy"),
        "ddim_device_to_host_copies_per_step": total(ddim_audit, "device_to_host_copy"),
        "ddim_host_ops_per_step": total(ddim_audit, "host_op"),
        "ddpm_host_to_device_copies_per_step": total(ddpm_audit, "host_to_device_copy"),
        "ddpm_host_to_device_bytes_per_step": ddpm_audit["host_to_device_bytes_per_step"],
        "ddpm_host_noise_draw_seconds_per_step": ddpm_audit.get("host_noise_draw_seconds_per_step"),
        "note": ("Audited on the meta device, which cannot hold a torch.Generator: the per-case generators are "
                 "CPU ones here, so DDPM's per-step noise shows up as one host->device copy. On CUDA the "
                 "synthesis keeps the generators on the GPU, and the audit on the real device counts 0 copies "
                 "per step for DDIM and DDPM (benchmarks/gpu_suite.py, host_audit). The step tables (alpha_bar "
                 "or the DDPM coefficients, and the step indices) are moved to the device once per volume; the "
                 "conditioning subbands are computed once per volume and only read by the torch.cat that "
                 "builds the network input."),
    }


# --------------------------------------------------------------------------- the benchmark

def run_sampling_benchmark(config: str = "demo", device: str = "cpu", precisions=PRECISIONS, k_values=K_VALUES,
                           max_measured_k: int | None = None, repeats: int = 3, warmup: int = 1,
                           isolate: bool = True, cpu_memory_limit_gb: float | None = None, threads: int = 0,
                           audit: bool = True, log=print) -> dict:
    cfg, shape = preset(config)
    dev = torch.device(device)
    if max_measured_k is None:
        max_measured_k = 100 if dev.type == "cuda" else 10
    k_values = sorted(set(k_values))
    measured_k = [k for k in k_values if k <= max_measured_k] or [min(k_values)]
    limit = default_cpu_memory_limit(device, cpu_memory_limit_gb)
    load_start = os.getloadavg()[0]
    spec = {"config": config, "device": device, "precisions": list(precisions), "k_values": measured_k,
            "repeats": repeats, "warmup": warmup, "threads": threads or torch.get_num_threads(),
            "cpu_memory_limit_bytes": limit}
    out = run_isolated(measure_sampling, spec, isolate)
    per_precision = {}
    for precision in precisions:
        if out.get("skipped"):
            log(f"{precision}: skipped: {out['reason']}")
            per_precision[precision] = {"skipped": True, "reason": out["reason"]}
            continue
        by_k = out["by_precision"][precision]
        rows = [_summary(k, by_k[k]) for k in measured_k]
        rows += [_extrapolate(k, rows, by_k[measured_k[-1]]) for k in k_values if k not in measured_k]
        for r in rows:
            tag = " (extrapolated)" if r["extrapolated"] else ""
            log(f"{precision} K={r['k']:>4}: {r['seconds_per_volume']:.3f} s/volume{tag}, "
                f"outside network {100 * r['outside_network_fraction']:.1f}%")
        per_precision[precision] = {"skipped": False, "by_k": rows}
    fp32, bf16 = per_precision.get("fp32", {}), per_precision.get("bf16", {})
    if fp32 and bf16 and not fp32.get("skipped") and not bf16.get("skipped"):
        for a, b in zip(fp32["by_k"], bf16["by_k"]):
            b["speedup_vs_fp32"] = a["seconds_per_volume"] / b["seconds_per_volume"]
    entry = {
        "command": command_line(), "machine": machine(),
        "config": config, "device": device, "model_config": cfg.to_dict(),
        "volume_shape": [1, 1, *shape], "network_input_shape": [1, cfg.in_channels, *(s // 2 for s in shape)],
        "sampler": "synthesize_volumes: ddim eta=0, plan_timesteps(schedule, None, K) (K uniform steps) of the "
                   "linear schedule, clip_in_image_space, i2i, the case's CPU generator",
        "includes": "DWT of conditioning, sampling loop, IDWT, copy to host, nibabel .nii.gz write",
        "max_measured_k": max_measured_k, "measured_k": measured_k,
        "extrapolated_k": [k for k in k_values if k not in measured_k],
        "extrapolation": ("seconds(K) = fixed + per_step * K with the once-per-volume time and the loop's time "
                          "per step measured at the largest measured K; peak memory not extrapolated"),
        "worker_threads": threads or torch.get_num_threads(),
        "repeats": repeats, "warmup": warmup, "isolated_process": isolate,
        "precisions_interleaved": "fp32 and bf16 alternate volume by volume in one process",
        "peak_memory_method": out.get("peak_memory_method", ""),
        "load_average_1m": [load_start, os.getloadavg()[0]],
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if dev.type == "cuda" else None,
        "precisions": per_precision,
    }
    if audit:
        ddim, ddpm = audit_host_work(config, "ddim"), audit_host_work(config, "ddpm")
        entry["host_work_audit"] = {"ddim": ddim, "ddpm": ddpm}
        entry["constant_work_per_step"] = constant_work_findings(ddim, ddpm)
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, "sampling.json", repeats=3, what="volumes per K")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="fp32 and/or bf16 (the denoiser's autocast)")
    parser.add_argument("--k", type=int, nargs="+", default=list(K_VALUES), help="network evaluations per volume")
    parser.add_argument("--max_measured_k", "--max-measured-k", type=int, default=None,
                        help="largest K actually run; larger K are extrapolated (default 10 on CPU, 100 on CUDA)")
    parser.add_argument("--no-audit", dest="audit", action="store_false", help="skip the host-work audit")
    args = parser.parse_args(argv)
    entry = run_sampling_benchmark(args.config, args.device, args.precisions, args.k, args.max_measured_k,
                                   args.repeats, args.warmup, args.isolate, args.cpu_memory_limit_gb, args.threads,
                                   args.audit)
    if entry["extrapolated_k"]:
        print(f"K = {entry['extrapolated_k']} are extrapolated from K = {entry['measured_k']}, not measured")
    if "constant_work_per_step" in entry:
        c = entry["constant_work_per_step"]
        print(f"per DDIM step: {c['ddim_host_to_device_copies_per_step']:g} host->device copies, "
              f"{c['ddim_device_to_host_copies_per_step']:g} device->host copies, {c['ddim_host_ops_per_step']:g} "
              f"host ops; per DDPM step: {c['ddpm_host_to_device_copies_per_step']:g} host->device copies "
              f"({c['ddpm_host_to_device_bytes_per_step'] / 2**20:.1f} MiB)")
    save_entry(args, entry)
    return entry


if __name__ == "__main__":
    main()
