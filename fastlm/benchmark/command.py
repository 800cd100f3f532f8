"""`fastlm bench`: recurrent cells and the training step, timed against their baselines in the same run.

Suites: ``cells`` (modes fwd and fwdbwd: the recurrent stack alone, baseline cudnn = torch.nn in the same
precision and launch, eager or CUDA graph) and ``step`` (a whole training step, baseline ``example`` = the
PyTorch example's loop as it is, in exact fp32 whatever the precision of the others). Every result is a row
of the table and a JSON line appended to ``--out``, with what really ran (dtypes, TF32 switches, CUDA
graphs); the speedup column is the baseline's median over the row's, both measured in this run.
What each mode times is in fastlm.benchmark.cases; how, in fastlm.benchmark.measure.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

from fastlm import cells
from fastlm.benchmark.cases import (
    BASELINE_STEPS,
    COMPILE_BF16,
    EXAMPLE,
    LAUNCHES,
    Case,
    CellsCall,
    StepSettings,
    build_step_call,
)
from fastlm.benchmark.measure import PeakMemory, time_calls
from fastlm.config import COMPARED_CELLS, VARIANTS
from fastlm.device import competing_load, describe, device_name, machine_load, resolve_device
from fastlm.errors import FastlmError, first_line, short
from fastlm.paths import check_output_file
from fastlm.precision import PRECISIONS, resolve_precision, set_tf32_flags, tf32_flags, use_precision

MODES = ("fwd", "fwdbwd", "step")
DEFAULT_SHAPES = ((35, 20, 200, 200), (35, 20, 650, 650), (35, 20, 1500, 1500))  # the example's sizes
CELLS_BASELINE = "cudnn"


@dataclass
class BenchOptions:
    cells: list[str] = field(default_factory=lambda: list(COMPARED_CELLS))
    backends: Optional[list[str]] = None  # None: every backend available for the cell (see default_backends)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    shapes: Optional[list[tuple]] = None  # None: DEFAULT_SHAPES (on CPU without the 1500 one, see plan)
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    launches: list[str] = field(default_factory=lambda: ["eager"])  # cells: eager and/or graph (CUDA)
    variants: list[str] = field(default_factory=lambda: ["auto"])  # the triton backend's time loops to time
    repeat: Optional[int] = None  # None: 30 on CUDA, 5 on CPU
    warmup: Optional[int] = None  # None: 5 on CUDA, 1 on CPU
    device: str = "auto"
    threads: Optional[int] = None
    step: StepSettings = field(default_factory=StepSettings)
    out: Optional[str] = None
    # step: also time the example under torch.compile + bf16 autocast (None: when bf16 is among the precisions)
    compile_baseline: Optional[bool] = None


def default_backends(cell: str, device: torch.device) -> tuple[list[str], list[str]]:
    """(backends to run, notes on those left out) for ``cell`` when --backend is not given.

    On CPU two are left out so that the default run takes minutes: triton (its interpreter is far too slow
    to time) and compile (Inductor builds C++ for every new shape, tens of seconds each).
    """
    chosen, notes = [], []
    for c, backend in cells.available():
        if c != cell:
            continue
        if device.type != "cuda" and backend in ("triton", "compile"):
            why = ("without CUDA it runs in Triton's interpreter, far too slow to time" if backend == "triton"
                   else "on CPU it compiles C++ for every shape, tens of seconds each")
            notes.append(f"{backend} left out: {why} (name it with --backend to include it)")
            continue
        chosen.append(backend)
    return chosen, notes


def default_shapes(device: torch.device) -> tuple[list[tuple], list[str]]:
    """The example's three sizes; on CPU the first two (a 2x1500 step takes seconds per call there)."""
    if device.type == "cuda":
        return list(DEFAULT_SHAPES), []
    return list(DEFAULT_SHAPES[:2]), ["35,20,1500,1500 left out on CPU (seconds per call); pass --shape to include it"]


def plan(options: BenchOptions, device: torch.device) -> tuple[list[list[Case]], list[str]]:
    """Groups of cases that share a baseline (baseline first), and notes for the user."""
    groups, notes = [], []
    shapes = options.shapes
    if shapes is None:
        shapes, notes = default_shapes(device)
    for cell in options.cells:
        if options.backends is None:
            backends, left_out = default_backends(cell, device)
            notes += [n for n in left_out if n not in notes]
        else:
            backends = list(options.backends)
        for mode in options.modes:
            for T, B, E, H in shapes:
                if mode == "step":
                    fast = [b for b in backends if b not in BASELINE_STEPS]
                    cases = [Case(mode, cell, EXAMPLE, T, B, E, H, "fp32")]
                    if compile_baseline(options):
                        cases.append(Case(mode, cell, COMPILE_BF16, T, B, E, H, "bf16"))
                    cases += [Case(mode, cell, b, T, B, E, H, p, variant=v) for p in options.precisions
                              for b in fast for v in variants_of(b, options)]
                    groups.append(cases)
                    continue
                others = [b for b in backends if b not in (CELLS_BASELINE, EXAMPLE)]
                for precision in options.precisions:
                    for launch in options.launches:
                        groups.append([Case(mode, cell, b, T, B, E, H, precision, launch, v)
                                       for b in [CELLS_BASELINE] + others for v in variants_of(b, options)])
    return groups, notes


def variants_of(backend: str, options: BenchOptions) -> list[str]:
    """The variants of ``backend`` to time: --variant's for a backend that has variants (triton), else auto."""
    return list(options.variants) if cells.variants(backend) else ["auto"]


def run_case(case: Case, options: BenchOptions, device: torch.device, repeat: int, warmup: int) -> dict:
    """Times one case in its precision (the TF32 switches set for it, then put back) and says how it ran."""
    previous = use_precision(case.precision)
    try:
        # Peak memory from the build on: weights, inputs, and what a captured graph keeps in its own pool
        # (a CellsCall with launch "graph" captures as it is built; its replays allocate nothing).
        with PeakMemory(device) as peak:
            if case.suite == "step":
                call = build_step_call(case, options.step, device)
            else:
                call = CellsCall(case, options.step.base.model.nlayers, device)
            timing = time_calls(call, repeat, warmup, device)
        facts = {**tf32_flags(), **call.facts()}  # read while the case's switches stand: part of what ran
    finally:
        set_tf32_flags(previous)
    median = timing.median_ms
    return {"median_ms": median, "p20_ms": timing.percentile_ms(20), "p80_ms": timing.percentile_ms(80),
            "tokens_per_s": case.T * case.B / (median / 1e3), "peak_mem_mb": peak.mb, **facts}


def release_memory(device: torch.device) -> None:
    """Frees what the last case held before the next one measures its peak. The collector runs first: a
    step's objects can form reference cycles, which only it frees, and empty_cache returns only free blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def case_fields(case: Case, options: BenchOptions, env: dict) -> dict:
    s, model, fast = options.step, options.step.base.model, case.backend != EXAMPLE
    step_fields = {"V": s.vocab, "decoder": model.decoder if fast else "full", "tied": model.tied,
                   "dropout": model.dropout,
                   "loss_chunk": list(s.loss_chunk) if s.loss_chunk and fast else None,
                   "step": "fast" if fast else "example"}
    cells_fields = {"V": None, "launch": case.launch}
    variant = {"variant": case.variant} if cells.variants(case.backend) else {}
    return {"suite": case.suite, "cell": case.cell, "backend": case.backend, "mode": case.mode, "T": case.T,
            "B": case.B, "E": case.E, "H": case.H, "layers": model.nlayers,
            **(step_fields if case.suite == "step" else cells_fields), **variant, "precision": case.precision,
            **env}


def run_bench(options: BenchOptions, console: Optional[Console] = None) -> int:
    """Runs the matrix, prints the table, appends JSON lines to the output file; 1 if any case failed."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: keep the table's rows on one line each
            console = Console(width=160)
    _check(options)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    options = _resolve_auto_precision(options, device, console)
    on_cuda = device.type == "cuda"
    if "graph" in options.launches and not on_cuda:
        raise FastlmError("--launch graph captures CUDA graphs: it needs a CUDA device (use --launch eager here)")
    repeat = options.repeat or (30 if on_cuda else 5)
    warmup = options.warmup if options.warmup is not None else (5 if on_cuda else 1)
    out = Path(options.out) if options.out else default_out_path(device)
    check_output_file(out, "--out", create_parents=True)  # a folder, a file it may not write: said before any case
    groups, notes = plan(options, device)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    env = describe(device)
    busy = competing_load(torch.get_num_threads()) if device.type == "cpu" else None
    if busy:
        console.print(f"[bold yellow]warning:[/] {busy}")
    env["load_before"] = machine_load()[0]
    console.print(f"fastlm bench | {env['device_name']} | torch {env['torch']} | {repeat} timed + {warmup} warm-up "
                  f"calls per case | results -> {out}")
    table = _new_table()
    failures = 0
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with out.open("a", encoding="utf-8") as sink:
        for group in groups:
            baseline_ms = compiled_ms = None
            for case in group:
                record = {**case_fields(case, options, env), "repeat": repeat, "warmup": warmup, "time": stamp}
                try:
                    record.update(run_case(case, options, device, repeat, warmup))
                except Exception as error:  # one failing case (OOM, unsupported dtype) must not end the matrix
                    failures += 1
                    record["error"] = case_failure(error)
                if case is group[0]:
                    baseline_ms = record.get("median_ms")
                if case.backend == COMPILE_BF16:
                    compiled_ms = record.get("median_ms")
                elif compiled_ms and record.get("median_ms") and case.suite == "step" and case is not group[0]:
                    record["vs_compile_bf16"] = compiled_ms / record["median_ms"]
                record["baseline"] = group[0].backend
                record["baseline_precision"] = group[0].precision  # step rows: the example, exact fp32
                record["speedup"] = (baseline_ms / record["median_ms"]
                                     if baseline_ms and record.get("median_ms") else None)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
                console.print(_progress_line(record), highlight=False)
                _add_row(table, record)
                release_memory(device)
    console.print(table)
    if failures:
        console.print(f"[bold red]{failures} case(s) failed[/]: see the error column and {out}")
    return 1 if failures else 0


def compile_baseline(options: BenchOptions) -> bool:
    """Whether step groups get the compile-bf16 row: asked for, or by default when bf16 is timed."""
    if options.compile_baseline is not None:
        return options.compile_baseline
    return "bf16" in options.precisions


def _resolve_auto_precision(options: BenchOptions, device: torch.device, console: Console) -> BenchOptions:
    """``auto`` becomes the precision it picks on this device (said once), each precision timed once."""
    precisions = []
    for name in options.precisions:
        resolved, why = resolve_precision(name, device)
        if why:
            console.print(f"[yellow]note:[/] --precision auto runs {resolved} ({why})")
        if resolved not in precisions:
            precisions.append(resolved)
    return dataclasses.replace(options, precisions=precisions)


def _check(options: BenchOptions) -> None:
    for flag, given, known in (("--mode", options.modes, MODES), ("--precision", options.precisions, PRECISIONS),
                               ("--launch", options.launches, LAUNCHES), ("--variant", options.variants, VARIANTS),
                               ("--cell", options.cells, cells.CELLS)):
        for value in given:
            if value not in known:
                raise FastlmError(f"{flag} {value!r} is not one of {', '.join(known)}")
    for shape in options.shapes or ():
        if len(shape) != 4 or any(int(v) < 1 for v in shape):
            raise FastlmError(f"--shape takes T,B,E,H (four positive integers), got {shape}")
    for name, value in (("--repeat", options.repeat), ("--warmup", options.warmup), ("--threads", options.threads)):
        if value is not None and value < (0 if name == "--warmup" else 1):
            raise FastlmError(f"{name} must be at least {0 if name == '--warmup' else 1}, got {value}")
    # The model settings were validated with the RunConfig they live in; what is left is how they meet the shapes.
    shapes = options.shapes or DEFAULT_SHAPES
    if options.step.base.model.tied and any(E != H for _, _, E, H in shapes) and "step" in options.modes:
        raise FastlmError("--tied needs E equal to H in every --shape")
    if options.backends is not None:
        known = set(cells.BACKENDS) | {EXAMPLE}
        for backend in options.backends:
            if backend not in known:
                raise FastlmError(f"--backend {backend!r} is not one of {', '.join(sorted(known))}")
        if EXAMPLE in options.backends and set(options.modes) - {"step"}:
            raise FastlmError("--backend example is the example's training step: it only goes with --mode step")


def case_failure(error: BaseException) -> str:
    """A failed case's reason in words: torch's C++ checks open with "[enforce fail at FILE:LINE] err == 0."
    before saying what happened (e.g. the allocator's "can't allocate memory: you tried to allocate ..."), which
    a table cell cut after 60 characters would show alone."""
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*(\S+ [=!<>]= \S+\.\s*)?", "", first_line(error))
    return f"{type(error).__name__}: {text or 'no message'}"[:300]


def default_out_path(device: torch.device) -> Path:
    name = "cpu" if device.type != "cuda" else device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path("bench") / "results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{slug}.jsonl"


def _progress_line(r: dict) -> str:
    launch = f" {r['launch']}" if r.get("launch", "eager") != "eager" else ""
    backend = r["backend"] + (f" ({r['variant_ran'] or r['variant']})" if r.get("variant") else "")
    what = f"{r['mode']} {r['cell']} {backend} {r['T']},{r['B']},{r['E']},{r['H']} {r['precision']}{launch}"
    if "error" in r:
        return f"  {what}: [red]{r['error']}[/]"
    speed = f", {r['speedup']:.2f}x {r['baseline']}" if r["backend"] != r["baseline"] and r["speedup"] else ""
    return f"  {what}: {r['median_ms']:.2f} ms{speed}"


def _new_table() -> Table:
    table = Table(title="fastlm bench", show_lines=False)
    for column in ("mode", "cell", "backend", "T,B,E,H", "V", "precision", "median ms", "p20-p80 ms", "tokens/s",
                   "peak MB", "speedup"):
        table.add_column(column, justify="right" if column not in ("mode", "cell", "backend") else "left")
    return table


def _add_row(table: Table, r: dict) -> None:
    shape = f"{r['T']},{r['B']},{r['E']},{r['H']}"
    extra = " tied" if r.get("tied") else ""
    extra += " adaptive" if r.get("decoder") == "adaptive" else ""
    extra += f" {r.get('variant_ran') or r['variant']}" if r.get("variant") else ""
    if "error" in r:
        table.add_row(r["mode"], r["cell"], r["backend"] + extra, shape, str(r["V"] or "-"), _precision_cell(r),
                      f"[red]{short(r['error'], 60)}[/]", "", "", "", "")
        return
    speed = "baseline" if r["backend"] == r["baseline"] else (f"{r['speedup']:.2f}x" if r["speedup"] else "-")
    table.add_row(r["mode"], r["cell"], r["backend"] + extra, shape, str(r["V"] or "-"), _precision_cell(r),
                  f"{r['median_ms']:.2f}", f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}", f"{r['tokens_per_s']:,.0f}",
                  f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-", speed)


def _precision_cell(r: dict) -> str:
    """The precision asked for, the launch when it is a graph, and a warning when what ran differs."""
    text = r["precision"] + (" graph" if r.get("launch") == "graph" else "")
    want = "bfloat16" if r["precision"] == "bf16" else "float32"
    # The part a precision puts in bf16: a cell's recurrence; a step's decoder GEMMs (its recurrence stays fp32).
    part = "decoder_dtype" if r.get("suite") == "step" else "recurrence_dtype"
    if r.get(part) not in (None, want):
        text += f" [red](ran {r[part]})[/]"
    return text
