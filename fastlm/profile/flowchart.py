"""The picture of a breakdown: the training loop as boxes and arrows, each box labelled with its cost.

The step's components (data, embedding, RNN, decoder, loss; the gradients of decoder and loss, of the recurrent
layers through time, of the embedding; clip, optimizer) are coloured by their share of the measured step time,
on bands labelled with the forward and backward shares, so the picture reads the same way as the table. Drawn
in grey, dashed, around the step: the one-off work (prepare: corpus loading and tokenising; batchify) with its
time, the hidden state carried from chunk to chunk and detached (where back-propagation through time stops),
and what each epoch and the run end with (validation; the test of the best model) with their cost per batch
and for the whole split. Written as SVG and PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from fastlm.profile.machine_limits import furthest_line  # noqa: E402
from fastlm.timing import (  # noqa: E402
    BACKWARD,
    CLIP,
    DATA,
    DECODER,
    DECODER_GRAD,
    EMBEDDING,
    EMBEDDING_GRAD,
    FORWARD,
    LOSS,
    OPTIMIZER,
    RNN,
    RNN_GRAD,
)

BOX_W, BOX_H = 1.7, 1.0
# (key, label, column, row). Row 0: one-off work and the hidden state; row 1: the step's forward pass, left to
# right; row 2: its backward pass and the update, right to left, so the loop closes from optimizer up to data;
# column 5: what each epoch ends with (validation) and the run with (test).
STATE, STATE_TEXT = "state", "hidden state\ncarried to the next chunk,\ndetached: BPTT stops here"
LAYOUT = [
    ("prepare", "prepare\n(load, tokenise)", 0, 0), ("batchify", "batchify", 1, 0), (STATE, STATE_TEXT, 2, 0),
    (DATA, "data", 0, 1), (EMBEDDING, "embedding", 1, 1), (RNN, "RNN", 2, 1),
    (DECODER, "decoder", 3, 1), (LOSS, "loss", 4, 1),
    (DECODER_GRAD, "decoder + loss\ngradients", 4, 2), (RNN_GRAD, "RNN gradients\n(BPTT)", 3, 2),
    (EMBEDDING_GRAD, "embedding\ngradients", 2, 2), (CLIP, "clip", 1, 2), (OPTIMIZER, "optimizer", 0, 2),
    ("valid", "validation\n(each epoch)", 5, 1), ("test", "test\n(best model, at the end)", 5, 2),
]
FLOW = [("prepare", "batchify"), ("batchify", DATA), (DATA, EMBEDDING), (EMBEDDING, RNN), (RNN, DECODER),
        (DECODER, LOSS), (LOSS, DECODER_GRAD), (DECODER_GRAD, RNN_GRAD), (RNN_GRAD, EMBEDDING_GRAD),
        (EMBEDDING_GRAD, CLIP), (CLIP, OPTIMIZER), (OPTIMIZER, DATA)]
ONE_OFF = {"prepare": ("corpus_load",), "batchify": ("batchify",)}
EVALUATION = ("valid", "test")


def _centre(column: int, row: int) -> tuple[float, float]:
    return 0.4 + column * 2.4 + BOX_W / 2, 5.2 - row * 2.0


def _entry(breakdown: dict, key: str) -> dict:
    for section in ("phases", "forward_parts", "backward_parts"):
        if breakdown.get(section, {}).get(key):
            return breakdown[section][key]
    return {}


def _label(breakdown: dict, key: str, name: str) -> tuple[str, float | None]:
    """(box text, share or None for work outside the step)."""
    if key == STATE:
        return name, None
    if key in ONE_OFF:
        once = breakdown.get("one_off_ms", {})
        values = [once[k] for k in ONE_OFF[key] if once.get(k) is not None]
        return f"{name}\none-off {sum(values):,.0f} ms" if values else f"{name}\none-off", None
    if key in EVALUATION:
        timing = breakdown.get("evaluation", {}).get(key)
        if not timing:
            return name, None
        return (f"{name}\n{timing['ms_per_batch']:,.1f} ms a batch,\n{timing['split_batches']:,} batches "
                f"≈ {timing['split_seconds_estimate']:,.1f} s"), None
    if key == DATA:
        name = f"{name}\n{_data_work(breakdown.get('device'))}"
    if key == DECODER and breakdown.get("step") == "fast" and _entry(breakdown, key).get("share") is not None:
        name = "decoder\n(+ its gradients)"  # the fused loss computes them in forward
    entry = _entry(breakdown, key)
    if entry.get("share") is None:
        return f"{name}\n{'timed as one' if _combined(breakdown) else 'not timed alone'}", None
    return f"{name}\n{100 * entry['share']:.1f}%  {entry['mean_ms']:,.2f} ms", entry["share"]


def _data_work(device: str | None) -> str:
    """What the data phase does: fetch the batch, and on an accelerator copy it there (H2D); a CPU run computes
    on the batch where it lies, with no copy. A breakdown without its device names both."""
    return "(fetch)" if device is not None and device.split(":")[0] == "cpu" else "(fetch, H2D)"


def _combined(breakdown: dict) -> list[str]:
    """Phases reported together (named "a+b+..."), as a CUDA graph replay makes them."""
    return [name for name in breakdown["phases"] if "+" in name]


def draw(breakdown: dict, svg_path: Path, png_path: Path) -> None:
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, selectable, smaller
        _draw(breakdown, svg_path, png_path)


def _band(ax, first: int, last: int, row: int, label: str) -> None:
    """A shaded band behind the boxes of ``row`` from column ``first`` to ``last``, labelled above."""
    left, centre = _centre(first, row)
    width = (last - first) * 2.4 + BOX_W + 0.4
    ax.add_patch(FancyBboxPatch((left - BOX_W / 2 - 0.2, centre - BOX_H / 2 - 0.25), width, BOX_H + 0.75,
                                boxstyle="round,pad=0.02,rounding_size=0.15", facecolor="#eef3fb",
                                edgecolor="#9db4d9", linewidth=1.0))
    ax.text(left - BOX_W / 2 - 0.1, centre + BOX_H / 2 + 0.28, label, fontsize=9, color="#3a5a8c", va="center")


def _draw(breakdown: dict, svg_path: Path, png_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(15.5, 6.2))
    ax.set_xlim(0, 14.6)
    ax.set_ylim(0.3, 6.3)
    ax.axis("off")
    colours = plt.get_cmap("YlOrRd")
    for phase_name, first, last, row in ((FORWARD, 1, 4, 1), (BACKWARD, 2, 4, 2)):
        entry = breakdown["phases"].get(phase_name, {})
        if entry.get("share") is not None:
            _band(ax, first, last, row, f"{phase_name} {100 * entry['share']:.1f}%  {entry['mean_ms']:,.2f} ms")
    for key, name, column, row in LAYOUT:
        x, y = _centre(column, row)
        text, share = _label(breakdown, key, name)
        outside = key in ONE_OFF or key in EVALUATION or key == STATE  # not a part of the step's time
        face = "#e6e6e6" if outside or share is None else colours(0.12 + 0.8 * min(share / 0.6, 1.0))
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face,
                                    edgecolor="#555555", linestyle="--" if outside else "-", linewidth=1.2))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5 if key in (STATE, *EVALUATION) else 9.5,
                color="black" if (share or 0) < 0.45 else "white")
    positions = {key: _centre(column, row) for key, _, column, row in LAYOUT}
    for source, target in FLOW:
        ax.add_patch(_arrow(positions[source], positions[target]))
    x, y = positions[OPTIMIZER]
    ax.text(x - BOX_W / 2 - 0.05, y + 1.0, "next\nstep", fontsize=8.5, color="#555555", ha="right", va="center")
    _state_arrows(ax, positions[RNN], positions[STATE])
    for source, target, text in ((LOSS, "valid", "epoch done"), ("valid", "test", "best model")):
        ax.add_patch(_arrow(positions[source], positions[target], dashed=True))
        (x0, y0), (x1, y1) = positions[source], positions[target]
        along_row = y0 == y1
        ax.text((x0 + x1) / 2 + (0 if along_row else 0.1), (y0 + y1) / 2 + (0.12 if along_row else 0), text,
                fontsize=8, color="#555555", ha="center" if along_row else "left", va="bottom")
    ax.set_title(_title(breakdown), fontsize=10.5, loc="left")
    fig.tight_layout()
    fig.savefig(svg_path, format="svg")
    fig.savefig(png_path, format="png", dpi=110)
    plt.close(fig)


def _state_arrows(ax, rnn, state) -> None:
    """The hidden state leaving the RNN after a chunk and entering it again for the next one, detached."""
    (x, y0), (_, y1) = rnn, state
    for offset, upward, text in ((-0.4, True, "h, c\nout"), (0.4, False, "in, as\nconstants")):
        start, end = (x + offset, y0 + BOX_H / 2), (x + offset, y1 - BOX_H / 2)
        ax.add_patch(FancyArrowPatch(start if upward else end, end if upward else start, arrowstyle="-|>",
                                     mutation_scale=12, linewidth=1.1, color="#555555", linestyle="--"))
        ax.text(x + offset + (-0.08 if upward else 0.08), (y0 + y1) / 2, text, fontsize=7.5, color="#555555",
                ha="right" if upward else "left", va="center")


def _title(breakdown: dict) -> str:
    step = breakdown["step_ms"]
    title = (f"{breakdown.get('title', 'training step')}\nstep {step['mean']:,.2f} ms mean, "
             f"{step['median']:,.2f} ms median | {breakdown['tokens_per_s']:,.0f} tokens/s | phases cover "
             f"{100 * breakdown['coverage']:.1f}% of the measured step")
    for name in _combined(breakdown):
        entry = breakdown["phases"][name]
        title += f"\n{name} timed as one: {100 * entry['share']:.1f}%  {entry['mean_ms']:,.2f} ms"
    furthest = furthest_line(breakdown.get("limits", {}))
    if furthest:
        title += f"\n{furthest}"
    return title


def _arrow(start, end, dashed: bool = False) -> FancyArrowPatch:
    (x0, y0), (x1, y1) = start, end
    if y0 == y1:  # along a row: from one box's side to the next box's side
        side = BOX_W / 2 if x1 > x0 else -BOX_W / 2
        start, end = (x0 + side, y0), (x1 - side, y1)
    elif x0 == x1:  # up or down a column
        side = BOX_H / 2 if y1 > y0 else -BOX_H / 2
        start, end = (x0, y0 + side), (x1, y1 - side)
    else:  # batchify -> data: leaves the bottom, enters the top
        start, end = (x0, y0 - BOX_H / 2), (x1 + 0.3, y1 + BOX_H / 2)
    return FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.3, color="#333333",
                           linestyle="--" if dashed else "-")
