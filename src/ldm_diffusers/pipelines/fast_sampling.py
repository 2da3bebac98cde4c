"""``LDMPipeline.enable_fast_sampling()``: eps_theta and the decoder compiled once per shape.

What pays, measured on this project's machines (``benchmarks/bench_sampling.py --fast``):

* CPU: ``torch.compile(fullgraph=True)`` with inductor's *freezing* (weights become constants: convolutions get
  oneDNN's pre-packed weights, batch-norm-free constant folding) and the C++ wrapper (no Python between kernels).
  The built-in emoji UNet (6.9M, batch 2 of 16x16 latents, 2 cores): 21-28 ms eager, 13 ms compiled (48 s compile
  the first time; inductor's on-disk cache serves later processes). Default inductor settings, without freezing, were
  slower than eager here, and channels-last was slower too (23 -> 29 ms), so neither is used on CPU.
* CUDA: the same plus CUDA graphs (``triton.cudagraphs``): one graph launch per denoising step instead of hundreds of
  kernel launches; the timesteps are moved to the device once, before the loop, so no step copies from the host.

* CPU, ``backend="openvino"`` (optional: ``pip install ldm-diffusers[openvino]``): eps_theta and the decoder
  converted to OpenVINO graphs, run in float32 (``INFERENCE_PRECISION_HINT=f32``; OpenVINO's default on CPUs
  with bf16 units would change the outputs by ~0.5%). Its graph compiler fuses convolutions, norms and attention
  for the CPU in seconds instead of inductor's minutes, and its compiled blobs are cached on disk
  (``~/.cache/ldm_diffusers/openvino``) for later processes. Measured in ``benchmarks/bench_sampling.py``.
  Once it has run, do not fork the process (``DataLoader`` workers with the default ``fork`` start method): forking
  after OpenVINO's TBB thread pool exists crashed the forking process here.

Shapes are static (``dynamic=False``): one compiled graph per (batch, latent size, guidance on/off), reused by every
step and every later call with the same shape. Frozen weights are read at the first call: after loading other
weights, call ``enable_fast_sampling()`` again.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

BACKENDS = ("auto", "inductor", "openvino")


def choose_backend(device: torch.device) -> tuple[str, str]:
    """(the fastest backend this machine has for ``device``, why): OpenVINO on a CPU where it is installed (on the
    built-in model at batch 1 it ran at 0.50 of eager's time after an 8 s compile, inductor at 0.77 after 66 s),
    else inductor."""
    if device.type != "cpu":
        return "inductor", f"on {device.type}, torch.compile with CUDA graphs is the compiler for the device"
    if importlib.util.find_spec("openvino") is not None:  # measured: benchmarks/bench_sampling.py --model builtin
        return "openvino", ("OpenVINO is installed: on CPUs it compiles in seconds and ran the built-in model at half "
                            "of eager's time per step, against inductor's 0.77 after a minute of compiling")
    return "inductor", "OpenVINO is not installed (pip install 'ldm-diffusers[openvino]' compiles in seconds on CPUs)"


def compile_options(device: torch.device) -> dict:
    """inductor options for ``torch.compile(options=...)`` on ``device`` (see the module docstring)."""
    options = {"freezing": True}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    elif device.type == "cpu":
        options["cpp_wrapper"] = True
    return options


@dataclass
class FastSampling:
    """The compiled callables of a pipeline and the seconds spent compiling (measured at each new shape's first
    call: compilation is lazy), with the backend that compiled them and why it was chosen."""

    unet: torch.nn.Module
    decode: object
    backend: str = "inductor"
    reason: str = ""
    compile_seconds: dict = field(default_factory=dict)

    def timed(self, name: str, key, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; the first call for ``(name, key)`` is timed as compilation."""
        label = f"{name} {key}"
        if label in self.compile_seconds:
            return fn(*args, **kwargs)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.compile_seconds[label] = time.perf_counter() - start
        return out


class _Forward(torch.nn.Module):
    """``module.<method>(*tensors).sample`` as a module of plain tensors in and out (the weights registered as
    parameters), for tracing into another runtime."""

    def __init__(self, module: torch.nn.Module, method: str, keywords: tuple[str, ...]):
        super().__init__()
        self.module, self.method, self.keywords = module, method, keywords

    def forward(self, *tensors):
        positional = len(tensors) - len(self.keywords)
        fn = getattr(self.module, self.method)
        return fn(*tensors[:positional], **dict(zip(self.keywords, tensors[positional:]))).sample


class OpenVINOFunction:
    """``module.<method>`` (the UNet's forward, or ``vae.decode``) run by OpenVINO on the CPU: converted and compiled at the first call
    of each input signature (shapes and which keyword tensors are given), then called like ``fn``, returning an
    object with ``.sample``. Weights are read at conversion: call ``enable_fast_sampling()`` again after loading
    others."""

    def __init__(self, module: torch.nn.Module, method: str = "forward"):
        try:
            import openvino
        except ImportError as err:
            raise ImportError("backend='openvino' needs OpenVINO: `pip install ldm-diffusers[openvino]` (or "
                              "`pip install openvino`); backend='inductor' needs nothing more.") from err
        self.module, self.method, self._ov = module, method, openvino
        self._core = openvino.Core()
        cache = os.environ.get("LDM_DIFFUSERS_OPENVINO_CACHE", os.path.expanduser("~/.cache/ldm_diffusers/openvino"))
        self._core.set_property({"CACHE_DIR": cache})
        self._compiled: dict = {}

    def __call__(self, *args, **kwargs):
        given = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        tensors = [torch.as_tensor(a) for a in args] + list(given.values())
        key = (tuple(given), tuple((tuple(t.shape), t.dtype) for t in tensors))
        request = self._compiled.get(key)
        if request is None:
            module = _Forward(self.module, self.method, tuple(given)).eval()
            with torch.no_grad():  # torch.export (not the deprecated TorchScript tracer) -> OpenVINO
                graph = self._ov.convert_model(torch.export.export(module, tuple(tensors)))
            compiled = self._core.compile_model(graph, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                              "INFERENCE_PRECISION_HINT": "f32"})
            request = self._compiled[key] = compiled.create_infer_request()
        out = request.infer([t.detach().cpu().numpy() for t in tensors])[0]
        return SimpleNamespace(sample=torch.from_numpy(out.copy()).to(tensors[0].device))


def build_fast_sampling(unet: torch.nn.Module, vae, device: torch.device, compile_decoder: bool = True,
                        backend: str = "inductor") -> FastSampling:
    """Compiled eps_theta (and ``vae.decode``) for ``device``; nothing runs until the first call."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    reason = f"backend={backend!r} was asked for"
    if backend == "auto":
        backend, reason = choose_backend(device)
    if backend == "openvino":
        if device.type != "cpu":
            raise ValueError(f"backend='openvino' runs on the CPU; the pipeline is on {device}. Use backend='inductor'.")
        return FastSampling(unet=OpenVINOFunction(unet),
                            decode=OpenVINOFunction(vae, "decode") if compile_decoder else vae.decode,
                            backend=backend, reason=reason)
    options = compile_options(device)
    compiled_unet = torch.compile(unet, fullgraph=True, dynamic=False, options=options)
    decode = torch.compile(vae.decode, fullgraph=True, dynamic=False, options=options) if compile_decoder else vae.decode
    return FastSampling(unet=compiled_unet, decode=decode, backend=backend, reason=reason)
