"""Full-size network evaluations on the CPU, variants side by side (issue 15, part 1).

One network evaluation = the cWDM UNet (full configuration) on a (1, 32, 112, 112, 80) input under
bf16 autocast, as ``synthesize`` runs it with ``--precision bf16``. Variants, interleaved round by
round so that they see the same machine load (medians reported):

  eager_bf16_fp32_groupnorm  the path before issue 15 (GroupNorm through a float32 copy)
  eager_bf16                 today's eager path (native bf16 GroupNorm, float32 statistics)
  compiled_bf16              ``SampleConfig.compile`` (torch.compile, inductor; its compile time is
                             reported separately as ``first_call_s``)
  channels_last_bf16         weights and input in ``torch.channels_last_3d`` (oneDNN's preferred
                             NDHWC layout; not wired into the library unless it wins)
  openvino_bf16              the network converted with OpenVINO (``ov.convert_model``) and compiled
                             for the CPU with ``INFERENCE_PRECISION_HINT=bf16``; only when the
                             ``openvino`` package is installed (not a project dependency); its
                             conversion + compilation time is ``first_call_s``

``max_abs_diff_vs_eager`` compares each output with eager_bf16's (the output layer is drawn at
random so outputs are not all zero). ``seconds_per_volume_default_budget`` = 4 evaluations (the FATS
default NFE) + the measured rest of a K = 1 synthesis is not included: the rest is under 2 % on
the CPU (README "Performance"), so it is 4 x seconds_per_nfe.

Run:  python benchmarks/bench_cpu_inference.py --rounds 2 --threads 2
Writes benchmarks/results/local/cpu_inference.json (--update_results: the committed file; --out).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_output_arguments, machine, output_path  # noqa: E402
from benchmarks.gpu_suite import fp32_groupnorm, random_network  # noqa: E402
from guided_diffusion.config import ModelConfig  # noqa: E402
from guided_diffusion.fileio import save_json  # noqa: E402
from guided_diffusion.presets import TINY_MODEL  # noqa: E402

RESULT_NAME = "cpu_inference.json"
DEFAULT_NFE = 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each variant once per round)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="tiny model and input (a smoke run of the same code)")
    add_output_arguments(parser, RESULT_NAME)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TINY_MODEL if args.quick else ModelConfig()
    shape = (1, cfg.in_channels, *((8, 8, 6) if args.quick else (112, 112, 80)))
    model = random_network(cfg, "cpu")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])

    def evaluate(net, inp=x) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return net(inp, t).float()

    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
    x_channels_last = x.to(memory_format=torch.channels_last_3d)
    compiled = torch.compile(model)
    start = time.perf_counter()
    evaluate(compiled)
    compile_s = time.perf_counter() - start
    openvino_request = _openvino_request(model, x, t, args.threads)
    variants = {
        "eager_bf16_fp32_groupnorm": (lambda: _with(fp32_groupnorm, lambda: evaluate(model))),
        "eager_bf16": (lambda: evaluate(model)),
        "compiled_bf16": (lambda: evaluate(compiled)),
        "channels_last_bf16": (lambda: evaluate(channels_last, x_channels_last)),
    }
    if openvino_request is not None:
        request, convert_s = openvino_request
        variants["openvino_bf16"] = lambda: torch.from_numpy(
            next(iter(request.infer([x.numpy(), t.numpy()]).values())).copy()).float()
    times = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["eager_bf16_fp32_groupnorm"])
    records = []
    for name in variants:
        seconds = statistics.median(times[name])
        rec = {"variant": name, "dtype": "bf16", "seconds_per_nfe": seconds, "times_s": times[name],
               "speedup_vs_eager_bf16": base / seconds,
               "max_abs_diff_vs_eager": (outputs[name] - outputs["eager_bf16"]).abs().max().item(),
               "seconds_per_volume_default_budget": DEFAULT_NFE * seconds}
        if name == "compiled_bf16":
            rec["first_call_s"] = compile_s
        if name == "openvino_bf16":
            rec["first_call_s"] = convert_s
        records.append(rec)
    result = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "input_shape": list(shape),
              "baseline": "eager_bf16_fp32_groupnorm (the bf16 eager path before issue 15)",
              "default_nfe": DEFAULT_NFE, "rounds": args.rounds, "records": records,
              "reference_max_abs": outputs["eager_bf16"].abs().max().item()}
    save_json(result, output_path(args, RESULT_NAME))
    for rec in records:
        print(f"{rec['variant']:28s} {rec['seconds_per_nfe']:8.3f} s/NFE  {rec['speedup_vs_eager_bf16']:5.2f}x  "
              f"max|diff| {rec['max_abs_diff_vs_eager']:.3g}")
    return 0


def _openvino_request(model, x, t, threads: int):
    """An OpenVINO inference request for the network in bf16, and the seconds it took; None when
    the openvino package is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    start = time.perf_counter()
    compiled = ov.Core().compile_model(ov.convert_model(model, example_input=(x, t)), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    return compiled.create_infer_request(), time.perf_counter() - start


def _with(context, fn):
    with context():
        return fn()


if __name__ == "__main__":
    sys.exit(main())
