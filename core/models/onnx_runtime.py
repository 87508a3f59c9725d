"""The ``+ort`` inference modes: a model exported to ONNX and run by an ONNX Runtime CPU session.

`OrtRunner` exports the fp32 torch model (the merging view for ``+tomeR``) on its first call with a dynamic batch
axis (the dynamo exporter), quantizes its ``MatMul`` weights to int8 for ``int8+ort`` (ONNX Runtime's dynamic
quantization: weights int8 per tensor, activations per call), and caches the file under
``<data dir>/cache/onnx/<key>.onnx``, keyed by the weights' bytes, the mode, the input shape ``(C, H, W)`` and the
torch / onnxruntime versions: a second model on the same weights loads the file without exporting. An ``.onnx``
file is a protobuf graph, read without unpickling anything.

ONNX Runtime is optional: ``pip install -e '.[onnx]'``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loupe.core.models.heads import model_outputs

log = logging.getLogger(__name__)
INPUT_NAME = "x"
#: Bumped when what is exported changes, so files written by older code are not reused.
FORMAT_VERSION = 1


@functools.cache
def ort_problem() -> str | None:
    """Why ONNX Runtime cannot be used here, or None."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError as exc:
        return f"onnxruntime / onnxscript are not importable ({exc}); pip install -e '.[onnx]'"
    return None


class _Outputs(nn.Module):
    """``model``'s named outputs as a tuple in ``keys`` order (what an ONNX graph can return)."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = model_outputs(self.model, x)
        return tuple(out[k] for k in self.keys)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict: every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def onnx_cache_dir() -> Path:
    from loupe.core.paths import data_dir

    return data_dir() / "cache" / "onnx"


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, dynamic_batch: bool = True) -> None:
    """Write ``model`` (returning a tuple of tensors) traced on ``x`` ``[B, C, H, W]`` to ``path`` with the dynamo
    exporter; ``dynamic_batch``: the batch axis stays symbolic (``x`` then needs B ≥ 2: torch specialises 1).
    The weights go inside the file (one file to cache and move; ONNX's limit is 2 GB, past ViT-L in fp32)."""
    dims = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings():  # the exporter warns about every traced shape and deprecated path
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, input_names=[INPUT_NAME],
                          output_names=list(model.keys), dynamic_shapes=dims, external_data=False)  # fmt: skip


def quantize_onnx_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization of ``src``: ``MatMul`` weights int8 per tensor, activations per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    root.addFilter(_no_preprocessing_advice)  # for this call only: the quantizer advises it on the root logger
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    finally:
        root.removeFilter(_no_preprocessing_advice)


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop ONNX Runtime's "consider to run pre-processing before quantization" (shape inference for static
    quantization; dynamic int8 of MatMul weights does not need it), keep every other record."""
    return "pre-processing before quantization" not in record.getMessage()


def ort_session(path: Path) -> Any:
    """A CPU session on ``path`` with torch's thread count; idle threads sleep rather than spin (other runs, torch's
    included, share the cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtRunner:
    """``model`` (fp32 torch) run by ONNX Runtime in ``precision`` (``fp32`` or ``int8``): ``runner(x)`` →
    ``model_outputs``' dict, float32 CPU tensors. ``tag`` names what else decides the graph (the mode, its token
    merging) in the cache key; ``cache_dir`` defaults to ``<data dir>/cache/onnx``."""

    def __init__(self, model: nn.Module, precision: str, tag: str = "", cache_dir: Path | None = None):
        if precision not in ("fp32", "int8"):
            raise ValueError(f"ONNX Runtime runs fp32 or int8, not {precision!r}")
        self.model, self.precision, self.tag, self.cache_dir = model.eval(), precision, tag, cache_dir
        self._digest: str | None = None
        self._sessions: dict[tuple[int, ...], Any] = {}  # input shape (C, H, W), or (B, C, H, W) when static
        self._static = False  # set when the dynamic-batch export failed: one file per batch size then

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.device.type != "cpu":
            raise ValueError(f"the +ort modes run on the CPU; got an input on {x.device}")
        x = x.detach().float().contiguous()
        shape = tuple(x.shape) if self._static else tuple(x.shape[1:])
        session = self._sessions.get(shape) or self._session(x)
        outs = session.run(None, {INPUT_NAME: x.numpy()})
        return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), outs, strict=True)}

    def cache_key(self, shape: tuple[int, ...]) -> str:
        import onnxruntime

        if self._digest is None:
            self._digest = weights_digest(self.model)
        blob = "|".join(map(str, (FORMAT_VERSION, type(self.model).__name__, self._digest, self.precision, self.tag,
                                  shape, torch.__version__, onnxruntime.__version__)))  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _session(self, x: torch.Tensor) -> Any:
        shape = tuple(x.shape) if self._static else tuple(x.shape[1:])
        folder = self.cache_dir or onnx_cache_dir()
        path = folder / f"{self.cache_key(shape)}.onnx"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            path = self._export(x, path)
            shape = tuple(x.shape) if self._static else shape  # the export may have fallen back to a static batch
        else:
            log.info("ONNX model for %s loaded from %s", self.tag or self.precision, path)
        self._sessions[shape] = session = ort_session(path)
        return session

    def _export(self, x: torch.Tensor, path: Path) -> Path:
        """Export (and quantize) to temporary files beside ``path``, then move the result into place atomically;
        returns the file written (another name when the export fell back to ``x``'s batch size)."""
        # once per weights and mode, up to a minute for a ViT-B: said at the default log level, not left as a hang
        log.warning("exporting the model to ONNX for %s (once; later runs load %s)", self.tag or self.precision, path)
        with torch.inference_mode():
            keys = sorted(model_outputs(self.model, x[:1]))
        wrapper = _Outputs(self.model, keys).eval()
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
        tmp_q = path.with_name(f"{path.stem}.{os.getpid()}.tmp.int8.onnx")
        try:
            try:
                export_onnx(wrapper, x[:1].expand(2, *x.shape[1:]).contiguous(), tmp)
            except Exception as exc:  # noqa: BLE001 - a graph the exporter cannot keep batch-free: one per batch
                log.warning("ONNX export with a dynamic batch failed (%s: %s); exporting for batch %d",
                            type(exc).__name__, str(exc)[:200], len(x))  # fmt: skip
                self._static = True
                path = path.with_name(f"{self.cache_key(tuple(x.shape))}.onnx")
                if path.is_file():  # exported for this batch by an earlier process
                    return path
                export_onnx(wrapper, x, tmp, dynamic_batch=False)
            if self.precision == "int8":
                quantize_onnx_int8(tmp, tmp_q)
                os.replace(tmp_q, path)
            else:
                os.replace(tmp, path)
        finally:
            for leftover in (tmp, tmp_q, tmp.with_name(f"{tmp.name}.data"), tmp_q.with_name(f"{tmp_q.name}.data")):
                leftover.unlink(missing_ok=True)
        log.info("ONNX model for %s exported to %s", self.tag or self.precision, path)
        return path
