"""The GPU suite: every figure issue 15 asks of a GPU, from the code users run, in one command.

Sections (each a key of the JSON result; a failure is recorded with its reason, the rest goes on):

``network_per_nfe``   one network evaluation of the full-size UNet (cWDM configuration, input
                      (1, 32, 112, 112, 80)) per variant: fp32 (TF32 convolutions, PyTorch's default),
                      fp32 with ``cudnn.benchmark``, bf16 autocast, bf16 channels-last-3d, bf16 compiled
                      (``torch.compile``), and the whole K-step DDIM loop captured in one CUDA graph
                      (per NFE = loop / K). Each variant's output is compared with fp32's
                      (``max_abs_diff_vs_fp32``; the output layer is re-initialised at random so the
                      comparison is not trivially 0 = 0).
``synthesis``         seconds per volume through ``guided_diffusion.synthesis.synthesize`` (DDIM, cWDM
                      clipping, the sampler users run) at K = 1, 4, 10 measured, and K = 1000 (cWDM's
                      default) extrapolated as fixed + per_step * K from the K = 1 and K = 10 times.
``train_step``        ``Trainer.train_step`` at batch 1 (fp32, bf16, each with and without activation
                      checkpointing): median seconds and peak memory from ``torch.cuda.max_memory_allocated``
                      (reset before each mode; includes model, EMA, optimizer state, activations).
``loader``            cases/s of the training DataLoader (default worker count) over synthetic
                      BraTS-shaped int16 cases written with nibabel: from the NIfTI files, the
                      first pass through ``CachedBratsDataset`` (which builds the cache), and from
                      the cache (median of 3 passes). ``--sections loader --device cpu`` measures
                      this at full size on a machine without a GPU.
``dwt``               DWT + IDWT of one (1, 1, 224, 224, 160) volume.

Run on a GPU:  bash benchmarks/gpu_suite.sh          (writes benchmarks/results/local/gpu_suite.json;
                                                    --update_results writes the committed gpu_suite.json)
Smoke test:    python benchmarks/gpu_suite.py --device cpu --quick --out /tmp/gpu_suite.json
``--quick`` runs the same code on tiny shapes (the test suite runs it so the script cannot rot);
``torch.compile`` then uses the ``eager`` backend with ``fullgraph=True``, which checks that the
network compiles as one graph without spending minutes in the C++ compiler.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_output_arguments, machine, output_path, sync  # noqa: E402
from DWT_IDWT import clip_in_image_space, dwt3, idwt3  # noqa: E402
from guided_diffusion.checkpoints import LoadedModel  # noqa: E402
from guided_diffusion.config import DiffusionConfig, ModelConfig, SampleConfig, TrainConfig  # noqa: E402,E501
from guided_diffusion.factory import build_model  # noqa: E402,E501
from guided_diffusion.fileio import save_json  # noqa: E402,E501
from guided_diffusion import unet  # noqa: E402
from guided_diffusion.diffusion import ddim_step, make_denoiser  # noqa: E402
from guided_diffusion.presets import TINY_MODEL  # noqa: E402
from guided_diffusion.samplers import ddim_sample  # noqa: E402
from guided_diffusion.timesteps import uniform_timesteps  # noqa: E402
from guided_diffusion.schedules import linear  # noqa: E402
from guided_diffusion.synthesis import synthesize, synthesize_volumes  # noqa: E402
from guided_diffusion.train_util import Trainer  # noqa: E402

RESULT_NAME = "gpu_suite.json"
FULL_VOLUME = (224, 224, 160)  # the network grid of a BraTS case
QUICK_VOLUME = (16, 16, 12)


def timed(fn, device, repeats: int, warmup: int) -> dict:
    """Median / min / all seconds of ``fn()`` (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def random_network(cfg: ModelConfig, device, seed: int = 0) -> torch.nn.Module:
    """The UNet with its zero-initialised layers drawn at random (so outputs are not all 0)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not bool(p.any()):
                p.normal_(0.0, 0.02)
    return model.to(device).eval()


def section(results: dict, name: str, fn) -> None:
    """Run one section; record its result or the reason it failed."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # noqa: BLE001 - a failed section is a result, not a crash
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 2)
    print(f"[gpu_suite] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- network per NFE


@contextlib.contextmanager
def fp32_groupnorm():
    """GroupNorm through a float32 copy of every bf16 activation (cWDM's, and this project's before
    issue 15): the side-by-side baseline of ``bf16`` (native low-precision GroupNorm)."""
    current = unet.GroupNorm32.forward
    unet.GroupNorm32.forward = lambda self, x: torch.nn.GroupNorm.forward(self, x.float()).type(x.dtype)
    try:
        yield
    finally:
        unet.GroupNorm32.forward = current


def network_per_nfe(model_cfg: ModelConfig, volume: tuple[int, int, int], device, repeats: int, quick: bool) -> dict:
    model = random_network(model_cfg, device)
    sub = tuple(s // 2 for s in volume)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn((1, model_cfg.in_channels, *sub), generator=gen, device=device)
    t = torch.tensor([500.0], device=device)
    cuda = torch.device(device).type == "cuda"
    out: dict = {"input_shape": list(x.shape)}

    def run(net, autocast: bool, inp=x):
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            return net(inp, t).float()

    torch.backends.cudnn.benchmark = False
    reference = run(model, False)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    variants = {
        "fp32": (model, False, x, False, contextlib.nullcontext),
        "fp32_cudnn_benchmark": (model, False, x, True, contextlib.nullcontext),
        "bf16": (model, True, x, True, contextlib.nullcontext),
        "bf16_fp32_groupnorm": (model, True, x, True, fp32_groupnorm),
        "bf16_channels_last": (channels_last, True, x.to(memory_format=torch.channels_last_3d), True,
                               contextlib.nullcontext),
    }
    for name, (net, autocast, inp, bench, context) in variants.items():
        def measure():
            torch.backends.cudnn.benchmark = bench
            with context():
                stats = timed(lambda: run(net, autocast, inp), device, repeats, warmup=2)
                diff = (run(net, autocast, inp) - reference).abs().max().item()
            return {"seconds_per_nfe": stats["median_s"], "min_s": stats["min_s"], "max_abs_diff_vs_fp32": diff}
        out[name] = attempt(measure)
    del channels_last
    torch.backends.cudnn.benchmark = True

    # torch.compile of the network (inductor on CUDA; in quick mode the eager backend checks for graph breaks)
    modes = {"bf16_compiled": None}
    if cuda:
        modes["bf16_compiled_cudagraphs"] = "reduce-overhead"
    for name, mode in modes.items():
        def measure():
            backend = "eager" if quick else "inductor"
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=backend, fullgraph=True, mode=mode)
            start = time.perf_counter()
            run(compiled, True)
            sync(device)
            compile_s = time.perf_counter() - start
            stats = timed(lambda: run(compiled, True), device, repeats, warmup=2)
            diff = (run(compiled, True) - reference).abs().max().item()
            return {"seconds_per_nfe": stats["median_s"], "min_s": stats["min_s"], "max_abs_diff_vs_fp32": diff,
                    "first_call_s": compile_s, "backend": backend, "mode": mode or "default"}
        out[name] = attempt(measure)
    torch._dynamo.reset()

    if cuda:
        out["bf16_cuda_graph_ddim_k4"] = attempt(lambda: cuda_graph_loop(model, model_cfg, sub, device, repeats, k=4))
    else:
        out["bf16_cuda_graph_ddim_k4"] = {"skipped": "CUDA graphs need a CUDA device"}
    base = out["bf16"].get("seconds_per_nfe")
    for rec in out.values():
        if isinstance(rec, dict) and "seconds_per_nfe" in rec and base:
            rec["speedup_vs_bf16_eager"] = base / rec["seconds_per_nfe"]
    return out


def attempt(fn) -> dict:
    """``fn()``, or a record of why it failed (one variant's failure is a result, not a crash)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}


def cuda_graph_loop(model, model_cfg: ModelConfig, sub, device, repeats: int, k: int) -> dict:
    """The deterministic K-step DDIM loop (``ddim_step`` with cWDM clipping, bf16 network) captured
    in one CUDA graph: the per-step tables are moved to the device before capture, so the replay
    makes no host round trip and launches no kernel from Python."""
    schedule = linear(1000, n_bands=model_cfg.out_channels)
    steps = uniform_timesteps(schedule.num_steps, k)
    gen = torch.Generator(device).manual_seed(1)
    cond = torch.randn((1, model_cfg.in_channels - model_cfg.out_channels, *sub), generator=gen, device=device)
    x_T = torch.randn((1, model_cfg.out_channels, *sub), generator=gen, device=device)
    denoiser = make_denoiser(model, schedule, cond, precision="bf16")
    t_table = torch.tensor(steps, device=device)
    ab_t = schedule.alpha_bar_at(torch.tensor(steps)).to(device=device, dtype=torch.float32)
    ab_s = schedule.alpha_bar_at(torch.tensor(steps[1:] + [-1])).to(device=device, dtype=torch.float32)

    def loop():
        x = x_T
        for i in range(k):
            pred_x0 = clip_in_image_space(denoiser(x, t_table[i:i + 1]))
            x = ddim_step(x, pred_x0, ab_t[i:i + 1], ab_s[i:i + 1]) if i + 1 < k else pred_x0
        return x

    with torch.no_grad():
        eager = loop()
        library = ddim_sample(denoiser, schedule, x_T, steps, clip=clip_in_image_space)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                loop()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = loop()
        graph.replay()
        sync(device)
        diff = (static_out - eager).abs().max().item()
        eager_stats = timed(loop, device, repeats, warmup=1)
        library_stats = timed(lambda: ddim_sample(denoiser, schedule, x_T, steps, clip=clip_in_image_space), device,
                              repeats, warmup=1)
        graph_stats = timed(graph.replay, device, repeats, warmup=1)
    return {"k": k, "seconds_per_nfe": graph_stats["median_s"] / k, "loop_s": graph_stats["median_s"],
            "eager_loop_s": eager_stats["median_s"], "library_ddim_sample_s": library_stats["median_s"],
            "graph_speedup_vs_library_loop": library_stats["median_s"] / graph_stats["median_s"],
            "max_abs_diff_vs_eager_loop": diff, "max_abs_diff_eager_loop_vs_library": (eager - library).abs().max().item()}


# --------------------------------------------------------------------------- synthesis


def synthesis(model_cfg: ModelConfig, volume, device, repeats: int, quick: bool, ks=(1, 4, 10)) -> dict:
    """``synthesize`` as users call it (library defaults: no cudnn.benchmark), per precision, and
    compiled in bf16 (``SampleConfig.compile``; first call, which compiles, reported separately)."""
    torch.backends.cudnn.benchmark = False
    volumes = torch.rand((1, 4, *volume), generator=torch.Generator().manual_seed(0))
    out: dict = {"volume_shape": list(volume), "sampler": "ddim", "clip": "cWDM image-space clamp"}
    variants = {"fp32": SampleConfig(sampler="ddim", precision="fp32"),
                "bf16": SampleConfig(sampler="ddim", precision="bf16"),
                "bf16_compiled": SampleConfig(sampler="ddim", precision="bf16", compile=True)}
    for name, cfg in variants.items():
        if cfg.compile and quick:
            out[name] = {"skipped": "--quick: inductor compilation takes minutes on a CPU (tests cover the option)"}
            continue
        schedule = linear(1000, n_bands=model_cfg.out_channels)
        loaded = LoadedModel(random_network(model_cfg, device), model_cfg, DiffusionConfig(), schedule,
                             "random weights (gpu_suite)")
        rec = {}
        start = time.perf_counter()
        synthesize(loaded, volumes, "t2f", cfg, ["case"], timesteps=uniform_timesteps(schedule.num_steps, 1))
        sync(device)
        rec["first_call_s"] = time.perf_counter() - start
        for k in ks:
            steps = uniform_timesteps(schedule.num_steps, k)
            stats = timed(lambda: synthesize(loaded, volumes, "t2f", cfg, ["case"], timesteps=steps), device, repeats,
                          warmup=1)
            rec[f"k{k}_s"] = stats["median_s"]
        lo, hi = min(ks), max(ks)
        per_step = (rec[f"k{hi}_s"] - rec[f"k{lo}_s"]) / (hi - lo)
        fixed = rec[f"k{lo}_s"] - lo * per_step
        rec["per_step_s"] = per_step
        rec["fixed_s"] = fixed
        rec["k1000_s_extrapolated"] = fixed + 1000 * per_step
        out[name] = rec
    return out


def host_audit(model_cfg: ModelConfig, volume, device) -> dict:
    """Host<->device copies per sampling step of ``synthesize_volumes`` on this device, per sampler,
    recorded by bench_sampling's dispatch-mode audit on real tensors: (count(K=3) - count(K=1)) / 2."""
    from benchmarks.bench_sampling import _HostAudit

    model = random_network(model_cfg, device)
    schedule = linear(1000, n_bands=model_cfg.out_channels)
    volumes = torch.rand((1, 4, *volume))
    out = {}
    for sampler in ("ddim", "ddpm"):
        counts = {}
        for k in (1, 3):
            with torch.no_grad(), _HostAudit() as audit:
                synthesize_volumes(model, schedule, volumes, "t2f", SampleConfig(sampler=sampler), ["audit"],
                                   uniform_timesteps(schedule.num_steps, k))
            counts[k] = audit.events
        per_step = {}
        for key in set(counts[1]) | set(counts[3]):
            kind, op, site = key
            n = (counts[3].get(key, 0) - counts[1].get(key, 0)) / 2
            if n and kind != "host_op":
                per_step[f"{kind} {op} {site}"] = n
        out[sampler] = {"copies_per_step": sum(per_step.values()), "sites": per_step}
    return out


# --------------------------------------------------------------------------- training step


class _InMemoryCases(torch.utils.data.Dataset):
    def __init__(self, volume, n: int = 2):
        gen = torch.Generator().manual_seed(0)
        self.items = [{"volumes": torch.rand((4, *volume), generator=gen), "case_id": f"case{i}"} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train_step(model_cfg: ModelConfig, volume, device, repeats: int, run_dir: Path) -> dict:
    cuda = torch.device(device).type == "cuda"
    from guided_diffusion.train_util import DistInfo, _collate

    data = _InMemoryCases(volume)
    batch = _collate([data[0]])
    out: dict = {"volume_shape": list(volume), "batch_size": 1}
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark = False  # the library's default
    modes = [("fp32", False, contextlib.nullcontext, False), ("fp32", True, contextlib.nullcontext, False),
             ("bf16", False, contextlib.nullcontext, False), ("bf16", True, contextlib.nullcontext, False),
             ("bf16", False, fp32_groupnorm, False), ("bf16", False, contextlib.nullcontext, True)]
    for precision, ckpt, context, compiled in modes:
        name = (precision + ("_checkpointing" if ckpt else "") + ("_fp32_groupnorm" if context is fp32_groupnorm else "")
                + ("_compiled" if compiled else ""))
        if compiled and not cuda:
            out[name] = {"skipped": "compiled training is measured on CUDA only (minutes of compilation on a CPU)"}
            continue
        with context():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            trainer = Trainer(replace(model_cfg, use_checkpoint=ckpt), DiffusionConfig(),
                              TrainConfig(run_dir=str(run_dir / name), precision=precision, val_interval=0,
                                          image_interval=0, num_workers=0, compile=compiled),
                              data, dist_info=DistInfo(device=torch.device(device)))
            start = time.perf_counter()
            trainer.train_step(batch)
            sync(device)
            first_s = time.perf_counter() - start
            stats = timed(lambda: trainer.train_step(batch), device, repeats, warmup=1)
            rec = {"seconds_per_step": stats["median_s"], "min_s": stats["min_s"], "first_step_s": first_s}
            if cuda:
                rec["peak_memory_gib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            out[name] = rec
            del trainer
    fp32 = out["fp32"]["seconds_per_step"]
    for rec in out.values():
        if isinstance(rec, dict) and "seconds_per_step" in rec:
            rec["speedup_vs_fp32"] = fp32 / rec["seconds_per_step"]
    return out


# --------------------------------------------------------------------------- loader


def loader(geometry_scale: float | None, n_cases: int, workdir: Path) -> dict:
    import nibabel as nib
    import numpy as np

    from guided_diffusion.bratsloader import BRATS_GEOMETRY, BratsDataset, Geometry, discover_cases
    from guided_diffusion.conditioning import MODALITIES
    from guided_diffusion.train_util import _collate
    from guided_diffusion.volume_cache import CachedBratsDataset

    geometry = BRATS_GEOMETRY if geometry_scale is None else Geometry.scaled(geometry_scale)
    shape = geometry.original_shape
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(n_cases):
        case = f"BraTS-GLI-{i:05d}-000"
        folder = workdir / "cases" / case
        folder.mkdir(parents=True, exist_ok=True)
        brain = np.zeros(shape, dtype=bool)
        sl = tuple(slice(s // 6, s - s // 6) for s in shape)
        brain[sl] = True
        for mod in MODALITIES:
            vol = (rng.integers(0, 4000, size=shape) * brain).astype(np.int16)
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(folder / f"{case}-{mod}.nii.gz"))
    write_s = time.perf_counter() - start
    cases, errors = discover_cases(workdir / "cases", geometry=geometry)
    if errors:
        raise RuntimeError(f"loader: synthetic cases rejected: {errors[0]}")
    workers = TrainConfig().num_workers

    def one_pass(dataset) -> float:
        dl = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=_collate)
        start = time.perf_counter()
        n = sum(1 for _ in dl)
        assert n == len(cases)
        return time.perf_counter() - start

    files_s = one_pass(BratsDataset(cases, geometry))
    cached = CachedBratsDataset(cases, workdir / "cache", geometry)
    build_s = one_pass(cached)
    cached_s = statistics.median(one_pass(cached) for _ in range(3))
    n = len(cases)
    return {"cases": n, "num_workers": workers, "file_shape": list(shape), "dataset_write_s": write_s,
            "from_files_cases_per_s": n / files_s, "cache_first_build_cases_per_s": n / build_s,
            "from_cache_cases_per_s": n / cached_s, "cache_speedup": files_s / cached_s,
            "cache_bytes_per_case": sum(p.stat().st_size for p in (workdir / "cache").glob("*.npz")) / n}


# --------------------------------------------------------------------------- DWT


def dwt(volume, device, repeats: int) -> dict:
    x = torch.rand((1, 1, *volume), device=device)

    def both():
        return idwt3(dwt3(x))

    stats = timed(both, device, repeats, warmup=2)
    err = (both() - x).abs().max().item()
    return {"shape": [1, 1, *volume], "dwt_plus_idwt_s": stats["median_s"], "roundtrip_max_abs_err": err}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and model: a smoke run of the same code")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 10, quick 2)")
    add_output_arguments(parser, RESULT_NAME)
    parser.add_argument("--sections", default="dwt,network_per_nfe,synthesis,train_step,loader,host_audit",
                        help="comma-separated sections to run")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible (use --device cpu --quick for a smoke run)")
    device = torch.device(args.device)
    repeats = args.repeats or (2 if args.quick else 10)
    volume = QUICK_VOLUME if args.quick else FULL_VOLUME
    model_cfg = TINY_MODEL if args.quick else ModelConfig()
    torch.manual_seed(0)
    info = machine()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        info["cuda_runtime"] = torch.version.cuda
    results: dict = {"command": " ".join(["python", *sys.argv]), "machine": info, "device": info["device"],
                     "quick": args.quick, "model_config": model_cfg.to_dict()}
    wanted = args.sections.split(",")
    suite_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = {
            "dwt": lambda: dwt(volume, device, repeats),
            "network_per_nfe": lambda: network_per_nfe(model_cfg, volume, device, repeats, args.quick),
            "synthesis": lambda: synthesis(model_cfg, volume, device, repeats if args.quick else 3, args.quick),
            "train_step": lambda: train_step(model_cfg, volume, device, repeats, tmp / "runs"),
            "host_audit": lambda: host_audit(model_cfg, volume, device),
            "loader": lambda: loader(18 / 240 if args.quick else None, 3 if args.quick else 8, tmp / "data"),
        }
        for name in wanted:
            if name not in jobs:
                parser.error(f"unknown section {name!r}; choose from {sorted(jobs)}")
            section(results, name, jobs[name])
    results["total_seconds"] = time.perf_counter() - suite_start
    results["summary"] = summary(results)
    out = output_path(args, RESULT_NAME)
    save_json(results, out)
    print(json.dumps(results["summary"], indent=2))
    failed = [n for n in wanted if isinstance(results.get(n), dict) and "error" in results[n]]
    if failed:
        print(f"[gpu_suite] sections failed: {failed} (see {out})", file=sys.stderr)
        return 1
    return 0


def summary(results: dict) -> dict:
    """The headline figures against the issue's targets (None where a section did not run)."""
    def get(*keys):
        node = results
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    nfe = results.get("network_per_nfe") or {}
    best = min(((rec["seconds_per_nfe"], name) for name, rec in nfe.items()
                if isinstance(rec, dict) and "seconds_per_nfe" in rec), default=(None, None))
    fp32_step, bf16_step = get("train_step", "fp32", "seconds_per_step"), get("train_step", "bf16", "seconds_per_step")
    return {
        "device": results.get("device"),
        "bf16_eager_seconds_per_nfe": get("network_per_nfe", "bf16", "seconds_per_nfe"),
        "fastest_variant": best[1], "fastest_seconds_per_nfe": best[0],
        "synthesize_bf16_k4_seconds_per_volume": get("synthesis", "bf16", "k4_s"),
        "synthesize_bf16_compiled_k4_seconds_per_volume": get("synthesis", "bf16_compiled", "k4_s"),
        "train_bf16_compiled_speedup_vs_fp32": get("train_step", "bf16_compiled", "speedup_vs_fp32"),
        "host_copies_per_step": {s: get("host_audit", s, "copies_per_step") for s in ("ddim", "ddpm")},
        "synthesize_fp32_k1000_seconds_extrapolated": get("synthesis", "fp32", "k1000_s_extrapolated"),
        "train_bf16_speedup_vs_fp32": None if not (fp32_step and bf16_step) else fp32_step / bf16_step,
        "train_peak_gib_bf16_checkpointing": get("train_step", "bf16_checkpointing", "peak_memory_gib"),
        "loader_from_files_cases_per_s": get("loader", "from_files_cases_per_s"),
        "loader_from_cache_cases_per_s": get("loader", "from_cache_cases_per_s"),
        "targets": {"volume_at_k4_s": 1.0, "train_bf16_speedup": 1.5, "peak_gib_checkpointing": 24.0},
    }


if __name__ == "__main__":
    sys.exit(main())
