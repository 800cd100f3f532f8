"""How far each phase of a step is from what the machine can do: achieved rate beside a measured peak.

Arithmetic phases are counted in FLOPs and compared with the GEMM rate this machine reaches in the dtype
the phase ran in; memory-bound phases are counted in bytes moved and compared with its streaming copy rate:

    decoder    3 GEMMs of 2 N H V FLOPs (logits, dh, dW; N = T * B tokens). The fast step forms the gradient
               GEMMs in forward, inside 'decoder'; the example's runs one there and two in 'decoder_grad'.
    rnn        2 N G H (E_l + H) FLOPs per layer (G gates: LSTM 4, GRU 3, RNN 1; E_l the layer's input size)
    rnn_grad   twice rnn's (the input and the weight gradients)
    loss       memory: the [N, V] logits read and written once in the dtype the decoder ran in (the floor of
               any softmax that does not keep them in registers)
    clip       memory: the gradients read twice (norm, scale) and written once, fp32
    optimizer  memory: weights and gradients read, weights written, fp32

Peaks come from a short calibration (``measure_peaks``: a square GEMM in fp32 and bf16, a large copy; about
two seconds), cached per machine (device name with threads, torch version) in
``<cache dir>/machine-peaks/<slug>.json`` (not when other work loaded the CPU during the calibration). ``limits`` returns, per phase, the achieved and peak rates, the
fraction of peak, and the milliseconds the phase spends above its limit; ``furthest`` is the phase with
the most such milliseconds: where a faster implementation would win the most.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fastlm.device import competing_load, device_name
from fastlm.timing import CLIP, DECODER, DECODER_GRAD, LOSS, OPTIMIZER, RNN, RNN_GRAD

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
GEMM_SIZE = 2048  # the calibration GEMM: [2048 x 2048] @ [2048 x 2048], past every cache, near peak
COPY_BYTES = 256 << 20
FORMAT = 1


def _timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """The fastest of ``repeat`` calls in seconds, after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(device: torch.device) -> dict:
    """GFLOP/s of a square GEMM in fp32 (TF32 as the switches stand) and bf16, and GB/s of a copy."""
    n = GEMM_SIZE
    peaks = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _timed(lambda: torch.mm(a, b), device, repeat=3)
        peaks[f"gemm_{name}_gflops"] = 2 * n ** 3 / seconds / 1e9
    source = torch.empty(COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    seconds = _timed(lambda: target.copy_(source), device, repeat=3)
    peaks["copy_gbytes"] = 2 * COPY_BYTES / seconds / 1e9  # read and written
    return peaks


def cached_peaks(device: torch.device, cache_dir: Optional[Path] = None) -> dict:
    """measure_peaks, once per machine (the file is rewritten when absent or unreadable)."""
    from fastlm.data.cache import default_cache_dir  # here: importing fastlm.data loads the corpus modules

    machine = f"{device_name(device)}, torch {torch.__version__}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", machine).strip("-")
    path = Path(cache_dir or default_cache_dir()) / "machine-peaks" / f"{slug}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") == FORMAT and data.get("machine") == machine:
            return {**data["peaks"], "machine": machine, "cached": True}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        pass
    busy = competing_load(torch.get_num_threads()) if device.type == "cpu" else None
    peaks = measure_peaks(device)
    if busy:  # measured under load: used this once, never remembered
        return {**peaks, "machine": machine, "cached": False, "unreliable": busy}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": FORMAT, "machine": machine, "peaks": peaks}), encoding="utf-8")
    except OSError:
        pass  # measured again next time
    return {**peaks, "machine": machine, "cached": False}


def phase_work(config: dict, vocab: int, parameters: int, ran: dict, step: str) -> dict:
    """Per phase: ("gemm", GFLOP, dtype) or ("memory", GB, None) of one step (see the module doc)."""
    model, data = config["model"], config["data"]
    tokens = data["batch_size"] * data["bptt"]
    hidden, layers, gates = model["nhid"], model["nlayers"], GATES[model["cell"]]
    decoder_dtype = ran.get("decoder_dtype") or "float32"
    rnn_dtype = ran.get("recurrence_dtype") or "float32"
    rnn = sum(2 * tokens * gates * hidden * ((model["emsize"] if layer == 0 else hidden) + hidden)
              for layer in range(layers)) / 1e9
    work = {RNN: ("gemm", rnn, rnn_dtype), RNN_GRAD: ("gemm", 2 * rnn, rnn_dtype),
            CLIP: ("memory", 12 * parameters / 1e9, None), OPTIMIZER: ("memory", 12 * parameters / 1e9, None)}
    if model.get("decoder", "full") == "full":
        gemm = 2 * tokens * hidden * vocab / 1e9
        element = 2 if decoder_dtype == "bfloat16" else 4
        work[LOSS] = ("memory", 2 * tokens * vocab * element / 1e9, None)
        if step == "fast":
            work[DECODER] = ("gemm", 3 * gemm, decoder_dtype)
        else:
            work[DECODER] = ("gemm", gemm, decoder_dtype)
            work[DECODER_GRAD] = ("gemm", 2 * gemm, decoder_dtype)
    return work


def limits(breakdown: dict, peaks: dict, work: dict) -> dict:
    """breakdown.json's "limits": each timed phase's achieved and peak rate, and which is furthest."""
    timed = {**breakdown["phases"], **breakdown["forward_parts"], **breakdown.get("backward_parts", {})}
    phases = {}
    for name, (kind, amount, dtype) in work.items():
        ms = (timed.get(name) or {}).get("mean_ms")
        if not ms or amount <= 0:
            continue
        peak = peaks[f"gemm_{dtype}_gflops"] if kind == "gemm" else peaks["copy_gbytes"]
        achieved = amount / (ms / 1e3)
        at_peak = amount / peak * 1e3
        phases[name] = {"bound": "compute" if kind == "gemm" else "memory",
                        "unit": "GFLOP/s" if kind == "gemm" else "GB/s", "dtype": dtype,
                        "work": amount, "achieved": achieved, "peak": peak, "fraction": achieved / peak,
                        "ms": ms, "ms_at_peak": at_peak, "ms_above_peak": max(0.0, ms - at_peak)}
    furthest = max(phases, key=lambda n: phases[n]["ms_above_peak"]) if phases else None
    return {"peaks": peaks, "phases": phases, "furthest": furthest}


def furthest_line(limits_record: dict) -> Optional[str]:
    """One sentence: the phase furthest from its limit, and by how much."""
    name = limits_record.get("furthest")
    if name is None:
        return None
    p = limits_record["phases"][name]
    what = f"{p['dtype']} GEMM peak" if p["bound"] == "compute" else "copy bandwidth"
    return (f"furthest from its limit: {name}, {p['ms_above_peak']:,.1f} ms above the machine's {what} "
            f"({p['achieved']:,.0f} of {p['peak']:,.0f} {p['unit']}, {100 * p['fraction']:.0f}%)")


def rows(limits_record: dict) -> list[tuple[str, str, str, str, str]]:
    """(phase, bound, achieved, peak, ms above) rows for the terminal and breakdown.md."""
    out = []
    for name, p in limits_record["phases"].items():
        bound = f"{p['bound']} ({p['dtype']})" if p["dtype"] else p["bound"]
        out.append((name, bound, f"{p['achieved']:,.1f} {p['unit']}", f"{p['peak']:,.1f} ({100 * p['fraction']:.0f}%)",
                    f"{p['ms_above_peak']:,.2f}"))
    return out
