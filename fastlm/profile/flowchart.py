"""The picture of a breakdown: the training pipeline as boxes and arrows, each box labelled with its cost.

One-off work (prepare: corpus loading and tokenising; batchify) is drawn in grey with its time in ms, since it
is not part of a step. The step's components (data, embedding, RNN, decoder, loss, backward, clip, optimizer)
are coloured by their share of the measured step time, and the forward pass's parts sit on a band labelled
with the forward share, so the picture reads the same way as the table. Written as SVG and PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from fastlm.timing import BACKWARD, CLIP, DATA, DECODER, EMBEDDING, FORWARD, LOSS, OPTIMIZER, RNN  # noqa: E402

BOX_W, BOX_H = 1.7, 1.0
# (key, label, column, row); row 0 holds one-off work, rows 1-2 the step, which runs right on row 1 and back
# left on row 2 so that the loop closes from optimizer to data.
LAYOUT = [
    ("prepare", "prepare\n(load, tokenise)", 0, 0), ("batchify", "batchify", 1, 0),
    (DATA, "data\n(fetch, H2D)", 0, 1), (EMBEDDING, "embedding", 1, 1), (RNN, "RNN", 2, 1),
    (DECODER, "decoder", 3, 1), (LOSS, "loss", 4, 1),
    (BACKWARD, "backward", 4, 2), (CLIP, "clip", 3, 2), (OPTIMIZER, "optimizer", 2, 2),
]
FLOW = [("prepare", "batchify"), ("batchify", DATA), (DATA, EMBEDDING), (EMBEDDING, RNN), (RNN, DECODER),
        (DECODER, LOSS), (LOSS, BACKWARD), (BACKWARD, CLIP), (CLIP, OPTIMIZER), (OPTIMIZER, DATA)]
ONE_OFF = {"prepare": ("corpus_load",), "batchify": ("batchify",)}


def _centre(column: int, row: int) -> tuple[float, float]:
    return 0.4 + column * 2.4 + BOX_W / 2, 5.2 - row * 2.0


def _entry(breakdown: dict, key: str) -> dict:
    return breakdown["phases"].get(key) or breakdown["forward_parts"].get(key) or {}


def _label(breakdown: dict, key: str, name: str) -> tuple[str, float | None]:
    """(box text, share or None for one-off work)."""
    if key in ONE_OFF:
        once = breakdown.get("one_off_ms", {})
        values = [once[k] for k in ONE_OFF[key] if once.get(k) is not None]
        return f"{name}\none-off {sum(values):,.0f} ms" if values else f"{name}\none-off", None
    entry = _entry(breakdown, key)
    if entry.get("share") is None:
        return f"{name}\n{'timed as one' if _combined(breakdown) else 'not timed alone'}", None
    return f"{name}\n{100 * entry['share']:.1f}%  {entry['mean_ms']:,.2f} ms", entry["share"]


def _combined(breakdown: dict) -> list[str]:
    """Phases reported together (named "a+b+..."), as a CUDA graph replay makes them."""
    return [name for name in breakdown["phases"] if "+" in name]


def draw(breakdown: dict, svg_path: Path, png_path: Path) -> None:
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable, selectable, smaller
        _draw(breakdown, svg_path, png_path)


def _draw(breakdown: dict, svg_path: Path, png_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12.5, 5.8))
    ax.set_xlim(0, 12.2)
    ax.set_ylim(0.6, 6.1)
    ax.axis("off")
    colours = plt.get_cmap("YlOrRd")
    forward = breakdown["phases"].get(FORWARD, {})
    if forward.get("share") is not None:
        left, top = _centre(1, 1)
        band = FancyBboxPatch((left - BOX_W / 2 - 0.2, top - BOX_H / 2 - 0.25), 3 * 2.4 + BOX_W + 0.4,
                              BOX_H + 0.75, boxstyle="round,pad=0.02,rounding_size=0.15", facecolor="#eef3fb",
                              edgecolor="#9db4d9", linewidth=1.0)
        ax.add_patch(band)
        ax.text(left - BOX_W / 2 - 0.1, top + BOX_H / 2 + 0.28, f"forward {100 * forward['share']:.1f}%  "
                f"{forward['mean_ms']:,.2f} ms", fontsize=9, color="#3a5a8c", va="center")
    for key, name, column, row in LAYOUT:
        x, y = _centre(column, row)
        text, share = _label(breakdown, key, name)
        one_off = key in ONE_OFF
        face = "#e6e6e6" if one_off or share is None else colours(0.12 + 0.8 * min(share / 0.6, 1.0))
        ax.add_patch(FancyBboxPatch((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face,
                                    edgecolor="#555555", linestyle="--" if one_off else "-", linewidth=1.2))
        ax.text(x, y, text, ha="center", va="center", fontsize=9.5, color="black" if (share or 0) < 0.45 else "white")
    positions = {key: _centre(column, row) for key, _, column, row in LAYOUT}
    for source, target in FLOW:
        ax.add_patch(_arrow(positions[source], positions[target], loop=(source, target) == (OPTIMIZER, DATA)))
    x, y = positions[OPTIMIZER]
    ax.text((x - BOX_W / 2 + positions[DATA][0]) / 2, y + 0.1, "next step", fontsize=8.5, color="#555555",
            ha="center")
    step = breakdown["step_ms"]
    title = (f"{breakdown.get('title', 'training step')}\nstep {step['mean']:,.2f} ms mean, "
             f"{step['median']:,.2f} ms median | {breakdown['tokens_per_s']:,.0f} tokens/s | phases cover "
             f"{100 * breakdown['coverage']:.1f}% of the measured step")
    for name in _combined(breakdown):
        entry = breakdown["phases"][name]
        title += f"\n{name} timed as one: {100 * entry['share']:.1f}%  {entry['mean_ms']:,.2f} ms"
    ax.set_title(title, fontsize=10.5, loc="left")
    fig.tight_layout()
    fig.savefig(svg_path, format="svg")
    fig.savefig(png_path, format="png", dpi=110)
    plt.close(fig)


def _arrow(start, end, loop: bool) -> FancyArrowPatch:
    (x0, y0), (x1, y1) = start, end
    style = "arc3,rad=0.0"
    if loop:  # optimizer -> data: out of the left side, along the row, up into the bottom
        start, end, style = (x0 - BOX_W / 2, y0), (x1, y1 - BOX_H / 2), "angle,angleA=180,angleB=90,rad=8"
    elif y0 == y1:  # along a row: from one box's side to the next box's side
        side = BOX_W / 2 if x1 > x0 else -BOX_W / 2
        start, end = (x0 + side, y0), (x1 - side, y1)
    elif x0 == x1:  # down a column
        start, end = (x0, y0 - BOX_H / 2), (x1, y1 + BOX_H / 2)
    else:  # batchify -> data: leaves the bottom, enters the top
        start, end = (x0, y0 - BOX_H / 2), (x1 + 0.3, y1 + BOX_H / 2)
    return FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.3, color="#333333",
                           connectionstyle=style)
