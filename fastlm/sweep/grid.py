"""The grid of a sweep: which cells, which fields take which values, and the points that makes.

A grid comes from the command line (``--cells lstm,gru --set nlayers=1,2 --set nhid=100,200``, per-cell settings
with ``--set-cell gru:lr=5``) or from a TOML file (``--grid FILE``)::

    cells = ["lstm", "gru"]
    [axes]
    nlayers = [1, 2]
    nhid = [100, 200]
    [per_cell.gru]
    lr = 5.0
    design = "ofat"          # or "grid"
    seeds = [1111, 1112]     # or --seeds 2

Any field of the run configuration (fastlm.config) may be an axis, named without its section. Each point is
one cell with one value per axis, and becomes an ordinary training run.

Two designs. ``ofat`` (one factor at a time, what a study of "vary one parameter, keep the rest" needs, and
the sweep command's default) takes a baseline (each axis at the base configuration's value when the axis lists
it, else at the axis's first value) and varies one axis at a time from it: 1 + sum(len(values) - 1) points per
cell. ``grid`` takes every combination. Each point is trained once per seed (``--seeds``): the seeds are
replicates, which the report averages and whose spread it compares the cells' differences with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import product
from typing import Optional

from fastlm.config import CELLS, COMPARED_CELLS, RunConfig, load_toml, setting_fields
from fastlm.errors import FastlmError

# Settings a sweep decides itself: which cell (--cells), where each run lives, on which device, its budget.
NOT_AN_AXIS = {"cell", "run_dir", "device", "max_steps", "max_minutes", "save", "dry_run"}
DESIGNS = ("ofat", "grid")


def config_field(name: str) -> tuple[str, type]:
    """(section, type of its default) of a RunConfig field named without its section."""
    for section, f in setting_fields():
        if f.name == name:
            return section, type(f.default)
    raise FastlmError(f"--set {name}: no such setting; settings are the fields of [model], [data] and [train] "
                      f"(e.g. nlayers, nhid, emsize, bptt, lr, dropout, epochs)")


def parse_value(name: str, text: str):
    """A command-line value in the type the field has (an int field takes 200, a float field 0.5 or 20)."""
    _, kind = config_field(name)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return None if text.lower() == "none" else _number_or_text(text)
    except ValueError:
        raise FastlmError(f"--set {name}={text}: expected a value of type {kind.__name__}") from None


def _number_or_text(text: str):
    """For fields whose default is None (their type unknown here): a number when it reads as one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class Grid:
    cells: list[str] = field(default_factory=lambda: list(COMPARED_CELLS))
    axes: dict[str, list] = field(default_factory=dict)  # field -> values, in the order given
    per_cell: dict[str, dict] = field(default_factory=dict)  # cell -> {field: value}
    # "grid" here: what a sweep file written before designs existed holds; the sweep command defaults to "ofat".
    design: str = "grid"
    seeds: list[int] = field(default_factory=list)  # replicates; none: the base configuration's seed once

    def to_dict(self) -> dict:
        return {"cells": list(self.cells), "axes": {k: list(v) for k, v in self.axes.items()},
                "per_cell": {k: dict(v) for k, v in self.per_cell.items()}, "design": self.design,
                "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, values: dict) -> "Grid":
        """A grid as to_dict (or an older sweep.json, without design and seeds) wrote it."""
        return cls(list(values.get("cells", COMPARED_CELLS)), {k: list(v) for k, v in values.get("axes", {}).items()},
                   {k: dict(v) for k, v in values.get("per_cell", {}).items()}, values.get("design", "grid"),
                   list(values.get("seeds", [])))

    def baseline(self, base: RunConfig) -> dict:
        """Each axis's baseline value: the base configuration's when the axis lists it, else its first."""
        found = {}
        for name, values in self.axes.items():
            section = config_field(name)[0]
            value = getattr(getattr(base, section), name)
            found[name] = value if any(repr(value) == repr(v) for v in values) else values[0]
        return found

    def check(self) -> "Grid":
        unknown = [cell for cell in self.cells if cell not in CELLS]
        if self.design not in DESIGNS:
            raise FastlmError(f"--design takes {' or '.join(DESIGNS)}; got {self.design!r}")
        if any(isinstance(seed, bool) or not isinstance(seed, int) for seed in self.seeds) or \
                len(set(self.seeds)) != len(self.seeds):
            raise FastlmError(f"--seeds takes distinct whole numbers; got {self.seeds}")
        if not self.cells or unknown:
            raise FastlmError(f"--cells takes some of {', '.join(CELLS)}; got {', '.join(self.cells) or 'none'}")
        if len(set(self.cells)) != len(self.cells):
            raise FastlmError(f"--cells names a cell twice: {', '.join(self.cells)}")
        per_cell = [(name, [value]) for settings in self.per_cell.values() for name, value in settings.items()]
        for name, values in [*self.axes.items(), *per_cell]:
            config_field(name)
            if name == "seed":
                raise FastlmError("--set seed: seeds are replicates, not a setting to compare: use --seeds N "
                                  "(N seeds from --seed on) or --seeds S1,S2,...")
            if name in NOT_AN_AXIS:
                raise FastlmError(f"--set {name}: the sweep sets {name} itself (use --cells for cells, --devices "
                                  f"for devices, --max-steps / --max-minutes-per-run for budgets)")
            if not values or len({repr(v) for v in values}) != len(values):
                raise FastlmError(f"--set {name}: give distinct values, e.g. --set {name}=1,2")
        for cell in self.per_cell:
            if cell not in self.cells:
                raise FastlmError(f"--set-cell {cell}: {cell} is not one of the sweep's cells "
                                  f"({', '.join(self.cells)})")
        return self


def grid_from_toml(path) -> Grid:
    values = load_toml(path)
    unknown = set(values) - {"cells", "axes", "per_cell", "design", "seeds"}
    if unknown:
        raise FastlmError(f"grid file {path}: unknown key(s) {', '.join(sorted(unknown))}; it takes cells, [axes], "
                          f"[per_cell.CELL], design and seeds")
    axes = {name: list(v) if isinstance(v, list) else [v] for name, v in values.get("axes", {}).items()}
    seeds = values.get("seeds", [])
    return Grid(list(values.get("cells", COMPARED_CELLS)), axes, dict(values.get("per_cell", {})),
                values.get("design", "ofat"), seeds if isinstance(seeds, list) else [seeds])


def parse_seeds(text: str, first_seed: int) -> list[int]:
    """``--seeds``: a count N (the seeds first_seed, first_seed + 1, ...) or a list S1,S2,..."""
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError:
        raise FastlmError(f"--seeds takes a count (e.g. 3) or a list of seeds (e.g. 1,2,3); got {text!r}") from None
    if len(numbers) > 1:
        return numbers
    if numbers[0] < 1:
        raise FastlmError(f"--seeds takes a count of at least 1 or a list of seeds; got {text!r}")
    return [first_seed + i for i in range(numbers[0])]


def add_setting(grid: Grid, text: str) -> None:
    """``--set FIELD=V1,V2``."""
    name, _, values = text.partition("=")
    if not name or not values:
        raise FastlmError(f"--set takes FIELD=V1,V2,...; got {text!r}")
    grid.axes[name.strip()] = [parse_value(name.strip(), v.strip()) for v in values.split(",")]


def add_cell_setting(grid: Grid, text: str) -> None:
    """``--set-cell CELL:FIELD=VALUE``."""
    cell, _, rest = text.partition(":")
    name, _, value = rest.partition("=")
    if not cell or not name or not value:
        raise FastlmError(f"--set-cell takes CELL:FIELD=VALUE, e.g. gru:lr=5; got {text!r}")
    grid.per_cell.setdefault(cell.strip(), {})[name.strip()] = parse_value(name.strip(), value.strip())


@dataclass(frozen=True)
class Point:
    name: str
    cell: str
    settings: dict  # axis -> value
    seed: Optional[int] = None  # None: the base configuration's

    def config(self, base: RunConfig, per_cell: dict) -> RunConfig:
        """The point's run configuration: the base, its cell, its axis values and seed, then its cell's own
        settings."""
        config = RunConfig.from_dict(base.to_dict(), origin="sweep base")
        overrides: dict = {"model": {"cell": self.cell}}
        if self.seed is not None:
            overrides["train"] = {"seed": self.seed}
        for name, value in {**self.settings, **per_cell.get(self.cell, {})}.items():
            overrides.setdefault(config_field(name)[0], {})[name] = value
        config.update(overrides, origin=f"sweep point {self.name}")
        try:
            return config.validate()
        except FastlmError as error:
            raise FastlmError(f"sweep point {self.name}: {error}") from None


def points(grid: Grid, base: Optional[RunConfig] = None) -> list[Point]:
    """The design's points for every cell and seed, cells varying slowest, seeds fastest: every combination of
    axis values ("grid"), or the baseline then each axis's other values ("ofat", around ``base``)."""
    names = list(grid.axes)
    if grid.design == "ofat":
        baseline = grid.baseline(base or RunConfig())
        combinations = [baseline] + [{**baseline, name: value} for name in names for value in grid.axes[name]
                                     if repr(value) != repr(baseline[name])]
    else:
        combinations = [dict(zip(names, values, strict=True)) for values in product(*(grid.axes[n] for n in names))]
    seeds = grid.seeds if len(grid.seeds) > 1 else [grid.seeds[0] if grid.seeds else None]
    found = []
    for cell in grid.cells:
        for settings in combinations:
            label = "-".join([cell] + [f"{n}{_slug(v)}" for n, v in settings.items()])
            for seed in seeds:
                # One seed keeps the names of a sweep without replicates.
                found.append(Point(label + (f"-seed{seed}" if len(seeds) > 1 else ""), cell, settings, seed))
    return found


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(value))
