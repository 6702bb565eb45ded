"""The benchmarks' shared harness: presets, timing, peak memory, worker processes, JSON results.

A benchmark times the code a user runs (``Trainer.train_step``, ``synthesis.synthesize_volumes``);
this module only holds what every benchmark needs around it.

Peak memory (:class:`PeakMemory`), measured in a fresh worker process (:func:`run_isolated`):
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
        allocated when measuring started.
  CPU:  peak resident set size. The kernel's high-water mark is reset by writing ``5`` to
        ``/proc/self/clear_refs``; peak = ``VmHWM`` after the work minus ``VmRSS`` at the reset
        (model, optimizer state, activations, allocator caching and oneDNN scratch, not the
        Python/torch runtime). tracemalloc does not see torch's C++ allocations, so it is not used.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils import benchmark

from guided_diffusion.config import ModelConfig
from guided_diffusion.fileio import save_json
from guided_diffusion.presets import DEMO_MODEL, TINY_MODEL

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the committed results
# Where a run writes unless asked to update the committed file (git-ignored): running the README's
# commands never overwrites the tracked results.
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"
GIB = 2 ** 30
MMAP_ENV, MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_", 1 << 20  # glibc: buffers >= 1 MiB are mmapped

# Model config and volume shape (network grid, before the DWT) of each benchmark preset.
PRESETS: dict[str, tuple[ModelConfig, tuple[int, int, int]]] = {
    # cWDM's published configuration at BraTS size: network input (1, 32, 112, 112, 80).
    "full": (ModelConfig(), (224, 224, 160)),
    # The CPU-trainable demo preset: network input (1, 32, 28, 28, 20).
    "demo": (DEMO_MODEL, (56, 56, 40)),
    # Smoke tests only.
    "tiny": (TINY_MODEL, (16, 16, 16)),
}


def preset(name: str) -> tuple[ModelConfig, tuple[int, int, int]]:
    if name not in PRESETS:
        raise ValueError(f"benchmarks/common.py: unknown config {name!r}; choose one of {tuple(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------- timing

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: torch.device | str, repeats: int,
               warmup: int = 0) -> tuple[list[float], list[float]]:
    """(warm-up times, timed times) in seconds of single calls of ``fn``, the device synchronised
    around each. Not ``torch.utils.benchmark.Timer``: its ``timeit`` makes at least two extra
    warm-up calls per measurement, too costly for one training step or one volume at full size."""
    def once() -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    warm = [once() for _ in range(warmup)]
    return warm, [once() for _ in range(repeats)]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median time of one call of ``fn`` by ``torch.utils.benchmark`` (fast functions: it runs
    ``fn`` several times per measurement), after ``warmup`` calls; and the ``repeats`` times."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    for _ in range(warmup):
        fn()
    times = [timer.timeit(1).median for _ in range(repeats)]
    return statistics.median(times), times


# --------------------------------------------------------------------------- memory

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
    raise RuntimeError("benchmarks/common.py: MemAvailable not found in /proc/meminfo")


CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated minus memory_allocated at start"
CPU_MEMORY_METHOD = "VmHWM after the run minus VmRSS at start (/proc/self/clear_refs reset)"


class PeakMemory:
    """Peak memory since ``start()``, as described in the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.method = CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD

    def start(self) -> "PeakMemory":
        self.reset_peak()
        if self.device.type == "cuda":
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = proc_status_bytes("VmRSS")["VmRSS"]
        return self

    def reset_peak(self) -> None:
        """Start a new peak without moving the baseline."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
                fh.write("5")

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return int(proc_status_bytes("VmHWM")["VmHWM"] - self.base)


def limit_cpu_memory(limit_bytes: int) -> None:
    """Cap this (worker) process's address space so running out raises instead of invoking the
    OOM killer on a shared machine. ``limit_bytes`` is added to the current virtual size."""
    if limit_bytes <= 0:
        return
    current = proc_status_bytes("VmSize")["VmSize"]
    resource.setrlimit(resource.RLIMIT_AS, (current + limit_bytes, resource.RLIM_INFINITY))


def default_cpu_memory_limit(device: str, limit_gb: float | None) -> int:
    """Bytes for :func:`limit_cpu_memory`: ``limit_gb`` if given, else 80% of MemAvailable on CPU."""
    if limit_gb is not None:
        return int(limit_gb * GIB)
    return int(0.8 * mem_available_bytes()) if torch.device(device).type == "cpu" else 0


def warm_runtime(device: torch.device) -> None:
    """Run a small conv3d forward/backward (fp32 and bf16) so that lazily loaded kernels and
    libraries (oneDNN, MKL, cuDNN handles) are not counted as the first measurement's memory."""
    conv = torch.nn.Conv3d(8, 8, 3, padding=1).to(device)
    optimizer = torch.optim.AdamW(conv.parameters())  # imports torch._dynamo helpers lazily
    x = torch.randn(1, 8, 8, 8, 8, device=device)
    for enabled in (False, True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            conv(x).float().sum().backward()
        torch.nn.utils.clip_grad_norm_(conv.parameters(), 1.0)
        optimizer.step()
    sync(device)


# --------------------------------------------------------------------------- worker processes

def setup_worker(spec: dict):
    """A benchmark worker's device, thread count, memory limit and (model config, volume shape)."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cpu" and spec.get("cpu_memory_limit_bytes"):
        limit_cpu_memory(spec["cpu_memory_limit_bytes"])
    cfg, shape = preset(spec["config"])
    return device, cfg, shape


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
            return pool.submit(fn, spec).result()
    except concurrent.futures.process.BrokenProcessPool as err:
        return {"skipped": True, "reason": f"worker process died ({err}); most likely out of memory"}
    finally:
        if saved is None:
            os.environ.pop(MMAP_ENV, None)
        else:
            os.environ[MMAP_ENV] = saved


def skip_reason(err: BaseException) -> str:
    """One line saying why a measurement could not run (out of memory called out as such)."""
    text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    if isinstance(err, MemoryError) or "alloc" in text.lower() or "out of memory" in text.lower():
        return f"out of memory: {type(err).__name__}: {text}"
    return f"{type(err).__name__}: {text}"


# --------------------------------------------------------------------------- results

def machine() -> dict:
    """Python, torch, platform, threads, GPU, CPU model and the bf16-relevant CPU flags."""
    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "cpu_model": "", "cpu_flags": [],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not info["cpu_model"]:
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",
                                                         "amx_int8"})
                    break
    except OSError:
        pass
    return info


def command_line() -> str:
    """This process's command line, quoted so that it can be pasted into a shell."""
    return shlex.join([Path(sys.executable).name, *sys.argv])


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out`` and ``--update_results`` for a benchmark whose result file is ``name``."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result file (default: benchmarks/results/local/{name}, git-ignored; with "
                             f"--update_results the committed benchmarks/results/{name})")
    parser.add_argument("--update_results", action="store_true",
                        help=f"write the committed benchmarks/results/{name} instead of a local copy")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """Where a benchmark writes: ``--out``, else the committed file with ``--update_results``, else
    ``LOCAL_RESULTS_DIR / name``."""
    if args.out is not None:
        return Path(args.out)
    return (RESULTS_DIR if args.update_results else LOCAL_RESULTS_DIR) / name


def write_result(name: str | Path, payload: dict) -> Path:
    """Write ``payload`` with the command line and the machine to ``RESULTS_DIR / name`` (an
    absolute path is kept as it is; atomic)."""
    path = RESULTS_DIR / name
    save_json({"command": command_line(), "machine": machine(), **payload}, path)
    return path


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
    return write_result(path, {"results": results})


# --------------------------------------------------------------------------- command line

def benchmark_parser(doc: str, out_name: str, repeats: int, what: str) -> argparse.ArgumentParser:
    """The options every benchmark has: --config, --device, --repeats, --warmup, --no-isolate,
    --cpu-memory-limit-gb, --threads, --out / --update_results (see :func:`output_path`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=tuple(PRESETS), default="demo",
                        help="model + volume preset: full (cWDM at BraTS size), demo (CPU), tiny (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed {what} (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help=f"untimed {what} first")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="measure in this process instead of a fresh worker (memory figures less clean)")
    parser.add_argument("--cpu-memory-limit-gb", type=float, default=None,
                        help="address-space cap for a CPU worker (default 80%% of MemAvailable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    add_output_arguments(parser, out_name)
    parser.set_defaults(result_name=out_name)
    return parser


def save_entry(args: argparse.Namespace, entry: dict) -> Path:
    """Merge ``entry`` into ``args.out`` under "<config>/<device>" and say where it went."""
    path = merge_result(output_path(args, args.result_name), f"{args.config}/{args.device}", entry)
    print(f"wrote {path}")
    return path
