"""``loupe bench speed --onnx``: the same ViTs exported to ONNX and run by ONNX Runtime, against timm fp32.

For each architecture of the options (random weights, the model, size and batch of the ``models`` section): the
plain timm fp32 model is exported (``torch.onnx.export``, the dynamo exporter, else the TorchScript one), run by an
ONNX Runtime CPU session in fp32 and after ONNX Runtime's dynamic int8 quantization of its ``MatMul`` weights, and
timed in one set of interleaved rounds with timm fp32 and the suite's ``int8`` mode (img/s and ratios, so machine
load slows all four alike). Outputs are checked against timm fp32 on the same batch first.

ONNX Runtime is optional (``pip install -e '.[onnx]'``); without it the section says so.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loupe.core.models.inference import interleaved_times, with_mode
from loupe.workflows.bench_speed import SpeedOptions, _loupe_model

log = logging.getLogger(__name__)
NOT_INSTALLED = "onnxruntime not installed: pip install -e '.[onnx]'"


def onnx_section(opts: SpeedOptions) -> dict[str, Any]:
    """ONNX Runtime fp32 and dynamic int8 vs timm fp32 and the suite's int8 mode, per architecture of ``opts``."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"note": NOT_INSTALLED}
    load_before = list(os.getloadavg())
    models = [onnx_arch(arch, opts) for arch in opts.archs]
    # OMP_WAIT_POLICY: torch's OpenMP threads spin at barriers by default, which can slow torch many times over on a
    # machine whose cores another process keeps busy (ONNX Runtime's own threads are told not to spin)
    return {"onnxruntime": ort.__version__, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()), "models": models}  # fmt: skip


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> dict[str, str]:
    """Write ``model`` traced on ``x`` to ``path``: the dynamo exporter, else ``dynamo=False``.

    Returns ``{"exporter": "dynamo" | "torchscript"}`` and, when dynamo failed, its error as ``dynamo_error``;
    raises the TorchScript exporter's error when both fail."""
    out: dict[str, str] = {}
    with warnings.catch_warnings():  # the exporters warn about every traced shape and deprecated path
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, input_names=["x"])
            return {"exporter": "dynamo"}
        except Exception as exc:  # noqa: BLE001 - the older exporter may still manage
            out["dynamo_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.info("dynamo ONNX export failed (%s); trying dynamo=False", out["dynamo_error"])
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], opset_version=17)
    return out | {"exporter": "torchscript"}


def ort_session(path: Path):
    """An ONNX Runtime CPU session on ``path`` with torch's thread count and every graph optimisation, its idle
    threads sleeping rather than spinning (the runs it is timed against share the cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle ORT threads otherwise spin for a while after each run, taking the cores from the torch runs timed next
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def quantize_onnx_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization of ``src``: ``MatMul`` weights int8 per tensor, activations per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])


def agreement(out: np.ndarray | torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max abs difference of ``out`` to the reference logits ``ref`` ``[B, K]``, and the cosine similarity of the
    two flattened (a batch-wide figure: with few classes one image's logits are too short for a stable cosine)."""
    o, r = torch.as_tensor(out).float().flatten(), ref.float().flatten()
    return {"max_abs_diff_vs_timm": float((o - r).abs().max()),
            "cosine_vs_timm": float(torch.nn.functional.cosine_similarity(o, r, dim=0))}  # fmt: skip


def onnx_arch(arch: str, opts: SpeedOptions) -> dict[str, Any]:
    """timm fp32, the suite's int8, ONNX Runtime fp32 and int8 on ``arch``: agreement, img/s and ratios."""
    import timm

    torch.manual_seed(0)
    baseline = timm.create_model(arch, pretrained=False, num_classes=2, img_size=opts.img_size).eval()
    suite_int8 = with_mode(_loupe_model(arch, opts.img_size, baseline), "int8").eval()
    x = torch.randn(opts.batch_size, 3, opts.img_size, opts.img_size)
    res: dict[str, Any] = {"arch": arch, "img_size": opts.img_size, "batch_size": opts.batch_size}
    with torch.inference_mode():
        ref, ref_int8 = baseline(x), suite_int8(x)
    with tempfile.TemporaryDirectory(prefix="loupe-onnx-") as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model_int8.onnx"
        try:
            res |= export_onnx(baseline, x, fp32_path)
            fp32 = ort_session(fp32_path)
        except Exception as exc:  # noqa: BLE001 - reported in the section; the other sections keep their figures
            return res | {"error": f"export failed: {type(exc).__name__}: {str(exc)[:500]}"}
        feed = {fp32.get_inputs()[0].name: x.numpy()}
        sessions = {"ort_fp32": fp32}
        try:
            quantize_onnx_int8(fp32_path, int8_path)
            sessions["ort_int8"] = ort_session(int8_path)
        except Exception as exc:  # noqa: BLE001 - fp32 is still worth timing
            res["ort_int8_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        checks = {"suite_int8": agreement(ref_int8, ref)}
        checks |= {k: agreement(s.run(None, feed)[0], ref) for k, s in sessions.items()}
        runs: dict[str, Callable[[], Any]] = {"timm_fp32": lambda: baseline(x), "suite_int8": lambda: suite_int8(x)}
        runs |= {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
        times = interleaved_times(runs, opts.repeats, opts.min_seconds)
    res["runtimes"] = timing_rows(times, opts.batch_size, checks)
    return res


def timing_rows(times: dict[str, float], batch: int, checks: dict[str, dict[str, float]]) -> dict[str, Any]:
    """img/s of each run (seconds per batch of ``batch`` in ``times``) and its ratio to timm fp32 and to the
    suite's int8 (above 1: faster), with its agreement with timm fp32 from ``checks``."""
    img_s = {k: batch / t for k, t in times.items()}
    return {k: {"img_s": v, "ratio_vs_timm_fp32": v / img_s["timm_fp32"], "ratio_vs_suite_int8":
                v / img_s["suite_int8"], **checks.get(k, {})} for k, v in img_s.items()}  # fmt: skip
