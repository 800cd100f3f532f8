"""`fastlm profile`: where every millisecond of a training step goes.

It builds the very ``Trainer`` that `fastlm train` builds from the same configuration and drives its step
with the trainer's own loop body (fastlm.step.run_step, inside ``trainer.timer``'s phases), so any
cell, backend and flag is profiled as it trains. The run, in order:

1. one-off costs, each timed on its own: CUDA start-up, corpus loading and tokenising, the trainer's setup
   (batchify, pinning, model build), batchify alone, the first host-to-device copy, the first step (kernel
   compilation and autotuning happen there) and the rest of the warm-up;
2. ``--steps`` measured steps: the phase timer splits each one, and the step's wall time is measured apart
   from the timer (perf_counter around the step on CPU; CUDA events around it plus a synchronised clock over
   the whole window on GPU), so "the phases add up to the step" is a check, not an identity. On CUDA the
   window is bracketed by cudaProfilerStart/Stop, which is what limits an Nsight Systems capture to it;
3. ``--trace-steps`` more steps under torch.profiler, written as ``trace.json.gz``; traced steps are slower,
   so they never feed the breakdown.

Everything lands in ``--out`` (default ``profiles/<time>-<cell>-<backend>/``): breakdown.json, breakdown.md,
flow.svg/flow.png and trace.json.gz; ``--py-spy`` and ``--nsys`` re-run this command under those tools
(fastlm.profile.external_profilers).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console

from fastlm.cells import runs_as
from fastlm.data import resolve_corpus
from fastlm.device import competing_load, describe, machine_load, resolve_device, use_threads
from fastlm.distributed import SINGLE, World, collective_errors, join, launched_by_torchrun, leave, on_rank_zero
from fastlm.errors import FastlmError
from fastlm.profile import breakdown as report
from fastlm.profile import external_profilers, flowchart, machine_limits
from fastlm.profile.breakdown import BREAKDOWN_JSON
from fastlm.step import how_it_ran, run_step
from fastlm.timing import Clock, nvtx_range_functions
from fastlm.train.progress import TrainDisplay
from fastlm.train.run_folder import unique_run_dir
from fastlm.train.trainer import Trainer

BREAKDOWN_MD, TRACE = "breakdown.md", "trace.json.gz"
FLOW_SVG, FLOW_PNG = "flow.svg", "flow.png"


@dataclass
class ProfileOptions:
    warmup: int = 5
    steps: int = 20
    trace_steps: int = 3
    out: Optional[str] = None
    py_spy: bool = False
    nsys: bool = False

    def check(self) -> None:
        if isinstance(self.warmup, bool) or self.warmup < 1:
            raise FastlmError(f"--warmup must be at least 1, got {self.warmup}: the first step (kernel compilation, "
                              f"autotuning) is a one-off cost reported apart from the measured steps")
        if self.steps < 1:
            raise FastlmError(f"--steps must be at least 1, got {self.steps}")
        if self.trace_steps < 0:
            raise FastlmError(f"--trace-steps must be 0 (no trace) or more, got {self.trace_steps}")
        if self.py_spy and self.nsys:
            raise FastlmError("--py-spy and --nsys each re-run the profile under their tool; choose one")


def output_folder(config, options: ProfileOptions) -> Path:
    label = f"{config.model.cell}-{config.model.backend}"
    folder = Path(options.out) if options.out else unique_run_dir("profiles", label)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastlmError(f"cannot create output folder {folder}: {e.strerror}; choose another with --out") from None
    if not os.access(folder, os.W_OK):
        raise FastlmError(f"output folder {folder} is not writable; choose another with --out")
    return folder


def run_profile(config, options: ProfileOptions, console: Optional[Console] = None) -> int:
    """`fastlm profile`; returns the exit status."""
    options.check()
    if launched_by_torchrun():
        return profile_each_rank(config, options)
    out = output_folder(config, options)
    if options.py_spy or options.nsys:
        rerun = external_profilers.rerun_under_py_spy if options.py_spy else external_profilers.rerun_under_nsys
        return rerun(config, options, out)
    console = console or Console()
    breakdown = profile(config, options, out, console)
    write_report(breakdown, out, console)
    return 0


def profile_each_rank(config, options: ProfileOptions) -> int:
    """Under torchrun: every process profiles its own steps (data-parallel, as `fastlm train` runs them) and
    writes its report into ``<out>/rank<r>/``; rank 0 prints its tables. The all-reduce DDP waited for is
    backward's ``allreduce`` part."""
    if options.py_spy or options.nsys:
        raise FastlmError("--py-spy and --nsys re-run fastlm in one process: leave them out under torchrun")
    world, device_choice = join(config.train.device, config.train.dist_timeout)
    try:
        with collective_errors(world):
            out = on_rank_zero(lambda: output_folder(config, options), world) / f"rank{world.rank}"
            out.mkdir(parents=True, exist_ok=True)
            console = Console() if world.main else Console(file=io.StringIO())
            breakdown = profile(config, options, out, console, world, device_choice)
            breakdown["rank"], breakdown["processes"] = world.rank, world.size
            write_report(breakdown, out, console)
    finally:
        leave()
    return 0


# ------------------------------------------------------------------------------------------ measuring

def full_chunks(stream) -> int:
    """How many of the split's chunks are bptt long: the short last one is left out of the measurement, so
    every measured step does the same work (training itself does use it)."""
    last = stream.rows - 1 - stream.starts[-1]
    return len(stream) if last == stream.bptt or len(stream) == 1 else len(stream) - 1


def batches_forever(stream):
    """(index, inputs, targets) of the split's full chunks, round and round (as epochs would)."""
    count = full_chunks(stream)
    while True:
        yield from itertools.islice(stream.iterate(), count)


class StepRunner:
    """Runs ``trainer``'s step through ``run_step``, as the trainer does, over the train split's full chunks,
    carrying the hidden state along."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.batches = batches_forever(trainer.train_stream)
        self.state = trainer.model.init_state(trainer.batch_size)
        self.steps_taken = 0
        trainer.model.train()
        trainer.timer.backward_parts = True  # a profile splits backward into its parts (see fastlm.timing)

    def fetch_ahead(self) -> None:
        """Fetches the next batch now, so that its copy can be timed on its own."""
        self.batches = itertools.chain([next(self.batches)], self.batches)

    def step(self, timer) -> None:
        # The batches go round the split's full chunks, so the next one's position is the steps taken so far.
        if self.trainer.fresh_state_before(self.steps_taken % full_chunks(self.trainer.train_stream)):
            self.state = self.trainer.model.init_state(self.trainer.batch_size)
        _, self.state, _ = run_step(self.trainer.step_fn, self.batches, self.state, timer)
        self.steps_taken += 1


@contextlib.contextmanager
def _stopwatch(costs: dict, name: str, clock: Clock):
    """Times a one-off piece of work to completion (synchronised on CUDA) into ``costs[name]`` (ms)."""
    clock.sync()
    start = time.perf_counter()
    yield
    clock.sync()
    costs[name] = (time.perf_counter() - start) * 1e3


def _cuda_profiler_api(start: bool) -> None:
    """cudaProfilerStart/Stop: what limits an `nsys --capture-range=cudaProfilerApi` capture; without a
    profiler attached they do nothing."""
    try:
        (torch.cuda.profiler.start if start else torch.cuda.profiler.stop)()
    except RuntimeError as error:  # the measurement itself does not depend on them
        warnings.warn(f"cudaProfiler{'Start' if start else 'Stop'} failed ({error}); an nsys capture will not be "
                      f"limited to the measured steps", stacklevel=2)


def measure(runner: StepRunner, warmup: int, steps: int, one_off: dict) -> tuple[list[dict], list[float], float]:
    """Warm-up then ``steps`` measured steps of the trainer's own step with its own timer.

    Returns (the timer's per-step phase totals, each step's wall ms measured apart from the timer, the
    synchronised wall ms of the whole window / steps). Adds the first H2D copy, the first step and the rest
    of the warm-up to ``one_off``.
    """
    clock = Clock(runner.trainer.device)
    timer = runner.trainer.timer
    with _stopwatch(one_off, "first_h2d_copy", clock):
        runner.fetch_ahead()
    with _stopwatch(one_off, "first_step", clock):
        runner.step(timer)
    with _stopwatch(one_off, "warmup_rest", clock):
        for _ in range(warmup - 1):
            runner.step(timer)
    timer.collect()
    timer.reset()

    push, pop = nvtx_range_functions()
    marks = []
    clock.sync()
    if clock.cuda:
        _cuda_profiler_api(start=True)
    push("measured steps")
    window_start = time.perf_counter()
    for _ in range(steps):
        start = clock.mark()
        runner.step(timer)
        marks.append((start, clock.mark()))
    clock.sync()
    window_ms = (time.perf_counter() - window_start) * 1e3 / steps
    pop()
    if clock.cuda:
        _cuda_profiler_api(start=False)
    step_ms = [clock.ms(start, end) for start, end in marks]
    timer.collect()
    per_step = list(timer.per_step)
    timer.reset()
    return per_step, step_ms, window_ms


def write_trace(runner: StepRunner, steps: int, path: Path) -> None:
    """``steps`` more steps under torch.profiler, exported as gzipped Chrome-trace JSON (Perfetto, HTA)."""
    cuda = runner.trainer.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    timer = runner.trainer.timer
    # One profiler warm-up step (not recorded: it carries the profiler's start-up), then ``steps`` recorded
    # ones; a schedule is also what makes prof.step() mark ProfilerStep#k ranges, which HTA uses.
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    with _without_profiler_chatter(), torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        for _ in range(steps + 1):
            runner.step(timer)
            prof.step()
        if cuda:
            torch.cuda.synchronize()
    timer.reset()
    with tempfile.TemporaryDirectory() as scratch:
        plain = Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(plain))
        trace = json.loads(plain.read_text(encoding="utf-8"))
    # HTA reads the rank of each trace file from here; a single-process run is rank 0.
    trace.setdefault("distributedInfo", {"rank": 0, "world_size": 1})
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(trace, f)


@contextlib.contextmanager
def _without_profiler_chatter():
    """Kineto (torch.profiler's engine) writes "USDT: ... profiler_start" and similar lines straight to the
    process's stderr, with no setting to stop it. Those lines are caught here and dropped; anything else
    written to stderr meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode("utf-8", errors="replace").splitlines():
                if not line.startswith(KINETO_CHATTER):
                    print(line, file=sys.stderr)


KINETO_CHATTER = ("USDT:", "STAGE:")


# ------------------------------------------------------------------------------------------ the whole run

def profile(config, options: ProfileOptions, out: Path, console: Console, world: World = SINGLE,
            device_choice: Optional[str] = None) -> dict:
    """Runs the profile and returns breakdown.json's content (artifacts other than the trace not yet written)."""
    device = resolve_device(device_choice or config.train.device)
    use_threads(config.train.threads)
    clock = Clock(device)
    one_off: dict = {}
    if clock.cuda:
        with _stopwatch(one_off, "cuda_init", clock):
            torch.zeros(1, device=device)
    with _stopwatch(one_off, "corpus_load", clock):
        corpus = resolve_corpus(config.data.data, console=Console(stderr=True), mode=config.data.data_mode)
    with _stopwatch(one_off, "trainer_setup", clock):
        trainer = Trainer(config, corpus, device, TrainDisplay(console), world=world)
    with _stopwatch(one_off, "batchify", clock):
        corpus.batches("train", config.data.batch_size, config.data.bptt, "cpu")
    m, d = config.model, config.data
    machine = describe(device)
    what = {"step": config.train.step, "backend_runs_as": runs_as(m.backend, device.type),
            "precision": config.train.precision}
    title = (f"{m.cell} {m.nlayers}x{m.nhid}{' tied' if m.tied else ''} | {what['step']} step | "
             f"{what['backend_runs_as']} | {what['precision']} | {machine['device_name']}")
    console.print(f"fastlm profile | {title} | {corpus.source} ({len(corpus.vocab):,} words) | "
                  f"batch {d.batch_size} x bptt {d.bptt} | {options.warmup} warm-up + {options.steps} measured steps",
                  soft_wrap=True)
    busy = competing_load(torch.get_num_threads()) if device.type == "cpu" else None
    if busy:
        console.print(f"[bold yellow]warning:[/] {busy}")
    load_before = machine_load()[0]
    runner = StepRunner(trainer)
    per_step, step_ms, window_ms = measure(runner, options.warmup, options.steps, one_off)
    breakdown = report.summarize(per_step, step_ms, trainer.timer.parents, trainer.batch_size * d.bptt)
    one_off["first_step_over_steady"] = max(0.0, one_off["first_step"] - breakdown["step_ms"]["median"])
    breakdown["step_ms"]["window_mean"] = window_ms
    breakdown["evaluation"] = {split: _time_evaluation(trainer, stream, split, clock)
                               for split, stream in (("valid", trainer.valid_stream), ("test", trainer.test_stream))}
    one_off.update({f"{split}_sample": entry["ms"] for split, entry in breakdown["evaluation"].items()})
    breakdown.update(title=title, steps=options.steps, warmup=options.warmup, one_off_ms=one_off, **what,
                     **machine, parameters=trainer.model.parameter_counts(), data_source=corpus.source,
                     vocab_size=len(corpus.vocab), config=config.to_dict())
    if config.train.step == "fast" and m.decoder == "full":
        breakdown["notes"].append("the fast step's fused loss computes the decoder's gradients in forward, while a "
                                  "chunk's logits are in cache: they are in 'decoder' there, and backward's "
                                  "'decoder_grad' only scales them (--step example shows the example's split)")
    ran = how_it_ran(trainer.step_fn)
    breakdown["ran"] = ran
    work = machine_limits.phase_work(config.to_dict(), len(corpus.vocab), breakdown["parameters"]["total"], ran,
                                     config.train.step)
    breakdown["limits"] = machine_limits.limits(breakdown, machine_limits.cached_peaks(device), work)
    if ran["cuda_graph_replays"]:
        breakdown["notes"].append("the step ran as a CUDA graph replay, as `fastlm train` runs it: the phases inside "
                                  "it cannot be timed apart; --no-cuda-graphs times each one (eagerly, slower)")
    elif ran["cuda_graph_note"]:
        breakdown["notes"].append(f"CUDA graphs were asked for and not used: {ran['cuda_graph_note']}")
    breakdown["notes"] += _one_off_notes(one_off)
    breakdown["load_before"] = load_before
    if busy:
        breakdown["notes"].append(f"timings unreliable: {busy}")
    artifacts = {"breakdown_json": BREAKDOWN_JSON, "breakdown_md": BREAKDOWN_MD, "flow_svg": FLOW_SVG,
                 "flow_png": FLOW_PNG}
    if options.trace_steps:
        console.print(f"recording {options.trace_steps} more steps with torch.profiler into {out / TRACE}")
        write_trace(runner, options.trace_steps, out / TRACE)
        artifacts["torch_trace"] = TRACE
    breakdown["artifacts"] = artifacts
    return breakdown


EVALUATION_SAMPLE = 20  # batches of each split timed for the evaluation boxes (unless --eval-batches says fewer)


def _time_evaluation(trainer, stream, split: str, clock: Clock) -> dict:
    """An evaluation pass over the split's first batches, timed: what validation (each epoch) and the test (at
    the end) cost, measured on a sample and scaled to the whole split."""
    batches = trainer.evaluation_batches(stream, trainer.config.train.eval_batches or EVALUATION_SAMPLE)
    timing: dict = {}
    with _stopwatch(timing, "ms", clock):
        trainer.evaluate(stream, split, interruptible=False, batches=batches)
    per_batch = timing["ms"] / batches
    return {"batches": batches, "ms": timing["ms"], "ms_per_batch": per_batch, "split_batches": len(stream),
            "split_seconds_estimate": per_batch * len(stream) / 1e3}


ONE_OFF_MEANING = {
    "valid_sample": "evaluating the first batches of the validation split (see evaluation)",
    "test_sample": "evaluating the first batches of the test split (see evaluation)",
    "cuda_init": "CUDA context start-up",
    "corpus_load": "reading and tokenising the corpus (or reading the token cache)",
    "trainer_setup": "batchify, pinning and the model build",
    "batchify": "the train split's batchify alone",
    "first_h2d_copy": "the first batch's host-to-device copy",
    "first_step": "the first step, where kernels are compiled and autotuned",
    "warmup_rest": "the other warm-up steps (a CUDA graph is captured there)",
    "first_step_over_steady": "what the first step cost beyond a median measured step",
}


def _one_off_notes(one_off: dict) -> list[str]:
    return ["one-off costs: " + "; ".join(f"{name} = {ONE_OFF_MEANING[name]}" for name in one_off)]


def write_report(breakdown: dict, out: Path, console: Console) -> None:
    flowchart.draw(breakdown, out / FLOW_SVG, out / FLOW_PNG)
    (out / BREAKDOWN_MD).write_text(report.markdown(breakdown), encoding="utf-8")
    (out / BREAKDOWN_JSON).write_text(json.dumps(breakdown, indent=2) + "\n", encoding="utf-8")
    for table in report.rich_tables(breakdown):
        console.print(table)
    for note in breakdown["notes"]:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(f"written to {out}: " + ", ".join(breakdown["artifacts"].values()))
