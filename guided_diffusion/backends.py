"""Where the network runs at inference: plain PyTorch (the default) or OpenVINO (the ``openvino`` extra).

``--backend openvino`` (``SampleConfig.backend``) runs the UNet's body with OpenVINO's CPU plugin:
on a CPU with AMX it is about 2x faster per network evaluation than PyTorch's bf16 eager path
(``benchmarks/bench_cpu_inference.py``, docs/performance.md). What runs where:

* the time (and label) embedding, :meth:`UNet3D.embed`, stays PyTorch in float32: under OpenVINO's
  bf16 the sinusoid's argument t x frequency would be rounded (t = 500 to the nearest 2), an
  output error well above eager bf16's;
* :meth:`UNet3D.body` is traced once (``torch.jit.trace`` at the smallest input the network takes,
  with the batch and spatial sizes left dynamic), converted with ``openvino.convert_model`` and
  saved as OpenVINO IR (an XML graph and a binary weights file: data, no code is executed to read
  them). The IR is cached under :func:`cache_dir`, keyed by the SHA-256 of the weights, the model
  config, the torch and OpenVINO versions and :data:`IR_FORMAT`; a folder is published complete
  (written under a temporary name, then renamed), so concurrent processes never read half a file;
* per input shape, the IR is reshaped to that static shape and compiled for the CPU with
  ``INFERENCE_PRECISION_HINT`` bf16 (``--precision bf16``) or f32 (``fp32``): seconds, not cached.

The conversion of the full cWDM network takes about 10 s once per weights (then read from the
cache); compiling for a shape about 2 s (``benchmarks/results/cpu_inference.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from .constants import BACKENDS, PRECISIONS
from .extras import import_extra

IR_FORMAT = 1  # bump when what is exported changes (UNet3D.body's inputs or outputs)
CACHE_ENV = "FAST_CWDM_CACHE"  # overrides the cache folder (default: $XDG_CACHE_HOME/fast-cwdm or ~/.cache/fast-cwdm)
_NETWORKS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def cache_dir() -> Path:
    """The folder for converted networks: ``$FAST_CWDM_CACHE``, else ``$XDG_CACHE_HOME/fast-cwdm``,
    else ``~/.cache/fast-cwdm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fast-cwdm"


def inference_network(model: torch.nn.Module, backend: str, precision: str):
    """What :func:`~guided_diffusion.diffusion.make_denoiser` calls for ``backend``: the model
    itself for ``"pytorch"``, an :class:`OpenVINONetwork` (one per model object and precision) for
    ``"openvino"``. Raises ValueError for an unknown backend or a model not on the CPU, and
    :class:`~guided_diffusion.extras.MissingExtraError` (naming the ``openvino`` extra) when the
    package is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "pytorch":
        return model
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"--backend openvino runs the network on the CPU; this model is on {device} "
                         "(pass --device cpu, or --backend pytorch on a GPU)")
    if not (hasattr(model, "embed") and hasattr(model, "body")):
        raise ValueError(f"--backend openvino needs a UNet3D (embed + body), got {type(model).__name__}")
    import_extra("openvino", "openvino", "--backend openvino")
    per_model = _NETWORKS.setdefault(model, {})
    if precision not in per_model:
        per_model[precision] = OpenVINONetwork(model, precision)
    return per_model[precision]


class OpenVINONetwork:
    """The network with its body run by OpenVINO: called like the model, ``net(x, t, label=None)``
    -> float32 (B, out_channels, D, H, W) on the CPU. Compiles once per input shape (the first call
    with a shape pays it; :attr:`seconds` says how long conversion and compilation took)."""

    def __init__(self, model: torch.nn.Module, precision: str):
        self.model, self.precision = model, precision
        self._compiled: dict[tuple[tuple[int, ...], tuple[int, ...]], Any] = {}
        self.seconds: dict[str, float] = {}
        self.ir_path = converted_ir(model, self.seconds)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            emb = self.model.embed(t.float(), label).float()
        x = x.detach().float().contiguous()
        request = self._request(tuple(x.shape), tuple(emb.shape))
        out = request.infer([x.numpy(), emb.contiguous().numpy()])
        return torch.from_numpy(out[0].copy())

    def _request(self, x_shape, emb_shape):
        key = (x_shape, emb_shape)
        if key not in self._compiled:
            import openvino as ov

            start = time.perf_counter()
            core = ov.Core()
            graph = core.read_model(str(self.ir_path))
            graph.reshape({0: list(x_shape), 1: list(emb_shape)})
            compiled = core.compile_model(graph, "CPU", {
                "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"})
            self._compiled[key] = compiled.create_infer_request()
            self.seconds[f"compile {x_shape}"] = time.perf_counter() - start
        return self._compiled[key]


def weights_key(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes, bytes), its config, the torch and
    OpenVINO versions and :data:`IR_FORMAT`: the name of its converted IR in the cache."""
    import openvino as ov
    digest = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    header = {"ir_format": IR_FORMAT, "torch": torch.__version__, "openvino": ov.__version__,
              "class": type(model).__name__, "config": cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def converted_ir(model: torch.nn.Module, seconds: dict | None = None) -> Path:
    """The path of ``model``'s body as OpenVINO IR (``model.xml`` + ``model.bin``) in the cache,
    converting it first when it is not there (``seconds["convert"]``)."""
    start = time.perf_counter()
    key = weights_key(model)
    folder = cache_dir() / "openvino" / key
    if seconds is not None:
        seconds["hash"] = time.perf_counter() - start
    if (folder / "model.xml").is_file() and (folder / "model.bin").is_file():
        return folder / "model.xml"
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key[:16]}.", suffix=".tmp"))
    try:
        graph = _convert(model)
        import openvino as ov
        ov.save_model(graph, str(tmp / "model.xml"), compress_to_fp16=False)
        (tmp / "source.json").write_text(json.dumps({"key": key, "openvino": ov.__version__, "torch": torch.__version__,
                                                     "ir_format": IR_FORMAT}, indent=1))
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, folder)  # atomic; fails when another process published the same key first
        except OSError:
            if not (folder / "model.xml").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if seconds is not None:
        seconds["convert"] = time.perf_counter() - start
    return folder / "model.xml"


class _Body(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.model.body(x, emb)


def _convert(model: torch.nn.Module):
    """``model.body`` as an OpenVINO model with dynamic batch and spatial sizes, traced in float32
    at the smallest input it takes (fast: the trace does not depend on the volume size)."""
    import openvino as ov
    cfg = model.cfg
    side = cfg.spatial_divisor
    x = torch.zeros(1, cfg.in_channels, side, side, side)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        emb = model.embed(torch.zeros(1), torch.zeros(1, dtype=torch.long) if cfg.num_modality_labels else None)
        traced = torch.jit.trace(_Body(model), (x, emb), check_trace=False)
        return ov.convert_model(traced, example_input=(x, emb), input=[
            ov.PartialShape([-1, cfg.in_channels, -1, -1, -1]), ov.PartialShape([-1, emb.shape[1]])])
