"""Seconds per training step and peak memory, per precision / memory mode.

One step is what ``Trainer.train_step`` does on one case: DWT of a random 4-modality case
(target + conditioning subbands), noise, ``training_losses`` (forward), backward, gradient
clipping, AdamW, EMA update. Differences from the Trainer: the noise and t are drawn with a
generator on the benchmark device (the Trainer draws them on the CPU), and no data loading.

Modes (each timed against ``fp32`` in the same run):
  fp32           plain float32 (on CUDA, cuDNN convolutions use TF32 as PyTorch does by default)
  bf16           ``torch.autocast(dtype=torch.bfloat16)`` around the forward
  checkpoint     activation checkpointing of every residual block (``ModelConfig.use_checkpoint``)
  channels_last  model and network input in ``torch.channels_last_3d``
  compile        ``torch.compile(model)`` (first steps = compilation, reported separately; a
                 failure is recorded as a skip with its reason)

Peak memory: each mode runs in a fresh worker process (``--no-isolate`` runs in-process).
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
        allocated when measuring started (everything the benchmark allocates: model, EMA,
        optimizer state, gradients, activations).
  CPU:  peak resident set size. The kernel's high-water mark is reset by writing ``5`` to
        ``/proc/self/clear_refs`` before the model is built; peak = ``VmHWM`` after the steps
        minus ``VmRSS`` at the reset (so it includes model, EMA, optimizer state, activations,
        allocator caching and oneDNN scratch, not the Python/torch runtime). tracemalloc does
        not see torch's C++ allocations, so it is not used.
``--estimate-memory`` adds a device-independent estimate per mode from tracing one step on
fake tensors with ``torch.distributed._tools.mem_tracker.MemTracker`` (no memory allocated;
excludes cuDNN workspaces and allocator fragmentation), useful for the full configuration
where a CPU run is too slow or a GPU is not at hand.

Run:
  python benchmarks/bench_train_step.py --config demo --device cpu --repeats 5 --rounds 2
  python benchmarks/bench_train_step.py --config full --device cuda --repeats 10
Results are merged into benchmarks/results/train_step.json under the key "<config>/<device>".
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import multiprocessing
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS_DIR, machine, sync, write_result  # noqa: E402
from DWT_IDWT import to_subbands  # noqa: E402
from guided_diffusion.conditioning import split_case  # noqa: E402
from guided_diffusion.config import ModelConfig  # noqa: E402
from guided_diffusion.factory import build_model  # noqa: E402
from guided_diffusion.diffusion import training_losses  # noqa: E402
from guided_diffusion.presets import DEMO_MODEL, TINY_MODEL  # noqa: E402
from guided_diffusion.schedules import linear  # noqa: E402

# Model config and volume shape (network grid, before the DWT) of each benchmark preset.
PRESETS: dict[str, tuple[ModelConfig, tuple[int, int, int]]] = {
    # cWDM's published configuration at BraTS size: network input (1, 32, 112, 112, 80).
    "full": (ModelConfig(), (224, 224, 160)),
    # The CPU-trainable demo preset: network input (1, 32, 28, 28, 20).
    "demo": (DEMO_MODEL, (56, 56, 40)),
    # Smoke tests only.
    "tiny": (TINY_MODEL, (16, 16, 16)),
}
MODES = ("fp32", "bf16", "checkpoint", "channels_last", "compile")
TARGET_MODALITY = "t2f"
LR, GRAD_CLIP, EMA_RATE = 1e-5, 1.0, 0.9999  # TrainConfig defaults
GIB = 2 ** 30
MMAP_ENV, MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_", 1 << 20  # glibc: buffers >= 1 MiB are mmapped


# --------------------------------------------------------------------------- shared helpers

def preset(name: str) -> tuple[ModelConfig, tuple[int, int, int]]:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {tuple(PRESETS)}")
    return PRESETS[name]


def proc_status_bytes(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status given in kB (VmRSS, VmHWM, ...), in bytes."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in keys:
                values[name] = int(rest.split()[0]) * 1024
    return values


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated minus memory_allocated at start"
CPU_MEMORY_METHOD = "VmHWM after the run minus VmRSS at start (/proc/self/clear_refs reset)"


class PeakMemory:
    """Peak memory since ``start()``, as described in the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.method = ""

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = CUDA_MEMORY_METHOD
        else:
            with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
                fh.write("5")
            self.base = proc_status_bytes("VmRSS")["VmRSS"]
            self.method = CPU_MEMORY_METHOD
        return self

    def reset_peak(self) -> None:
        """Start a new peak without moving the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return int(proc_status_bytes("VmHWM")["VmHWM"] - self.base)


def cpu_description() -> dict:
    """CPU model and the instruction-set flags that matter for bf16 on CPU."""
    info = {"cpu_model": "", "cpu_flags": []}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not info["cpu_model"]:
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
                    break
    except OSError:
        pass
    return info


def run_isolated(fn, spec: dict, isolate: bool) -> dict:
    """``fn(spec)`` in a fresh spawned process (isolate) or in this one; a dead worker is a skip.

    The worker gets a fixed glibc mmap threshold, so every freed large buffer goes back to the
    kernel at once and the RSS high-water mark measures live memory, not malloc's caching.
    """
    if not isolate:
        return fn(spec)
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.get(MMAP_ENV)
    os.environ[MMAP_ENV] = str(MMAP_THRESHOLD)  # inherited by the spawned worker only
    try:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            future = pool.submit(fn, spec)
            if saved is None:  # the worker has started with the setting; restore ours
                os.environ.pop(MMAP_ENV, None)
            else:
                os.environ[MMAP_ENV] = saved
            return future.result()
    except concurrent.futures.process.BrokenProcessPool as err:
        return {"skipped": True, "reason": f"worker process died ({err}); most likely out of memory"}
    finally:
        if saved is None:
            os.environ.pop(MMAP_ENV, None)
        else:
            os.environ[MMAP_ENV] = saved


def setup_worker(spec: dict):
    """A benchmark worker's device, thread count, memory limit and (model config, volume shape)."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cpu" and spec.get("cpu_memory_limit_bytes"):
        limit_cpu_memory(spec["cpu_memory_limit_bytes"])
    cfg, shape = preset(spec["config"])
    return device, cfg, shape


def limit_cpu_memory(limit_bytes: int) -> None:
    """Cap this (worker) process's address space so running out raises instead of invoking the
    OOM killer on a shared machine. ``limit_bytes`` is added to the current virtual size."""
    if limit_bytes <= 0:
        return
    current = proc_status_bytes("VmSize")["VmSize"]
    resource.setrlimit(resource.RLIMIT_AS, (current + limit_bytes, resource.RLIM_INFINITY))


def merge_result(path: Path, key: str, entry: dict) -> Path:
    """Write ``entry`` under ``results[key]`` of the JSON at ``path``, keeping other keys."""
    path = Path(path).resolve()
    results = {}
    if path.is_file():
        try:
            results = json.loads(path.read_text()).get("results", {})
        except (OSError, ValueError):
            results = {}
    results[key] = entry
    return write_result(str(path), {"results": results})


def command_line() -> str:
    """This process's command line, quoted so that it can be pasted into a shell."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


# --------------------------------------------------------------------------- one mode

def _autocast(device: torch.device, mode: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def _make_step(cfg: ModelConfig, shape: tuple[int, int, int], device: torch.device, mode: str, seed: int,
               schedule=None):
    """Build model, EMA, optimizer and a case.

    Returns (step function, model, memory format, [ema, optimizer]).
    """
    torch.manual_seed(seed)
    if mode == "checkpoint":
        cfg = dataclasses.replace(cfg, use_checkpoint=True)
    model = build_model(cfg).train()
    memory_format = torch.channels_last_3d if mode == "channels_last" else torch.contiguous_format
    if device.type != "cpu":
        model = model.to(device)
    if mode == "channels_last":  # what model.to(memory_format=...) does, also for fake tensors
        for p in model.parameters():
            if p.ndim == 5:
                p.data = p.data.contiguous(memory_format=memory_format)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    schedule = schedule or linear()
    gen = torch.Generator(device).manual_seed(seed)
    volumes = torch.rand((1, 4, *shape), generator=gen, device=device)
    net = torch.compile(model) if mode == "compile" else model

    def step() -> torch.Tensor:
        target, cond_volumes = split_case(volumes, TARGET_MODALITY)
        x0 = to_subbands(target).contiguous(memory_format=memory_format)
        cond = to_subbands(cond_volumes).contiguous(memory_format=memory_format)
        t = torch.randint(0, schedule.num_steps, (1,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device).contiguous(memory_format=memory_format)
        with _autocast(device, mode):
            out = training_losses(net, schedule, x0, cond, t, noise)
        loss = out["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), model.parameters()):
                ema_p.lerp_(p, 1.0 - EMA_RATE)
        return loss.detach()

    return step, model, memory_format, [ema, optimizer]


def warm_runtime(device: torch.device) -> None:
    """Run a small conv3d forward/backward (fp32 and bf16) so that lazily loaded kernels and
    libraries (oneDNN, MKL, cuDNN handles) are not counted as the first mode's memory."""
    conv = torch.nn.Conv3d(8, 8, 3, padding=1).to(device)
    optimizer = torch.optim.AdamW(conv.parameters(), lr=LR)  # imports torch._dynamo helpers lazily
    x = torch.randn(1, 8, 8, 8, 8, device=device)
    for enabled in (False, True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            conv(x).float().sum().backward()
        torch.nn.utils.clip_grad_norm_(conv.parameters(), GRAD_CLIP)
        optimizer.step()
    sync(device)


def measure_mode(spec: dict) -> dict:
    """Time ``spec["repeats"]`` steps of one mode after warm-up; peak memory. Runs in a worker."""
    device, cfg, shape = setup_worker(spec)
    mode = spec["mode"]
    warm_runtime(device)
    memory = PeakMemory(device).start()
    warmup = max(spec["warmup"], 2 if mode == "compile" else 0)
    warmup_times, times = [], []
    try:
        step, model, memory_format, _ = _make_step(cfg, shape, device, mode, spec.get("seed", 0))
        for _ in range(warmup):
            start = time.perf_counter()
            step()
            sync(device)
            warmup_times.append(time.perf_counter() - start)
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            loss = step()
            sync(device)
            times.append(time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a mode that cannot run here is recorded, not fatal
        if isinstance(err, MemoryError) or "alloc" in str(err).lower() or "out of memory" in str(err).lower():
            reason = f"out of memory: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        else:
            reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        return {"mode": mode, "skipped": True, "reason": reason}
    result = {
        "mode": mode, "skipped": False, "times_s": times, "warmup_times_s": warmup_times,
        "peak_memory_bytes": memory.peak_bytes(), "peak_memory_method": memory.method,
        "final_loss": float(loss) if spec["repeats"] else None,
    }
    if device.type == "cpu":
        result["peak_rss_bytes"] = proc_status_bytes("VmHWM")["VmHWM"]
    if mode == "compile":
        result["compile_seconds"] = warmup_times[0] if warmup_times else None
    if mode == "channels_last":
        with torch.no_grad():
            probe = torch.zeros((1, cfg.in_channels, *(s // 2 for s in shape)), device=device)
            probe = probe.contiguous(memory_format=memory_format)
            out = model.eval()(probe, torch.zeros(1, device=device))
        result["output_is_channels_last"] = bool(out.is_contiguous(memory_format=torch.channels_last_3d))
    return result


# --------------------------------------------------------------------------- memory estimate

def estimate_peak_bytes(config: str, mode: str) -> dict:
    """Peak memory of one steady-state step traced on fake tensors (see module docstring)."""
    if mode == "compile":
        return {"skipped": True, "reason": "not traceable with fake tensors"}
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as err:
        return {"skipped": True, "reason": f"MemTracker unavailable: {err}"}
    cfg, shape = preset(config)
    device = torch.device("cpu")
    schedule = linear()  # real tensors: its validation reads values
    with FakeTensorMode(allow_non_fake_inputs=True):
        step, model, _, extras = _make_step(cfg, shape, device, mode, seed=0, schedule=schedule)
        step()  # optimizer state exists from here on
        tracker = MemTracker()
        tracker.track_external(model, *extras)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")
    totals = [by_type["Total"] for by_type in peak.values()]
    return {"skipped": False, "estimated_peak_bytes": int(max(totals)),
            "by_kind_bytes": {str(k).split(".")[-1]: int(v) for d in peak.values() for k, v in d.items()}}


# --------------------------------------------------------------------------- the benchmark

def run_train_benchmark(config: str = "demo", device: str = "cpu", modes=MODES, repeats: int = 5,
                        warmup: int = 1, rounds: int = 1, isolate: bool = True, estimate_memory: bool = False,
                        skip_timing: str = "", cpu_memory_limit_gb: float | None = None, threads: int = 0,
                        log=print) -> dict:
    """Measure every mode (``rounds`` times, interleaved) and return the result entry."""
    cfg, shape = preset(config)
    dev = torch.device(device)
    modes = tuple(modes)
    if "fp32" not in modes:
        modes = ("fp32", *modes)
    if cpu_memory_limit_gb is None:
        limit = int(0.8 * mem_available_bytes()) if dev.type == "cpu" else 0
    else:
        limit = int(cpu_memory_limit_gb * GIB)
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    if not skip_timing:
        for r in range(rounds):
            for mode in modes:
                spec = {"config": config, "device": device, "mode": mode, "repeats": repeats, "warmup": warmup,
                        "threads": threads or torch.get_num_threads(), "cpu_memory_limit_bytes": limit, "seed": 0}
                out = run_isolated(measure_mode, spec, isolate)
                runs[mode].append(out)
                if out.get("skipped"):
                    log(f"[round {r}] {mode}: skipped: {out['reason']}")
                else:
                    log(f"[round {r}] {mode}: median {statistics.median(out['times_s']):.3f} s/step, "
                        f"peak {out['peak_memory_bytes'] / GIB:.2f} GiB")
    per_mode = {}
    for mode in modes:
        ok = [o for o in runs[mode] if not o.get("skipped")]
        if skip_timing:
            entry = {"skipped": True, "reason": skip_timing}
        elif not ok:
            entry = {"skipped": True, "reason": runs[mode][0]["reason"]}
        else:
            times = [t for o in ok for t in o["times_s"]]
            entry = {"skipped": False, "median_s": statistics.median(times) if times else None, "times_s": times,
                     "warmup_times_s": [t for o in ok for t in o["warmup_times_s"]],
                     "peak_memory_bytes": max(o["peak_memory_bytes"] for o in ok),
                     "runs": len(ok)}
            for key in ("compile_seconds", "output_is_channels_last", "peak_rss_bytes"):
                if key in ok[0]:
                    entry[key] = ok[0][key]
        if estimate_memory:
            entry["estimate"] = estimate_peak_bytes(config, mode)
        per_mode[mode] = entry
    base = per_mode["fp32"]
    for entry in per_mode.values():
        if not entry.get("skipped") and not base.get("skipped") and entry["median_s"] and base["median_s"]:
            entry["time_ratio_vs_fp32"] = entry["median_s"] / base["median_s"]
            entry["speedup_vs_fp32"] = base["median_s"] / entry["median_s"]
            entry["memory_ratio_vs_fp32"] = entry["peak_memory_bytes"] / base["peak_memory_bytes"]
    n_params = sum(p.numel() for p in build_model(cfg).parameters())
    memory_method = CUDA_MEMORY_METHOD if dev.type == "cuda" else CPU_MEMORY_METHOD
    memory_method += ", one process per mode" if isolate else ", all modes in one process"
    return {
        "command": command_line(), "machine": {**machine(), **cpu_description()},
        "config": config, "device": device, "model_config": cfg.to_dict(), "parameters": n_params,
        "volume_shape": [1, 4, *shape], "network_input_shape": [1, cfg.in_channels, *(s // 2 for s in shape)],
        "worker_threads": threads or torch.get_num_threads(), "batch_size": 1, "repeats": repeats,
        "warmup": warmup, "rounds": rounds, "isolated_processes": isolate,
        "load_average_1m": [load_start, os.getloadavg()[0]],
        "step": "DWT + training_losses forward + backward + grad clip + AdamW + EMA",
        "peak_memory_method": memory_method,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if dev.type == "cuda" else None,
        "modes": per_mode,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=tuple(PRESETS), default="demo",
                        help="model + volume preset: full (cWDM at BraTS size), demo (CPU), tiny (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to measure (fp32 always)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode and round (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile: at least 2)")
    parser.add_argument("--rounds", type=int, default=1, help="run all modes this many times, interleaved")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run every mode in this process (faster; memory figures less clean)")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="also estimate each mode's peak memory from a fake-tensor trace")
    parser.add_argument("--skip-timing", default="", metavar="REASON",
                        help="record the modes as skipped with this reason (e.g. too slow here); "
                             "with --estimate-memory still gives the estimates")
    parser.add_argument("--cpu-memory-limit-gb", type=float, default=None,
                        help="address-space cap for a CPU worker (default 80%% of MemAvailable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "train_step.json",
                        help="results JSON (merged under the key <config>/<device>)")
    args = parser.parse_args(argv)
    entry = run_train_benchmark(args.config, args.device, args.modes, args.repeats, args.warmup, args.rounds,
                                args.isolate, args.estimate_memory, args.skip_timing, args.cpu_memory_limit_gb,
                                args.threads)
    for mode, m in entry["modes"].items():
        if m.get("skipped"):
            print(f"{mode:>14}: skipped ({m['reason']})")
        else:
            print(f"{mode:>14}: {m['median_s']:.3f} s/step ({m.get('speedup_vs_fp32', 1):.2f}x fp32 speed), "
                  f"peak {m['peak_memory_bytes'] / GIB:.2f} GiB ({m.get('memory_ratio_vs_fp32', 1):.2f}x fp32)")
        if "estimate" in m and not m["estimate"].get("skipped"):
            print(f"{'':>14}  estimated peak {m['estimate']['estimated_peak_bytes'] / GIB:.2f} GiB")
    path = merge_result(args.out, f"{args.config}/{args.device}", entry)
    print(f"wrote {path}")
    return entry


if __name__ == "__main__":
    main()
