"""Compiles the Triton kernels fastlm launches for GPUs this machine does not have, and reads what each
compiled program needs: registers, local memory (spills), shared memory. Used by tests/test_triton_aot.py,
which runs it as a script in a process of its own:

    python tests/triton_aot.py 90 80      # prints one JSON object: {"sm_90": [...], "sm_80": [...]}

Why a process of its own: Triton decides when a function is decorated whether @triton.jit makes a kernel
to compile (JITFunction) or one to interpret (InterpretedFunction, under TRITON_INTERPRET=1, which the test
session sets on CPU-only machines); only the first can be compiled, and kernels/common.py picks the compiled
kernels' libdevice math at import. So this script runs without TRITON_INTERPRET, and imports fastlm.kernels
(it never builds the triton backend, which would set it without CUDA).

What is compiled is what the launchers launch, not a hand-made signature: the host code of each layer
(kernels/lstm.py, kernels/gru.py with their per-step or persistent time loops) runs on CPU tensors while
Triton's active driver is one that names the target GPU; each kernel launch goes through Triton's own
argument binding and specialization (JITFunction.run) up to the point where it would compile, where the
compile's inputs (signature, constexprs, attributes, options) are taken instead of launching. Each distinct
one is then compiled with triton.compile for the target, as the launch would have compiled it; ptxas (in
the triton wheel) makes the cubin, and cuobjdump (also in the wheel) reads its registers and stack.
Compiles run in parallel processes, one per CPU core; Triton's on-disk cache makes a second run cheap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_cooperative_grid")  # reported with each compile


@dataclass(frozen=True)
class Case:
    """One layer call as training launches it: the forward that saves state, then the backward's steps but
    the last. ``subsets`` adds the launches that run a subset of that code: the forward that saves nothing
    (no grad) and the last backward step (no recurrent product). tiles None: the launcher's own choice
    (persistent_config's rule; the per-step heuristic, what runs untuned); else the (block_b, block_h,
    block_k, num_warps) of a tuner candidate."""

    cell: str
    variant: str
    batch: int
    hidden: int
    precision: str  # fp32, tf32 or bf16, as fastlm's precision setting names them
    tiles: tuple | None = None
    subsets: bool = False

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.precision == "bf16" else "float32"

    @property
    def tf32(self) -> bool:
        return self.precision == "tf32"

    def label(self) -> str:
        tiles = "" if self.tiles is None else " tiles=" + "x".join(map(str, self.tiles))
        return f"{self.cell} {self.variant} B={self.batch} H={self.hidden} {self.precision}{tiles}"


class _TargetDriver:
    """Stands in for Triton's active driver: names the target GPU, so that a kernel launch binds and
    specializes its arguments for it; there is no device to launch on."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return self.target.arch  # a device id per target: JITFunction keeps its binder per device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def _launches_recorded(target, record):
    """Within: every kernel launch calls record(kernel, signature, constexprs, attrs, options) where it
    would compile, and launches nothing. Triton's active driver stays the target's after it."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    def capture(self, key, signature, device, constexprs, options, attrs, warmup):
        record(self, signature, constexprs, attrs, options)
        return None  # JITFunction.run returns without launching when there is no kernel

    saved = JITFunction._do_compile
    driver.set_active(_TargetDriver(target))  # left active: this process has no GPU driver to go back to
    JITFunction._do_compile = capture
    try:
        yield
    finally:
        JITFunction._do_compile = saved


def _drive(case: Case) -> None:
    """Runs the launches of ``case`` (see Case) on CPU tensors."""
    import torch

    from fastlm.cells.triton_tiles import LaunchConfig, TileKey, heuristic_config, persistent_config
    from fastlm.kernels import gru, lstm, persistent_gru, persistent_lstm

    gates = {"lstm": 4, "gru": 3}[case.cell]
    if case.variant == "persistent":
        config = persistent_config(case.batch, case.hidden, gates, case.dtype, case.tf32, interpreted=False,
                                   tiles=None if case.tiles is None else LaunchConfig(*case.tiles))
        module = {"lstm": persistent_lstm, "gru": persistent_gru}[case.cell]
        forward = getattr(module, f"{case.cell}_forward_persistent_steps")
        backward = getattr(module, f"{case.cell}_backward_persistent_steps")
    else:
        key = TileKey(f"{case.cell}_forward", case.batch, case.hidden, case.dtype, case.tf32)  # backward's alike
        config = heuristic_config(key) if case.tiles is None else LaunchConfig(*case.tiles)
        module = {"lstm": lstm, "gru": gru}[case.cell]
        forward = getattr(module, f"{case.cell}_forward_steps")
        backward = getattr(module, f"{case.cell}_backward_steps")
    forward = functools.partial(forward, config=config, allow_tf32=case.tf32)
    backward = functools.partial(backward, config=config, allow_tf32=case.tf32)

    T, B, H = 2, case.batch, case.hidden  # two steps: the first and the last step of each direction
    dtype = getattr(torch, case.dtype)
    x = torch.zeros(T, B, H, dtype=dtype)
    h0 = torch.zeros(B, H, dtype=dtype)
    w_ih, w_hh = torch.zeros(gates * H, H, dtype=dtype), torch.zeros(gates * H, H, dtype=dtype)
    b = torch.zeros(gates * H, dtype=dtype)
    dy = torch.zeros(T, B, H, dtype=dtype)
    if case.cell == "lstm":
        y, cs, saved = lstm.lstm_layer_forward(x, h0, h0, w_ih, w_hh, b, b, forward, save=True)
        lstm.lstm_layer_backward(x, h0, h0, w_ih, w_hh, y, cs, saved, dy, h0, h0, backward)
        if case.subsets:
            lstm.lstm_layer_forward(x, h0, h0, w_ih, w_hh, b, b, forward, save=False)
    else:
        y, saved = gru.gru_layer_forward(x, h0, w_ih, w_hh, b, b, forward, save=True)
        gru.gru_layer_backward(x, h0, w_ih, w_hh, y, saved, dy, h0, backward)
        if case.subsets:
            gru.gru_layer_forward(x, h0, w_ih, w_hh, b, b, forward, save=False)


def launches(cases: list[Case], arch: int) -> list[dict]:
    """The distinct compiles the launches of ``cases`` need on sm_<arch>, each with the cases that launch it:
    {"kernel", "compile": (kernel, signature, constexprs, attrs, options), "cases": [labels], "constexprs":
    {name: value}, "options": {LAUNCH_OPTIONS}}."""
    from triton.backends.compiler import GPUTarget

    found: dict[str, dict] = {}
    current = {}  # the case being driven

    def record(kernel, signature, constexprs, attrs, options):
        if "HAS_NEXT" in kernel.arg_names and not constexprs[(kernel.arg_names.index("HAS_NEXT"),)] \
                and not current["case"].subsets:
            return  # the last backward step of a case without subsets
        key = repr((kernel.fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                    sorted(options.__dict__.items())))
        entry = found.setdefault(key, {
            "kernel": kernel.fn.__name__, "cases": [], "compile": (kernel, signature, constexprs, attrs, options),
            "constexprs": {kernel.arg_names[path[0]]: value for path, value in constexprs.items()},
            "options": {name: getattr(options, name, None) for name in LAUNCH_OPTIONS}})
        if current["case"].label() not in entry["cases"]:
            entry["cases"].append(current["case"].label())

    with _launches_recorded(GPUTarget("cuda", arch, 32), record):
        for case in cases:
            current["case"] = case
            _drive(case)
    return list(found.values())


_JOBS: list = []  # (arch, compile inputs) per job: inherited by the forked compile processes


def _compile(index: int) -> dict:
    """Compiles job ``index`` of _JOBS and reads its resources from the cubin."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch, (kernel, signature, constexprs, attrs, options) = _JOBS[index]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"], knobs.nvidia.cuobjdump.path)
    return {"registers": usage["REG"], "local_bytes": usage["STACK"] + usage["LOCAL"],
            "shared_bytes": compiled.metadata.shared + usage["SHARED"], "num_warps": compiled.metadata.num_warps}


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """cuobjdump's resource line of the one kernel in ``cubin``: {"REG": registers per thread, "STACK":
    stack frame bytes per thread (where ptxas puts spilled registers), "LOCAL", "SHARED" (static, bytes)}."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {name: int(value) for name, value in re.findall(r"([A-Z]+):(\d+)", line)}


def compile_all(cases: list[Case], archs: list[int]) -> dict:
    """{"sm_<arch>": [{"kernel", "cases", "constexprs", "options", "registers", "local_bytes", "shared_bytes",
    "num_warps"}, ...]} for every distinct compile the launches of ``cases`` need (shared_bytes: Triton's
    dynamic shared memory and the cubin's static)."""
    import multiprocessing

    entries = {arch: launches(cases, arch) for arch in archs}
    _JOBS[:] = [(arch, entry["compile"]) for arch in archs for entry in entries[arch]]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        results = iter(pool.map(_compile, range(len(_JOBS))))
    return {f"sm_{arch}": [{**{k: v for k, v in entry.items() if k != "compile"}, **next(results)}
                           for entry in entries[arch]] for arch in archs}


def covering_cases() -> list[Case]:
    """What the test compiles for each target. Every kernel the launchers launch (LSTM and GRU, per-step and
    persistent, forward and backward) is compiled in each precision; compiling every tile of every shape
    (~700 compiles a target) would take many minutes on two cores, so the tiles and shapes follow this rule:
    - the example's shape, B = 20, H = 200 (the GPU check's headline; 200 is no multiple of 16, so the masked
      tails are compiled), in fp32, tf32 and bf16 at the launcher's own tiles (persistent_config's rule; the
      per-step heuristic that run 1 of the GPU check uses): the streaming fp32 and the resident tf32 and
      bf16 persistent programs; in fp32 also the launches that run a subset of the training code (Case);
    - B = 20, H = 650 in bf16: the 16-bit streaming persistent programs and 32-wide per-step tiles;
    - the largest tiles each rule picks, where registers, spills and shared memory peak: the persistent
      rule's largest batch tile (fp32, B = 64, H = 1024: 64 programs, the most auto runs) and largest
      resident W_hh slices (bf16, B = 32, H = 512: K = 512), the tuner's largest per-step candidate
      (64 x 64 tiles, 8 warps, fp32) at B = 64, H = 1024 (multiples of 16: the unmasked specialization).
    fp16 takes the bf16 kernels' code (the same tensor-core products with another element type) and is not
    compiled apart. Launches that compile alike are compiled once."""
    cases = []
    for cell in ("lstm", "gru"):
        for variant in ("per-step", "persistent"):
            cases += [Case(cell, variant, 20, 200, precision, subsets=precision == "fp32")
                      for precision in ("fp32", "tf32", "bf16")]
            cases.append(Case(cell, variant, 20, 650, "bf16"))
        cases += [Case(cell, "persistent", 64, 1024, "fp32"), Case(cell, "persistent", 32, 512, "bf16"),
                  Case(cell, "per-step", 64, 1024, "fp32", tiles=(64, 64, 32, 8))]
    return cases


def main(argv: list[str]) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # noqa: F401 - first, so nothing of fastlm's sets TRITON_INTERPRET (cells.triton.choose_interpreter)

    print(json.dumps(compile_all(covering_cases(), [int(arch) for arch in argv])))


if __name__ == "__main__":
    main(sys.argv[1:])

