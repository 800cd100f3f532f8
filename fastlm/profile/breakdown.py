"""Where a training step's time goes: statistics from the phase timer, and the table people read.

``summarize`` turns a ``PhaseTimer``'s per-step totals and the independently measured wall time of each step
into the dict ``fastlm profile`` writes as ``breakdown.json``. Shares are divided by the measured step time,
not by the sum of the phases, so a breakdown that does not add up shows it: ``coverage`` (sum of the step's
phases / step time) is then visibly below 1. Means are used for shares because means add up; medians do not.

The phases are found from the timer's nesting (``parents``): the step's direct children, and the forward
pass's direct children. A phase the step never entered on its own (for example inside a CUDA graph replay
timed as one, or fused into another) comes out as ``null`` with a note, never as a made-up number.
"""

from __future__ import annotations

import statistics
from typing import Optional

from rich.table import Table

from fastlm.profile.machine_limits import furthest_line
from fastlm.profile.machine_limits import rows as limit_rows
from fastlm.timing import BACKWARD, BACKWARD_PARTS, FORWARD, FORWARD_PARTS, PHASES, STEP, stats

BREAKDOWN_JSON = "breakdown.json"  # the file `fastlm profile` writes summarize()'s result to
FORWARD_OTHER = "other"  # forward time outside its timed parts: dropout after the stack, state detach, glue


def children(parents: dict, parent: str, known: tuple) -> list[str]:
    """The known names first (in their order), then any other phase timed directly inside ``parent``."""
    extra = [name for name, up in parents.items() if up == parent and name not in known]
    return [*known, *extra]


def _entry(values: list[float], step_mean: float) -> dict:
    mean = statistics.fmean(values)
    return {"mean_ms": mean, "median_ms": statistics.median(values), "share": mean / step_mean}


UNTIMED = {"mean_ms": None, "median_ms": None, "share": None}


def _phase_entry(per_step: list[dict], name: str, step_mean: float) -> dict:
    if not any(name in record for record in per_step):
        return dict(UNTIMED)
    return _entry([record.get(name, 0.0) for record in per_step], step_mean)  # absent from a step: no time in it


def summarize(per_step: list[dict], step_ms: list[float], parents: dict, tokens_per_step: int) -> dict:
    """breakdown.json's measurement part; ``per_step`` and ``step_ms`` describe the same steps, in order.

    When some of the step's phases were not timed apart in every step (a CUDA graph replays forward, backward,
    clip and optimizer as one), their time together is also reported as one phase named after them
    ("a+b+..."): in each step, the step's time (by the timer) outside the phases timed in it.
    """
    if len(per_step) != len(step_ms) or not step_ms:
        raise ValueError(f"need one timer record per measured step, got {len(per_step)} for {len(step_ms)} steps")
    step = stats(step_ms)
    mean = step["mean"]
    top = children(parents, STEP, PHASES)
    parts = children(parents, FORWARD, FORWARD_PARTS)
    back = children(parents, BACKWARD, BACKWARD_PARTS)
    phases = {name: _phase_entry(per_step, name, mean) for name in top}
    forward_parts = {name: _phase_entry(per_step, name, mean) for name in parts}
    backward_parts = {name: _phase_entry(per_step, name, mean) for name in back}
    notes = [f"'{name}' was timed in only {count} of the {len(per_step)} measured steps"
             for name in (*top, *parts) if 0 < (count := sum(name in record for record in per_step)) < len(per_step)]
    untimed = [name for name in top if not all(name in record for record in per_step)]
    if untimed:
        together = "+".join(untimed)
        phases[together] = _entry([record[STEP] - sum(record.get(name, 0.0) for name in top)
                                   for record in per_step], mean)
        notes.append(f"{', '.join(untimed)} were not timed apart in every step (one CUDA graph replay, or a fused "
                     f"step): '{together}' is the step's time outside the phases timed in it")
    if phases[FORWARD]["mean_ms"] is not None:
        notes += [f"'{name}' was not timed on its own: its time is inside another part of forward"
                  for name in parts if forward_parts[name]["mean_ms"] is None]
        if any(forward_parts[name]["mean_ms"] is not None for name in parts):
            rest = [record.get(FORWARD, 0.0) - sum(record.get(name, 0.0) for name in parts) for record in per_step]
            forward_parts[FORWARD_OTHER] = _entry(rest, mean)
    phase_sums = [sum(record.get(name, 0.0) for name in top) for record in per_step]
    if untimed:
        phase_sums = [record[STEP] for record in per_step]  # the timed phases plus the rest of the timer's step
    timer_step = [record[STEP] for record in per_step]
    return {
        "step_ms": step,
        "phase_sum_ms": {"mean": statistics.fmean(phase_sums), "median": statistics.median(phase_sums)},
        "coverage": statistics.fmean(phase_sums) / mean,
        "timer_step_ms": {"mean": statistics.fmean(timer_step), "median": statistics.median(timer_step)},
        "phases": phases,
        "forward_parts": forward_parts,
        "backward_parts": backward_parts,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / (mean / 1e3),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- the table

def _ms(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:,.2f}"


def _share(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:5.1f}%"


def table_rows(breakdown: dict) -> list[tuple[str, str, str, str]]:
    """(phase, mean ms, median ms, share) rows: the step's phases with the parts of forward and backward
    indented under them, then the sum of phases and the measured step."""
    rows = []
    parts = {FORWARD: breakdown["forward_parts"], BACKWARD: breakdown.get("backward_parts", {})}
    for name, entry in breakdown["phases"].items():
        rows.append((name, _ms(entry["mean_ms"]), _ms(entry["median_ms"]), _share(entry["share"])))
        for part, sub in parts.get(name, {}).items():
            rows.append((f"  {part}", _ms(sub["mean_ms"]), _ms(sub["median_ms"]), _share(sub["share"])))
    total = breakdown["phase_sum_ms"]
    rows.append(("sum of phases", _ms(total["mean"]), _ms(total["median"]), _share(breakdown["coverage"])))
    step = breakdown["step_ms"]
    rows.append(("step (measured wall)", _ms(step["mean"]), _ms(step["median"]), _share(1.0)))
    return rows


def one_off_rows(breakdown: dict) -> list[tuple[str, str]]:
    return [(name.replace("_", " "), _ms(ms)) for name, ms in breakdown.get("one_off_ms", {}).items()]


def _title(breakdown: dict) -> str:
    return (f"{breakdown.get('title', 'step breakdown')} | {breakdown['steps']} steps | "
            f"{breakdown['tokens_per_s']:,.0f} tokens/s")


def rich_tables(breakdown: dict) -> list[Table]:
    """The terminal's tables. Their title is short (what was measured was printed in full before them), so
    that the tables fit 80 columns."""
    title = (f"{breakdown.get('step', 'training')} step: {breakdown['steps']} measured steps, "
             f"{breakdown['tokens_per_s']:,.0f} tokens/s")
    steps = Table(title=title, title_justify="left")
    for header in ("phase", "mean ms", "median ms", "share of step"):
        steps.add_column(header, justify="left" if header == "phase" else "right")
    rows = table_rows(breakdown)
    for index, row in enumerate(rows):
        steps.add_row(*row, end_section=index == len(rows) - 3)
    tables = [steps]
    if breakdown.get("limits", {}).get("phases"):
        distance = Table(title="distance to the machine", title_justify="left",
                         caption=furthest_line(breakdown["limits"]), caption_justify="left")
        for header in ("phase", "bound", "achieved", "peak (share)", "ms above"):
            distance.add_column(header, justify="left" if header in ("phase", "bound") else "right")
        for row in limit_rows(breakdown["limits"]):
            distance.add_row(*row)
        tables.append(distance)
    once = Table(title="one-off costs (not in the step time)", title_justify="left")
    once.add_column("what")
    once.add_column("ms", justify="right")
    for row in one_off_rows(breakdown):
        once.add_row(*row)
    return [*tables, once]


def how_it_ran_line(ran: dict) -> str:
    """fastlm.step.how_it_ran's record in one sentence."""
    on_off = {True: "on", False: "off"}
    graphs = (f"CUDA graph: {ran['cuda_graph_captures']} captured, {ran['cuda_graph_replays']} steps replayed"
              if ran["cuda_graphs_requested"] else "no CUDA graph (turned off, or not on CUDA)")
    if ran.get("cuda_graph_note"):
        graphs += f" ({ran['cuda_graph_note']})"
    reason = f" ({ran['precision_reason']})" if ran.get("precision_reason") else ""
    native = ""
    if "native_loss_kernel" in ran:
        native = ("; loss: native CPU kernel" if ran["native_loss_kernel"]
                  else f"; loss: PyTorch ops ({ran['native_loss_kernel_note']})")
        if ran["native_loss_kernel"]:  # otherwise the GEMM's note is the loss kernel's
            native += ("; dh and dW: native fp32-output GEMM" if ran.get("native_gemm")
                       else f"; dh and dW: torch's fp32 GEMM on bf16 operands ({ran.get('native_gemm_note')})")
    return (f"precision {ran['precision']}{reason}: embedding in {ran.get('embedding_dtype')}, recurrence in "
            f"{ran['recurrence_dtype']}, decoder GEMMs in {ran['decoder_dtype']}, softmax in "
            f"{ran.get('loss_dtype', 'float32')}{native}; TF32 matmul {on_off[ran['matmul_tf32']]}, "
            f"TF32 cuDNN {on_off[ran['cudnn_tf32']]}; {graphs}")


def markdown(breakdown: dict) -> str:
    lines = [f"# {_title(breakdown)}", "", "| phase | mean ms | median ms | share of step |", "|---|---:|---:|---:|"]
    lines += [f"| {name.replace('  ', '&nbsp;&nbsp;')} | {mean} | {median} | {share} |"
              for name, mean, median, share in table_rows(breakdown)]
    if breakdown.get("limits", {}).get("phases"):
        lines += ["", "## Distance to the machine", "", furthest_line(breakdown["limits"]), "",
                  "| phase | bound | achieved | peak (share) | ms above peak |", "|---|---|---:|---:|---:|"]
        lines += [f"| {' | '.join(row)} |" for row in limit_rows(breakdown["limits"])]
    lines += ["", "## One-off costs (not in the step time)", "", "| what | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms} |" for name, ms in one_off_rows(breakdown)]
    if breakdown.get("ran"):
        lines += ["", "## How it ran", "", how_it_ran_line(breakdown["ran"])]
    if breakdown.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in breakdown["notes"]]
    return "\n".join(lines) + "\n"
