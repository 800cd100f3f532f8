"""What the phase timer costs: the training step with phase timing on vs off.

    python bench/timer_overhead.py                      # the default step (2x200 LSTM, batch 20, bptt 35)
    python bench/timer_overhead.py --threads 1          # steadier on a CPU shared with other work
    python bench/timer_overhead.py --data generated --rounds 40 --device cuda

Each round times a window of ``--steps-per-round`` steps with the timer on and one with it off (the order
alternating between rounds so that drift in machine load hits both alike), each window bracketed by a
synchronisation and, when on, closed by the timer's once-per-window ``collect()`` as training does. The
result is the median over rounds of each mode's ms per step, their ratio, and the median of the rounds' own
on/off ratios (each round's pair ran back to back, under the same load), in wall time and, on CPU, in this
process's CPU time: on a machine shared with other work the wall clock also counts the time the process
waited for a core, which swamps a small difference, while CPU time does not (``--threads 1`` also keeps
OpenMP threads from spinning while a partner thread waits for a core). It also reports the timer's own
bookkeeping cost per step, measured on an empty step with the same phases, which is what the ratio would show
on a quiet machine. Takes any `fastlm train` flag.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from fastlm.cli import _add_train_flags, config_from_args
from fastlm.data import resolve_corpus
from fastlm.device import describe, resolve_device
from fastlm.profile.command import StepRunner
from fastlm.timing import FORWARD, FORWARD_PARTS, PHASES, PhaseTimer, active_timer, phase, stats
from fastlm.train.progress import TrainDisplay
from fastlm.train.trainer import Trainer


def window_ms(runner: StepRunner, steps: int, enabled: bool, cuda: bool) -> tuple[float, float]:
    """(wall ms, process CPU ms) per step over a window of ``steps`` steps."""
    timer = runner.trainer.timer
    timer.enabled = enabled
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        runner.step(timer)
    if enabled:
        timer.collect()  # the one read per window that training does
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    timer.reset()
    return wall * 1e3 / steps, cpu * 1e3 / steps


def bookkeeping_us(device: torch.device, repeats: int = 2000) -> float:
    """The timer's cost per step on a step that does no work: the same phases, nesting and collect()."""
    def empty_steps(timer: PhaseTimer) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            with timer.step():
                for name in PHASES:
                    with timer.phase(name):
                        if name == FORWARD:
                            with active_timer(timer):
                                for part in FORWARD_PARTS:
                                    with phase(part):
                                        pass
        timer.collect()
        return (time.perf_counter() - start) * 1e6 / repeats

    on = min(empty_steps(PhaseTimer(device, enabled=True)) for _ in range(5))
    off = min(empty_steps(PhaseTimer(device, enabled=False)) for _ in range(5))
    return on - off


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _add_train_flags(parser)
    parser.add_argument("--rounds", type=int, default=20, help="rounds, each one window per mode (20)")
    parser.add_argument("--steps-per-round", type=int, default=1, help="steps per window (1)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (3)")
    args = parser.parse_args(argv)
    config = config_from_args(args)  # --threads is a train flag: the config's field
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = resolve_device(config.train.device)
    cuda = device.type == "cuda"
    corpus = resolve_corpus(config.data.data)
    runner = StepRunner(Trainer(config, corpus, device, TrainDisplay()))
    for _ in range(args.warmup):
        runner.step(runner.trainer.timer)
    runner.trainer.timer.reset()
    times: dict[tuple[str, bool], list[float]] = {(clock, on): [] for clock in ("wall", "cpu") for on in (1, 0)}
    for round_index in range(args.rounds):
        for enabled in (True, False) if round_index % 2 == 0 else (False, True):
            wall, cpu = window_ms(runner, args.steps_per_round, enabled, cuda)
            times["wall", enabled].append(wall)
            times["cpu", enabled].append(cpu)
    cost_us = bookkeeping_us(device)
    m, d = config.model, config.data
    result = {"suite": "timer_overhead", "cell": m.cell, "backend": m.backend, "shapes": {
        "B": d.batch_size, "T": d.bptt, "E": m.emsize, "H": m.nhid, "V": len(corpus.vocab)},
        **describe(device), "data": corpus.source, "rounds": args.rounds, "steps_per_round": args.steps_per_round}
    clocks = ("wall",) if cuda else ("wall", "cpu")  # a GPU step's CPU time is not its cost
    for clock in clocks:
        on, off = stats(times[clock, True]), stats(times[clock, False])
        ratio = on["median"] / off["median"]
        paired = statistics.median(a / b for a, b in zip(times[clock, True], times[clock, False]))
        result[clock] = {"on_ms": on, "off_ms": off, "median_ratio": ratio, "median_paired_ratio": paired}
        print(f"{clock:4} timer on : median {on['median']:8.2f} ms/step (p20 {on['p20']:.2f}, p80 {on['p80']:.2f})")
        print(f"{clock:4} timer off: median {off['median']:8.2f} ms/step (p20 {off['p20']:.2f}, p80 {off['p80']:.2f})")
        print(f"{clock:4} on/off ratio of medians {ratio:.4f} ({100 * (ratio - 1):+.2f}%), median of paired ratios "
              f"{paired:.4f} ({100 * (paired - 1):+.2f}%)")
    off_median = result["wall"]["off_ms"]["median"]
    result.update(bookkeeping_us_per_step=cost_us, bookkeeping_share=cost_us / 1e3 / off_median)
    print(f"timer bookkeeping {cost_us:.1f} us/step = {100 * result['bookkeeping_share']:.4f}% of the step")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
