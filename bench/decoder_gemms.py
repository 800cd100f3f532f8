"""The bf16 decoder's three GEMMs on this CPU: torch's bf16 GEMM against fastlm's native fp32-output GEMM.

    python bench/decoder_gemms.py                         # the example's 2x200 shapes: 700 tokens, H 200
    python bench/decoder_gemms.py --hidden 650 --threads 1

The fused loss (fastlm/model/fused_loss.py) runs the logits GEMM as torch's bf16 GEMM and dh = G W,
dW = G^T h as ``gemm_f32_out``: the native AVX512-BF16 kernel (kernels/cpu/gemm_bf16.cpp), chosen because
torch's CPU bf16 GEMM rounds its output to bf16. On a CPU with AMX, torch's GEMM (oneDNN) runs on the AMX
tiles and the native kernel does not, so there the choice may cost speed: this prints both, per GEMM, so
that the trade is measured before it is changed. Medians of ``--repeat`` calls after one warm-up.
"""

from __future__ import annotations

import argparse
import json

import torch

from fastlm.benchmark.measure import time_calls
from fastlm.device import describe, machine_load
from fastlm.memory import keep_freed_memory
from fastlm.model.cpu_kernels import gemm_f32_out, native_gemm_reason


def median_ms(call, repeat: int) -> float:
    return time_calls(call, repeat, warmup=1, device=torch.device("cpu")).median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=700, help="rows of the hidden state (batch x bptt)")
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=33278)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    args = parser.parse_args()
    if min(args.tokens, args.hidden, args.vocab, args.repeat) < 1:
        parser.error("--tokens, --hidden, --vocab and --repeat must be at least 1")
    keep_freed_memory()  # as every fastlm command does, so that the figures match the step's
    if args.threads:
        torch.set_num_threads(args.threads)
    load, cores = machine_load()
    generator = torch.Generator().manual_seed(0)
    n, h_width, vocab = args.tokens, args.hidden, args.vocab
    h = torch.randn(n, h_width, generator=generator).bfloat16()
    w = torch.randn(vocab, h_width, generator=generator).bfloat16()
    g = torch.randn(n, vocab, generator=generator).bfloat16()
    gemms = {  # name: (A, B) with the product A @ B, as the fused loss calls them
        "logits": (h, w.t()),
        "dh": (g, w),
        "dW": (g.t(), h),
    }
    native = native_gemm_reason()
    gflop = 2 * n * h_width * vocab / 1e9
    rows = []
    for name, (a, b) in gemms.items():
        bf16_out = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16)
        fp32_out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
        torch_ms = median_ms(lambda: torch.mm(a, b, out=bf16_out), args.repeat)
        native_ms = median_ms(lambda: gemm_f32_out(a, b, fp32_out), args.repeat) if native is None else None
        rows.append({"gemm": name, "torch_bf16_out_ms": torch_ms, "native_fp32_out_ms": native_ms,
                     "torch_gflops": gflop / torch_ms * 1e3,
                     "native_gflops": gflop / native_ms * 1e3 if native_ms else None})
    where = describe(torch.device("cpu"))
    print(f"{where['device_name']}, flags {where['cpu_features']}, load average {load:.2f} on {cores} cores "
          f"before the run")
    print(f"[{n} x {h_width}] x [{h_width} x {vocab}] shapes, {gflop:.1f} GFLOP each, medians of {args.repeat}")
    if native is not None:
        print(f"native GEMM not timed: {native}")
    print(f"{'gemm':<8}{'torch bf16->bf16 ms':>22}{'GFLOP/s':>10}{'native bf16->fp32 ms':>23}{'GFLOP/s':>10}")
    for row in rows:
        native_cells = (f"{row['native_fp32_out_ms']:>23.2f}{row['native_gflops']:>10.0f}"
                        if row["native_fp32_out_ms"] else f"{'-':>23}{'-':>10}")
        print(f"{row['gemm']:<8}{row['torch_bf16_out_ms']:>22.2f}{row['torch_gflops']:>10.0f}{native_cells}")
    print(json.dumps({"suite": "decoder_gemms", **where, "load_before": load,
                      "tokens": n, "hidden": h_width, "vocab": vocab, "repeat": args.repeat, "gemms": rows}))


if __name__ == "__main__":
    main()
