"""``loupe bench speed``: the suite's inference modes against plain timm fp32, in one process and one run.

Sections (each a ratio measured in the same run, so a busy machine slows both sides alike):

- ``machine``: CPU, instruction sets, threads, torch version, load average before and after;
- ``gemm``: the GEMM peak of each precision (an ``n^3`` fp32 and bf16 matmul, an int8 dynamically quantized
  ``Linear``), measured at the start and again inside each model's interleaved rounds (that one is what the model's
  achieved GFLOPS are divided by: the same load on both sides);
- ``models``: for each architecture (random weights), plain ``timm.create_model`` fp32 as the baseline, then every
  mode (`loupe.core.models.inference`): img/s, speed-up over timm, achieved GFLOPS (FLOPs counted by
  ``torch.utils.flop_counter`` on the eager fp32 forward with the same token merging) and the fraction of the
  GEMM peak of its precision, peak memory (the rise of the process RSS during one
  forward, sampled every 2 ms after returning freed memory to the OS), and ``tome``: each merging mode's speed-up
  over the same precision without merging, divided by the FLOP cut it makes;
- ``accuracy`` (``--model`` + ``--eval-manifest``): each mode's AUROC and AUROC drop against fp32 and its decision
  agreement, for a suite-trained model on a real evaluation set; ``fastest_accurate`` then names, per architecture,
  the fastest mode whose drop is within the tolerance;
- ``mae``: MAE pretraining step time at mask ratio 0.9 against a full-token forward-backward of the same encoder,
  measured and predicted by FLOPs, for the paper's 512-wide 8-block decoder and a lighter one;
- ``extra``: sections other benchmarks register with `register_section` (the input-pipeline benchmark's hook).

Timings are medians over interleaved rounds (every mode once per round), each round at least ``min_seconds``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models.auto_mode import DEFAULT_TOLERANCE, interleaved_times, macro_auroc
from loupe.core.models.inference import InferenceMode, cpu_name, instruction_sets, mode_problems, with_mode

log = logging.getLogger(__name__)

DEFAULT_ARCHS = ("vit_small_patch16_224", "vit_base_patch16_224")
DEFAULT_MODES = ("fp32", "bf16", "int8", "fp32+tome8", "bf16+tome8", "int8+tome8", "fp32+tome16", "bf16+tome16",
                 "int8+tome16", "bf16+compile", "int8+compile", "fp32+ort", "int8+ort", "int8+ort+tome8",
                 "int8+ort+tome16")  # fmt: skip
QUICK_MODES = ("fp32", "bf16", "int8", "fp32+tome2", "int8+tome2")
MAE_DECODERS = {"paper_512x8": (512, 8, 16), "light_128x2": (128, 2, 4)}  # width, depth, heads
Section = Callable[["SpeedOptions"], dict[str, Any]]
#: Further sections, by name (`register_section`); each gets the options and returns a JSON-able dict.
EXTRA_SECTIONS: dict[str, Section] = {}


def register_section(name: str, section: Section) -> None:
    """Add a section to every ``loupe bench speed`` run (e.g. the input-pipeline benchmark)."""
    EXTRA_SECTIONS[name] = section


@dataclass(frozen=True)
class SpeedOptions:
    """What ``loupe bench speed`` measures; ``quick`` shrinks everything to a seconds-long smoke run."""

    archs: tuple[str, ...] = DEFAULT_ARCHS
    img_size: int = 224
    batch_size: int = 16
    modes: tuple[str, ...] = DEFAULT_MODES
    repeats: int = 3
    min_seconds: float = 1.0
    gemm_size: int = 2048
    model: str | None = None  # a suite-trained model folder (local-dir:/path) for the accuracy section
    eval_manifest: Path | None = None
    eval_split: str | None = "test"
    eval_limit: int = 512
    tolerance: float = DEFAULT_TOLERANCE
    mae: bool = True
    mae_arch: str = "vit_base_patch16_224"
    mae_batch: int = 8
    mae_mask_ratio: float = 0.9
    sections: tuple[str, ...] | None = None  # extra sections to run (None: all registered)

    @classmethod
    def quick_options(cls, **overrides: Any) -> SpeedOptions:
        base = cls(archs=("vit_tiny_patch16_224",), img_size=64, batch_size=4, modes=QUICK_MODES, repeats=1,
                   min_seconds=0.05, gemm_size=256, mae_arch="vit_tiny_patch16_224", mae_batch=2)  # fmt: skip
        return replace(base, **overrides)


# ------------------------------------------------------------------------------------------------------ machine
def machine_info() -> dict[str, Any]:
    import timm

    return {"cpu": cpu_name(), "instruction_sets": instruction_sets(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "load_average": list(os.getloadavg())}  # fmt: skip


def gemm_runs(n: int) -> dict[str, Callable[[], Any]]:
    """One ``n x n x n`` GEMM per precision: fp32 and bf16 matmuls, and the int8 dynamically quantized ``Linear``
    (activations quantized per call, as the int8 mode runs them); each does ``2 n^3`` FLOPs a call."""
    from loupe.core.models.inference import quantize_int8

    a = torch.randn(n, n)
    b, a16, b16 = torch.randn(n, n), a.bfloat16(), torch.randn(n, n).bfloat16()
    lin = quantize_int8(nn.Sequential(nn.Linear(n, n, bias=False))).eval()
    return {"gemm_fp32": lambda: a @ b, "gemm_bf16": lambda: a16 @ b16, "gemm_int8": lambda: lin(a)}


def gemm_peak(n: int, repeats: int, min_seconds: float) -> dict[str, float]:
    """GFLOPS of each `gemm_runs` GEMM on this CPU (medians of interleaved rounds), by precision."""
    times = interleaved_times(gemm_runs(n), repeats, min_seconds)
    return {k.removeprefix("gemm_"): 2 * n**3 / t / 1e9 for k, t in times.items()}


def flops_per_image(model: nn.Module, x: torch.Tensor, backward: bool = False) -> float:
    """FLOPs of one forward (and backward) of ``model`` per input of the batch ``x``, as ``torch`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / x.shape[0]


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_rise(fn: Callable[[], Any]) -> float:
    """MiB the process RSS rises to, above where it started, while ``fn`` runs (sampled every 2 ms)."""
    import psutil

    proc = psutil.Process()
    _malloc_trim()
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        with torch.inference_mode():
            fn()
    finally:
        stop.set()
        t.join()
    return max(0.0, (max(peak[0], proc.memory_info().rss) - base) / 2**20)


# ------------------------------------------------------------------------------------------------------- models
@dataclass
class ModeResult:
    mode: str
    img_s: float = float("nan")
    speedup_vs_timm: float = float("nan")
    gflop_per_img: float = float("nan")
    achieved_gflops: float = float("nan")
    fraction_of_peak: float = float("nan")
    peak_rise_mib: float = float("nan")
    warmup_s: float = float("nan")
    max_logit_diff_vs_timm: float = float("nan")
    note: str = ""


def _loupe_model(arch: str, size: int, timm_model: nn.Module) -> nn.Module:
    """The suite's classifier for ``arch`` with the weights of the timm baseline (same math, same outputs)."""
    from loupe.core.models import vit_classifier

    model = vit_classifier(f"timm:{arch}", num_outputs=2, img_size=size).eval()
    state = timm_model.state_dict()
    model.backbone.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")})
    model.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    return model


def bench_arch(arch: str, opts: SpeedOptions) -> dict[str, Any]:
    """Plain timm fp32 and every mode of ``opts`` on ``arch`` (random weights) in interleaved rounds, together with
    the GEMM peak of each precision (so the peak is measured under the same load as the modes)."""
    import timm

    torch.manual_seed(0)
    baseline = timm.create_model(arch, pretrained=False, num_classes=2, img_size=opts.img_size).eval()
    model = _loupe_model(arch, opts.img_size, baseline)
    x = torch.randn(opts.batch_size, 3, opts.img_size, opts.img_size)
    with torch.inference_mode():
        ref = baseline(x)
    results = {"timm_fp32": ModeResult("timm_fp32", gflop_per_img=flops_per_image(baseline, x[:1]) / 1e9)}
    runs: dict[str, Callable[[], Any]] = {"timm_fp32": lambda: baseline(x)}
    flops_by_tome: dict[str, float] = {}
    for text in opts.modes:
        res = results[text] = ModeResult(text)
        try:
            mode = InferenceMode.parse(text)
            problems = mode_problems(mode, "cpu", model)
            if problems:
                res.note = f"not available: {problems[0]}"
                continue
            wrapped = with_mode(model, mode).eval()
            t0 = time.perf_counter()
            warm_first = mode.compile or mode.ort  # the first call builds kernels / exports: memory on the second
            if warm_first:
                with torch.inference_mode():
                    wrapped(x)
                res.warmup_s = time.perf_counter() - t0
            res.peak_rise_mib = peak_rss_rise(lambda w=wrapped: w(x))
            if not warm_first:
                res.warmup_s = time.perf_counter() - t0
            with torch.inference_mode():
                out = wrapped(x)
        except Exception as exc:  # noqa: BLE001 - one mode failing must not lose the others' figures
            res.note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
            continue
        res.max_logit_diff_vs_timm = float((out.float() - ref).abs().max())
        tome = mode.tome.label if mode.tome else ""
        # FLOPs of the fp32 torch model with the same merging: the precision, compilation and +ort (an ONNX Runtime
        # session, which torch's FlopCounterMode cannot see into) run the same model's FLOPs
        if tome not in flops_by_tome:
            flops_by_tome[tome] = flops_per_image(with_mode(model, InferenceMode(tome=mode.tome)), x[:1])
        res.gflop_per_img = flops_by_tome[tome] / 1e9
        runs[text] = lambda w=wrapped: w(x)
    results["timm_fp32"].peak_rise_mib = peak_rss_rise(lambda: baseline(x))
    gemms = gemm_runs(opts.gemm_size)
    times = interleaved_times({**runs, **gemms}, opts.repeats, opts.min_seconds, warm=False)
    peaks = {k.removeprefix("gemm_"): 2 * opts.gemm_size**3 / times.pop(k) / 1e9 for k in gemms}
    for name, sec in times.items():
        r = results[name]
        r.img_s = opts.batch_size / sec
        r.speedup_vs_timm = times["timm_fp32"] / sec
        r.achieved_gflops = r.gflop_per_img * r.img_s
        precision = "fp32" if name == "timm_fp32" else InferenceMode.parse(name).precision
        r.fraction_of_peak = r.achieved_gflops / peaks[precision]
    return {"arch": arch, "img_size": opts.img_size, "batch_size": opts.batch_size, "gemm_gflops": peaks,
            "modes": {k: asdict(v) for k, v in results.items()}, "tome": tome_ratios(results)}  # fmt: skip


def tome_ratios(results: dict[str, ModeResult]) -> list[dict[str, Any]]:
    """Each merging mode against the same mode without merging: speed-up, FLOP cut, and their ratio."""
    out = []
    for name, r in results.items():
        if name == "timm_fp32" or "tome" not in name or r.img_s != r.img_s:
            continue
        mode = InferenceMode.parse(name)
        plain = results.get(str(replace(mode, tome=None)))
        if plain is None or plain.img_s != plain.img_s:
            continue
        speedup, cut = r.img_s / plain.img_s, plain.gflop_per_img / r.gflop_per_img
        out.append({"mode": name, "versus": plain.mode, "speedup": speedup, "flop_cut": cut,
                    "speedup_over_flop_cut": speedup / cut})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------- accuracy
def accuracy_inputs(opts: SpeedOptions) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    """The suite-trained model of ``opts`` (any domain's architecture) and its evaluation inputs and labels; loaded
    before the long sections so that a bad model or manifest fails the run at once."""
    from loupe.core.models import load_model_dir
    from loupe.core.registry import discover_domains

    assert opts.model is not None and opts.eval_manifest is not None
    discover_domains()  # the model may be built by a domain's registered architecture
    model, spec = load_model_dir(Path(opts.model.partition(":")[2]).expanduser())
    return (model, spec, *_eval_set(opts, spec))


def accuracy_section(opts: SpeedOptions, loaded: tuple | None = None) -> dict[str, Any]:
    """Every mode of ``opts`` on a suite-trained model over a real evaluation manifest: AUROC, drop, agreement."""
    from loupe.core.models.auto_mode import decisions, scores_of

    model, spec, images, labels = loaded or accuracy_inputs(opts)
    ref_scores = scores_of(model, images, spec.task, 32)
    ref_auc = macro_auroc(labels, ref_scores)
    rows = {"fp32": {"auroc": ref_auc, "auroc_drop": 0.0, "agreement": 1.0}}
    for text in dict.fromkeys(opts.modes):
        try:
            mode = InferenceMode.parse(text, spec)  # ``tome`` alone: the r the model was fine-tuned with
        except ConfigError as exc:
            rows[text] = {"note": f"not available: {exc.problems[0]}"}
            continue
        if mode.is_reference:
            continue
        problems = mode_problems(mode, "cpu", model)
        if problems:
            rows[text] = {"note": f"not available: {problems[0]}"}
            continue
        scores = scores_of(with_mode(model, mode).eval(), images, spec.task, 32)
        auc = macro_auroc(labels, scores)
        agree = float((decisions(scores, spec) == decisions(ref_scores, spec)).float().mean())
        rows[text] = {"auroc": auc, "auroc_drop": ref_auc - auc, "agreement": agree}
    return {"model": spec.name, "architecture": spec.architecture, "input_size": list(spec.input_size),
            "eval_manifest": str(opts.eval_manifest), "images": len(images), "labels": list(spec.label_names),
            "tolerance": opts.tolerance, "modes": rows}  # fmt: skip


def _eval_set(opts: SpeedOptions, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs and labels ``[N, K]`` from the manifest's rows (its ``eval_split`` when it has splits)."""
    import numpy as np

    from loupe.core.data import read_manifest
    from loupe.core.io import read_any
    from loupe.core.transforms import ModelInput

    path = Path(opts.eval_manifest)  # type: ignore[arg-type]
    frame = read_manifest(path)
    missing = [c for c in ("path", *spec.label_names) if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: the evaluation manifest lacks column(s) {missing}; it needs 'path' and one "
                          f"column per label of the model ({list(spec.label_names)})")  # fmt: skip
    if opts.eval_split and "split" in frame.columns:
        frame = frame[frame["split"] == opts.eval_split]
    frame = frame.head(opts.eval_limit)
    if frame.empty:
        raise ConfigError(f"{path}: no rows to evaluate (split {opts.eval_split!r}); pass --eval-split or another file")
    prep, root = ModelInput(spec), path.parent
    images = []
    for p in frame["path"]:
        q = Path(p) if Path(p).is_absolute() else root / p
        img = read_any(q)
        images.append(prep(img.array, img.meta.get("bits_stored") or img.meta.get("bit_depth")))
    labels = frame[list(spec.label_names)].apply(lambda c: c.astype(float)).to_numpy(dtype=np.float32)
    return torch.stack(images), torch.tensor(labels)  # a copy: pandas may hand back a read-only view


def fastest_accurate(models: list[dict[str, Any]], accuracy: dict[str, Any] | None, tol: float) -> dict[str, Any]:
    """Per architecture, the fastest mode whose AUROC drop on the evaluation set is within ``tol``."""
    out = {}
    for m in models:
        best = None
        for name, r in m["modes"].items():
            if name == "timm_fp32" or r["img_s"] != r["img_s"]:
                continue
            acc = (accuracy or {}).get("modes", {}).get(name)
            ok = acc is not None and acc.get("auroc_drop") is not None and acc["auroc_drop"] <= tol
            if ok and (best is None or r["img_s"] > m["modes"][best]["img_s"]):
                best = name
        if best is None or accuracy is None:
            why = "no mode within the tolerance" if accuracy else "no accuracy measured (give --model, --eval-manifest)"
            out[m["arch"]] = {"mode": None, "note": why}
        else:
            out[m["arch"]] = {"mode": best, "speedup_vs_timm": m["modes"][best]["speedup_vs_timm"],
                              "auroc_drop": accuracy["modes"][best]["auroc_drop"]}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------- MAE
def mae_section(opts: SpeedOptions) -> dict[str, Any]:
    """MAE step (mask ``mae_mask_ratio``) vs a full-token forward-backward of the same encoder: time and FLOPs."""
    from loupe.core.models.backbones import TimmViTBackbone
    from loupe.core.models.mae import MAEConfig, MaskedAutoencoder

    torch.manual_seed(0)
    enc = TimmViTBackbone(opts.mae_arch, img_size=opts.img_size).train()
    x = torch.randn(opts.mae_batch, 3, opts.img_size, opts.img_size)
    maes = {name: MaskedAutoencoder(enc, MAEConfig(mask_ratio=opts.mae_mask_ratio, decoder_dim=w, decoder_depth=d,
                                                   decoder_heads=h)).train()
            for name, (w, d, h) in MAE_DECODERS.items()}  # fmt: skip

    def full_step() -> None:
        enc.zero_grad(set_to_none=True)
        enc.forward_features(x).float().pow(2).mean().backward()

    def mae_step(m: MaskedAutoencoder) -> Callable[[], None]:
        def step() -> None:
            m.zero_grad(set_to_none=True)
            m(x)[0].backward()

        return step

    runs = {"full_tokens": full_step, **{k: mae_step(m) for k, m in maes.items()}}
    flops = {"full_tokens": _step_flops(full_step)} | {k: _step_flops(runs[k]) for k in maes}
    times = interleaved_times(runs, opts.repeats, opts.min_seconds, grad=True)
    out = {"encoder": opts.mae_arch, "batch_size": opts.mae_batch, "mask_ratio": opts.mae_mask_ratio,
           "full_token_step_s": times["full_tokens"], "decoders": {}}  # fmt: skip
    for k, (w, d, h) in MAE_DECODERS.items():
        measured, predicted = times[k] / times["full_tokens"], flops[k] / flops["full_tokens"]
        out["decoders"][k] = {"width": w, "depth": d, "heads": h, "step_s": times[k],
                              "measured_step_ratio": measured, "flop_predicted_ratio": predicted,
                              "measured_over_predicted": measured / predicted}  # fmt: skip
    return out


def _step_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------------ the run
def run_speed(opts: SpeedOptions, on_section: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every section of the benchmark (see the module); ``on_section(name)`` is called as each starts."""
    if (opts.model is None) != (opts.eval_manifest is None):
        raise ConfigError("the accuracy section needs both --model (local-dir:/model_folder) and --eval-manifest")
    if opts.model is not None and not opts.model.startswith(("local-dir:", "file:")):
        raise ConfigError(f"--model {opts.model!r}: the speed benchmark loads a model folder; write local-dir:/path")
    if opts.eval_manifest is not None and not Path(opts.eval_manifest).is_file():
        raise ConfigError(f"--eval-manifest {opts.eval_manifest}: no such file; pass a CSV or Parquet manifest")
    note = on_section or (lambda _name: None)
    t0 = time.perf_counter()
    loaded = accuracy_inputs(opts) if opts.model is not None else None
    out: dict[str, Any] = {"machine": machine_info()}
    note("gemm")
    peaks = gemm_peak(opts.gemm_size, opts.repeats, opts.min_seconds)
    out["gemm"] = {"size": opts.gemm_size, **{f"{k}_gflops": v for k, v in peaks.items()},
                   "bf16_native": "avx512_bf16" in instruction_sets() or "amx_bf16" in instruction_sets()}  # fmt: skip
    out["models"] = []
    for arch in opts.archs:
        note(f"model {arch}")
        out["models"].append(bench_arch(arch, opts))
    accuracy = None
    if opts.model is not None:
        note("accuracy")
        accuracy = out["accuracy"] = accuracy_section(opts, loaded)
    out["fastest_accurate"] = fastest_accurate(out["models"], accuracy, opts.tolerance)
    if opts.mae:
        note("mae")
        out["mae"] = mae_section(opts)
    out["extra"] = {}
    for name, section in EXTRA_SECTIONS.items():
        if opts.sections is None or name in opts.sections:
            note(name)
            try:
                out["extra"][name] = section(opts)
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the figures measured before it
                log.exception("bench speed: the %s section failed", name)
                out["extra"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    out["machine"]["load_average_after"] = list(os.getloadavg())
    out["seconds"] = time.perf_counter() - t0
    out["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    return out
