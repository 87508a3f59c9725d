"""Inference modes: how a trained model runs when it scores — precision, compilation, token merging — and
``auto``, which measures them on this machine and picks the fastest that stays accurate.

A mode is written ``PRECISION[+compile][+ort][+tomeR]``:

- ``fp32``: eager float32, the reference every other mode is measured against;
- ``bf16``: bfloat16 autocast, only where the hardware has bf16 instructions (a CPU with ``avx512_bf16`` or
  ``amx_bf16``, a CUDA device with native bf16); elsewhere it would be emulated, ~10x slower, and is refused;
- ``int8``: dynamic int8 quantization of every ``nn.Linear`` (weights int8 per tensor, activations quantized per
  batch; ``torch.ao.quantization.quantize_dynamic``), CPU only;
- ``+compile``: ``torch.compile`` (inductor) of the whole forward; refused where inductor cannot build kernels;
- ``+ort``: the fp32 model exported to ONNX and run by ONNX Runtime on the CPU (`loupe.core.models.onnx_runtime`),
  ``int8+ort`` with ONNX Runtime's dynamic int8 quantization of its ``MatMul`` weights instead of torch's; fp32 or
  int8 only, never with ``+compile``; needs ``pip install -e '.[onnx]'``;
- ``+tomeR``: token merging (`loupe.core.models.tome`): ``tome8``, ``tome8d`` (decreasing), ``tome[...]``, or
  ``tome`` alone for the ``tome_r`` the model's spec stores (a model fine-tuned with merging).

`InferenceModel` wraps a loaded model in a mode; it keeps the model itself (``base``: fp32, every token) for what
needs it (Grad-CAM, the fp32 reference). ``auto`` (measure the modes here, keep the fastest accurate one) is in
`loupe.core.models.auto_mode`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models.heads import model_outputs
from loupe.core.models.spec import WeightSpec
from loupe.core.models.tome import ToMeConfig, merging_problems, merging_view, parse_tome

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
ORT_PRECISIONS = ("fp32", "int8")
REFERENCE = "fp32"
#: Instruction-set flags (Linux ``/proc/cpuinfo``) that decide which CPU kernels are native.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip


# -------------------------------------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class InferenceMode:
    """One way to run a model (see the module): a precision, optional compilation, optional token merging,
    optionally run by ONNX Runtime (``ort``)."""

    precision: str = REFERENCE
    compile: bool = False
    tome: ToMeConfig | None = None
    ort: bool = False

    def __post_init__(self) -> None:
        if self.ort and self.precision not in ORT_PRECISIONS:
            raise ConfigError(f"inference mode {self}: ONNX Runtime (+ort) runs {' or '.join(ORT_PRECISIONS)} only, "
                              f"not {self.precision}; write int8+ort or fp32+ort, or drop +ort")  # fmt: skip
        if self.ort and self.compile:
            raise ConfigError(f"inference mode {self}: +ort and +compile exclude each other (ONNX Runtime runs its own "
                              f"graph, torch.compile is never used there); keep one of them")  # fmt: skip

    @classmethod
    def parse(cls, text: str, spec: WeightSpec | None = None) -> InferenceMode:
        """``bf16+compile+tome8`` → a mode; ``tome`` alone takes the spec's ``inference.tome_r``."""
        parts = [p.strip() for p in str(text).lower().split("+") if p.strip()]
        precision, compiled, tome, ort = REFERENCE, False, None, False
        seen_precision = False
        for p in parts:
            if p in PRECISIONS:
                if seen_precision:
                    raise ConfigError(f"inference mode {text!r} names two precisions; pick one of {list(PRECISIONS)}")
                precision, seen_precision = p, True
            elif p == "compile":
                compiled = True
            elif p == "ort":
                ort = True
            elif p == "tome":
                tome = spec_tome(spec, text)
            elif p.startswith("tome"):
                tome = parse_tome(p)
            else:
                raise ConfigError(
                    f"inference mode {text!r}: {p!r} is unknown; write PRECISION[+compile][+ort][+tomeR] with "
                    f"PRECISION one of {list(PRECISIONS)} (e.g. bf16+compile+tome8, int8+ort), or auto"
                )
        if not parts:
            raise ConfigError(f"inference mode {text!r} is empty; use fp32, bf16, int8, ...+compile, ...+tome8 or auto")
        return cls(precision, compiled, tome, ort)

    def __str__(self) -> str:
        parts = [self.precision] + (["compile"] if self.compile else []) + (["ort"] if self.ort else [])
        return "+".join(parts + ([self.tome.label] if self.tome else []))

    @property
    def is_reference(self) -> bool:
        return self.precision == REFERENCE and not self.compile and self.tome is None and not self.ort


def spec_tome(spec: WeightSpec | None, text: str) -> ToMeConfig:
    r = (spec.inference.get("tome_r") if spec is not None else None) or None
    if r is None:
        raise ConfigError(f"inference mode {text!r} says 'tome' without r, and the model's spec stores no "
                          f"inference.tome_r; write tome8 (or the r the model was fine-tuned with)")  # fmt: skip
    return ToMeConfig(r=tuple(r) if isinstance(r, list | tuple) else int(r))


def mode_problem_text(text: str, spec: WeightSpec | None = None) -> str | None:
    """Why ``text`` is not a valid mode (``auto`` included), or None; for spec validation."""
    if text == "auto":
        return None
    try:
        InferenceMode.parse(text, spec)
    except ConfigError as exc:
        return exc.problems[0]
    return None


# ------------------------------------------------------------------------------------------------- capabilities
@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def instruction_sets() -> list[str]:
    """The vector / matrix instruction sets of this CPU that matter for inference kernels."""
    return [f for f in ISA_FLAGS if f in cpu_flags()]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def bf16_problem(device: torch.device) -> str | None:
    """Why bf16 cannot run natively on ``device``, or None."""
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        return f"{device} has no native bf16 support (torch.cuda.is_bf16_supported() is False); use fp32"
    flags = cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return None
    return ("this CPU has no native bf16 instructions (neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo flags): bf16 "
            "would be emulated, about 10x slower than fp32; use int8 or fp32 here")  # fmt: skip


def int8_problem(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"int8 dynamic quantization runs on the CPU only, not on {device}; use bf16 or fp32 there"
    engines = set(torch.backends.quantized.supported_engines) - {"none"}
    if not engines:
        return "this torch build has no quantized CPU engine (fbgemm / x86 / onednn / qnnpack); use fp32"
    return None


@functools.cache
def compile_problem(device_type: str = "cpu") -> str | None:
    """Why ``torch.compile`` (inductor) does not work on this machine, or None; tried once per process."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T) + 1.0, dynamic=False)
        fn(torch.randn(8, 8, device=device_type))
    except Exception as exc:  # noqa: BLE001 - any failure to build kernels means the mode is unavailable here
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return (f"torch.compile does not work here ({type(exc).__name__}: {first}); inductor needs a working C++ "
                f"compiler (g++ / clang on PATH) for CPU kernels; use an eager mode")  # fmt: skip
    return None


def ort_device_problem(device: torch.device) -> str | None:
    """Why the ``+ort`` modes cannot run on ``device``, or None."""
    from loupe.core.models.onnx_runtime import ort_problem

    if device.type != "cpu":
        return f"+ort runs ONNX Runtime's CPU session only, not on {device}; drop +ort there"
    return ort_problem()


def mode_problems(mode: InferenceMode, device: str | torch.device = "cpu", model: nn.Module | None = None) -> list[str]:
    """Why ``mode`` cannot run on ``device`` (for ``model``, when given); empty when it can."""
    dev = torch.device(device)
    out = []
    if mode.precision == "bf16" and (p := bf16_problem(dev)):
        out.append(p)
    if mode.precision == "int8" and (p := int8_problem(dev)):
        out.append(p)
    if mode.compile and (p := compile_problem(dev.type)):
        out.append(p)
    if mode.ort and (p := ort_device_problem(dev)):
        out.append(p)
    if mode.tome is not None and model is not None:
        out += merging_problems(model)
    return out


# --------------------------------------------------------------------------------------------- running a mode
class InferenceModel(nn.Module):
    """``base`` (a loaded classifier) run in ``mode``: ``forward_outputs`` / ``forward`` / ``aggregate_units`` as
    the model's own, outputs in float32. ``base`` stays as loaded (fp32, every token) for Grad-CAM and masks."""

    def __init__(self, base: nn.Module, mode: InferenceMode, device: str | torch.device = "cpu"):
        super().__init__()
        problems = mode_problems(mode, device, base)
        if problems:
            raise ConfigError(problems, source=f"inference mode {mode}")
        self.base, self.mode = base, mode
        fast = merging_view(base, mode.tome) if mode.tome is not None else base
        if mode.precision == "int8" and not mode.ort:
            fast = quantize_int8(fast)
        self.fast = fast  # with +ort: the fp32 torch model, for aggregate_units (MIL heads) and the export
        self._run: Callable[[torch.Tensor], dict[str, torch.Tensor]] = self._outputs
        if mode.compile:
            self._run = torch.compile(self._outputs)
        if mode.ort:
            from loupe.core.models.onnx_runtime import OrtRunner

            self._run = OrtRunner(fast, mode.precision, tag=f"{mode}|{mode.tome!r}")

    @property
    def backbone(self) -> nn.Module:
        return self.base.backbone

    def _outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return model_outputs(self.fast, x)

    def precision_context(self, device_type: str) -> contextlib.AbstractContextManager:
        if self.mode.precision == "bf16" and not self.mode.ort:
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.precision_context(x.device.type):
            out = self._run(x)
        return {k: v.float() for k, v in out.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_outputs(x)["logits"]

    def aggregate_units(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.precision_context(embeddings.device.type):  # with +ort: torch, fp32 (``fast`` is not exported)
            out = self.fast.aggregate_units(embeddings)
        return {k: v.float() for k, v in out.items()}


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantized to int8 (the original is unchanged)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch marks the eager API deprecated in favour of torchao, not installed here
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)


def full_token_model(model: nn.Module) -> nn.Module:
    """The fp32, every-token model behind ``model`` (itself when it is not an `InferenceModel`)."""
    return model.base if isinstance(model, InferenceModel) else model


def with_mode(model: nn.Module, mode: str | InferenceMode, spec: WeightSpec | None = None,
              device: str | torch.device = "cpu") -> nn.Module:  # fmt: skip
    """``model`` run in ``mode`` (the model itself for plain fp32)."""
    m = mode if isinstance(mode, InferenceMode) else InferenceMode.parse(mode, spec)
    return model if m.is_reference else InferenceModel(model, m, device)
