"""Full-size network evaluations on the CPU, variants side by side (issue 15, part 1).

One network evaluation = the cWDM UNet (full configuration, ``ModelConfig()``) on a
(1, 32, 112, 112, 80) input, as ``synthesize`` runs it with ``--precision bf16``. Variants,
interleaved round by round so that they see the same machine load (medians reported):

  eager_bf16                   the baseline: PyTorch eager under bf16 autocast (``--backend pytorch``)
  channels_last_bf16           weights and input in ``torch.channels_last_3d`` (oneDNN's NDHWC)
  compiled_bf16                torch.compile (inductor) with ``torch._inductor.config.freezing``
  compiled_channels_last_bf16  the same on channels-last weights and input
  openvino_bf16                ``--backend openvino`` (``guided_diffusion.backends``): the body
                               converted to OpenVINO IR, compiled with INFERENCE_PRECISION_HINT bf16
  onnxruntime_fp32             the network exported to ONNX and run by ONNX Runtime in float32 (its
                               CPU provider has no bf16 convolutions); needs onnx + onnxruntime

Every variant's first call is timed apart (``first_call_s``; for compiled / converted variants the
compile or conversion time, and for OpenVINO also the first call with the conversion cached,
``first_call_cached_s``). ``max_abs_diff_vs_eager`` compares the output with eager_bf16's;
``max_abs_diff_vs_fp32`` / ``mean_abs_diff_vs_fp32`` with one float32 eager evaluation (the bf16
error of each variant; the output layer is drawn at random so outputs are not all zero).
``seconds_per_volume_default_budget`` = 4 (the FATS default NFE) x ``seconds_per_nfe``: the rest of a
synthesis is under 2 % on the CPU. ``--volume`` also times one whole ``synthesize_volumes`` call
(DDIM, 4 NFE, cWDM clipping, IDWT) per listed backend: ``seconds_per_volume_measured``.

Run:  python benchmarks/bench_cpu_inference.py --rounds 2 --threads 2 [--size half --variants all]
Writes benchmarks/results/local/cpu_inference.json (--update_results: the committed file; --out).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_output_arguments, command_line, machine, output_path  # noqa: E402
from benchmarks.gpu_suite import random_network  # noqa: E402
from guided_diffusion import backends  # noqa: E402
from guided_diffusion.config import ModelConfig, SampleConfig  # noqa: E402
from guided_diffusion.fileio import save_json  # noqa: E402
from guided_diffusion.presets import TINY_MODEL  # noqa: E402

RESULT_NAME = "cpu_inference.json"
DEFAULT_NFE = 4
SIZES = {"full": (112, 112, 80), "half": (64, 64, 48), "quick": (16, 16, 16)}  # network-input spatial size
ALL_VARIANTS = ("eager_bf16", "channels_last_bf16", "compiled_bf16", "compiled_channels_last_bf16", "openvino_bf16",
                "onnxruntime_fp32")
KEPT_VARIANTS = ("eager_bf16", "channels_last_bf16", "openvino_bf16")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each variant once per round)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and OpenVINO / ONNX Runtime) threads")
    parser.add_argument("--size", choices=tuple(SIZES), default="full",
                        help="network input: full (1, 32, 112, 112, 80), half (64, 64, 48: 1/5 of the voxels, for "
                             "probing), quick (the tiny model on 16^3: a smoke run of the same code)")
    parser.add_argument("--quick", action="store_true", help="same as --size quick")
    parser.add_argument("--variants", default=",".join(KEPT_VARIANTS),
                        help=f"comma-separated, or 'all' ({', '.join(ALL_VARIANTS)}); eager_bf16 always runs")
    parser.add_argument("--no_fp32_reference", dest="fp32_reference", action="store_false",
                        help="skip the float32 evaluation behind max/mean_abs_diff_vs_fp32")
    parser.add_argument("--volume", default="", metavar="BACKENDS",
                        help="also time one synthesize_volumes call (DDIM, 4 NFE, bf16) with these backends "
                             "(comma-separated: pytorch, openvino)")
    add_output_arguments(parser, RESULT_NAME)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else args.size
    names = ALL_VARIANTS if args.variants == "all" else tuple(v for v in args.variants.split(",") if v)
    unknown = set(names) - set(ALL_VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    names = ("eager_bf16", *[n for n in ALL_VARIANTS if n in names and n != "eager_bf16"])
    missing = {"openvino_bf16": "openvino", "onnxruntime_fp32": "onnxruntime"}
    skipped = {n: f"{missing[n]} is not installed" for n in names
               if n in missing and importlib.util.find_spec(missing[n]) is None}
    for name, reason in skipped.items():
        print(f"[skip] {name}: {reason}", flush=True)
    names = tuple(n for n in names if n not in skipped)
    torch.set_num_threads(args.threads)
    cfg = TINY_MODEL if size == "quick" else ModelConfig()
    shape = (1, cfg.in_channels, *SIZES[size])
    model = random_network(cfg, "cpu")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])

    with tempfile.TemporaryDirectory(prefix="bench_cpu_inference_") as cache:
        os.environ[backends.CACHE_ENV] = cache  # an empty cache: the conversion is measured
        variants, first = {}, {}
        for name in names:
            start = time.perf_counter()
            variants[name], extra = _build(name, model, x, t, args.threads, cache)
            first[name] = {"first_call_s": time.perf_counter() - start, **extra}
            print(f"[setup] {name}: first call {first[name]['first_call_s']:.1f} s", flush=True)
        times = {name: [] for name in variants}
        outputs = {}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - start)
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
        reference = _evaluate(model, x, t, bf16=False) if args.fp32_reference else None
        volumes = {b: _volume_seconds(model, cfg, size, b) for b in args.volume.split(",") if b}

    base = statistics.median(times["eager_bf16"])
    records = []
    for name in variants:
        seconds = statistics.median(times[name])
        rec = {"variant": name, "dtype": "fp32" if name.endswith("fp32") else "bf16", "seconds_per_nfe": seconds,
               "times_s": times[name], "speedup_vs_eager_bf16": base / seconds,
               "max_abs_diff_vs_eager": (outputs[name] - outputs["eager_bf16"]).abs().max().item(),
               "seconds_per_volume_default_budget": DEFAULT_NFE * seconds, **first[name]}
        if reference is not None:
            diff = (outputs[name] - reference).abs()
            rec["max_abs_diff_vs_fp32"], rec["mean_abs_diff_vs_fp32"] = diff.max().item(), diff.mean().item()
        backend = {"eager_bf16": "pytorch", "openvino_bf16": "openvino"}.get(name)
        if backend in volumes:
            rec["seconds_per_volume_measured"] = volumes[backend]
        records.append(rec)
    result = {"command": command_line(), "machine": machine(), "input_shape": list(shape), "size": size,
              "baseline": "eager_bf16 (PyTorch eager, bf16 autocast: --precision bf16 --backend pytorch)",
              "default_nfe": DEFAULT_NFE, "rounds": args.rounds, "records": records, "skipped": skipped,
              "reference_max_abs": outputs["eager_bf16"].abs().max().item(),
              "versions": _versions()}
    save_json(result, output_path(args, RESULT_NAME))
    for rec in records:
        print(f"{rec['variant']:28s} {rec['seconds_per_nfe']:8.3f} s/NFE  {rec['speedup_vs_eager_bf16']:5.2f}x  "
              f"max|diff| vs eager {rec['max_abs_diff_vs_eager']:.3g}  first call {rec['first_call_s']:.1f} s")
    return 0


def _evaluate(net, inp, t, bf16: bool = True) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return net(inp, t).float()


def _build(name: str, model, x, t, threads: int, cache: str):
    """(the variant's evaluation function, extra record fields); the first call is made here."""
    extra = {}
    if name == "eager_bf16":
        fn = lambda: _evaluate(model, x, t)  # noqa: E731
    elif name.startswith(("channels_last", "compiled")):
        net, inp = model, x
        if "channels_last" in name:
            net = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
            inp = x.to(memory_format=torch.channels_last_3d)
        if name.startswith("compiled"):
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True  # constant-fold and prepack the weights (inference only)
            net = torch.compile(copy.deepcopy(net))
        fn = lambda: _evaluate(net, inp, t)  # noqa: E731
    elif name == "openvino_bf16":
        network = backends.inference_network(model, "openvino", "bf16")
        fn = lambda: network(x, t)  # noqa: E731
        fn()
        extra = {"convert_s": network.seconds.get("convert"), "hash_s": network.seconds.get("hash"),
                 "compile_s": sum(v for k, v in network.seconds.items() if k.startswith("compile"))}
        start = time.perf_counter()  # a new process with the conversion cached: hash, read, compile, run
        backends.OpenVINONetwork(model, "bf16")(x, t)
        extra["first_call_cached_s"] = time.perf_counter() - start
        return fn, extra
    elif name == "onnxruntime_fp32":
        import onnxruntime as ort
        path = str(Path(cache) / "model.onnx")
        with torch.no_grad():
            torch.onnx.export(model, (x, t), path, dynamo=False, input_names=["x", "t"])
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        fn = lambda: torch.from_numpy(session.run(None, {"x": x.numpy(), "t": t.numpy()})[0])  # noqa: E731
    else:
        raise ValueError(name)
    fn()
    return fn, extra


def _volume_seconds(model, cfg, size: str, backend: str) -> float:
    """One ``synthesize_volumes`` call at the network size of ``size`` (DDIM, 4 NFE, bf16, cWDM
    clipping), with the network already converted / compiled for that shape by the variants above."""
    from guided_diffusion.factory import build_schedule
    from guided_diffusion.config import DiffusionConfig
    from guided_diffusion.synthesis import synthesize_volumes
    schedule = build_schedule(DiffusionConfig())
    volumes = torch.rand(1, 4, *(2 * s for s in SIZES[size]), generator=torch.Generator().manual_seed(1))
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        return None
    sample_cfg = SampleConfig(sampler="ddim", nfe=DEFAULT_NFE, precision="bf16", backend=backend)
    timesteps = [999, 749, 499, 249]
    start = time.perf_counter()
    synthesize_volumes(model, schedule, volumes, "t2f", sample_cfg, ["bench"], timesteps)
    seconds = time.perf_counter() - start
    print(f"[volume] {backend}: {seconds:.1f} s", flush=True)
    return seconds


def _versions() -> dict:
    versions = {"torch": torch.__version__}
    for module in ("openvino", "onnxruntime"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return versions


if __name__ == "__main__":
    sys.exit(main())
