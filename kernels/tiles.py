"""Tile sizes of the Triton kernels: per-step, a heuristic default and a one-time tuning pass on the GPU;
persistent, a fixed rule.

A ``LaunchConfig`` gives a kernel's tiles (BLOCK_B, BLOCK_H), reduction chunk (BLOCK_K) and warps. Per
``TileKey`` the first call on a GPU times a few ``candidates`` on scratch buffers of the real shape
(``time_launch``) and keeps the fastest, in this process and in ``<cache dir>/triton-tiles/<device name>,
triton <version>.json`` (slugged; fastlm.data.cache.default_cache_dir()), replaced atomically; an unreadable
file is ignored with a one-line warning and overwritten. Nothing is timed when interpreted (then
``interpreter_config``), and ``heuristic_config`` serves with FASTLM_TRITON_TUNE=0, under CUDA-graph capture
for a key neither chosen in this process nor cached, or when every candidate failed (each failure is logged).
``persistent_config``: compiled, one program per PERSISTENT_BLOCK_H hidden units, the batch in one tile up to
64 rows, W_hh resident (``persistent_tiles``: one K tile, 8 warps) when the products use tensor cores and the
slices and the h operand fit RESIDENT_WEIGHT_BYTES and RESIDENT_ROWS_BYTES, else K chunks of 32 (fp32) or 64
(16-bit), 4 warps; interpreted, one program. Tiles the caller forces (``tiles=`` of fastlm.kernels.gru and
lstm, ``TritonStack.launch_config``) serve both. Why: docs/semantics.md, "The Triton kernels: ...".
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path
from typing import Callable, Optional

import torch

from fastlm.errors import first_line
from fastlm.paths import replace_file

log = logging.getLogger(__name__)

FORMAT = 1  # of the cache file; another value makes the file unreadable (then re-tuned and overwritten)
TIMED_LAUNCHES = 20  # launches in the CUDA graph one timing replays
TIMED_REPLAYS = 3  # replays per candidate; the fastest counts (the first one also uploads the graph)
KERNELS = ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward")


PERSISTENT_BLOCK_H = 16  # hidden units per persistent program: tl.dot's smallest N, the most programs
# The two bounds of the resident rule (``persistent_tiles``); their reasons: docs/semantics.md, "Tiles: the
# persistent rule and the per-step tuner".
RESIDENT_WEIGHT_BYTES = 64 * 1024  # W_hh slices a persistent program may keep on chip: a quarter of an SM's registers
RESIDENT_ROWS_BYTES = 32 * 1024  # the [BLOCK_B, K_pad] operand each of its steps multiplies them with


def _is_pow2(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


def pow2_at_least(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n, clamped to [low, high]."""
    return min(high, max(low, 1 << (n - 1).bit_length()))


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and warps of one step kernel's launch.

    block_b, block_h: the (batch, hidden) output tile of one program; block_k: the reduction chunk. All are
    powers of two and at least 16 (tl.dot's minimum); masks handle any B and H. Whether fp32 tiles may use
    TF32 is not part of it: that follows torch's matmul flag at each call.
    """

    block_b: int
    block_h: int
    block_k: int
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_b", "block_h", "block_k"):
            value = getattr(self, name)
            if not (_is_pow2(value) and value >= 16):
                raise ValueError(f"LaunchConfig.{name} must be a power of two >= 16 (tl.dot's minimum), got {value!r}")
        if not (_is_pow2(self.num_warps) and self.num_warps <= 16):
            raise ValueError(f"LaunchConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")

    def grid(self, B: int, H: int) -> tuple[int, int]:
        return (-(-B // self.block_b), -(-H // self.block_h))

    def meta(self) -> dict:
        """The kernels' tile constexprs and the launch's num_warps, as keyword arguments of a launch."""
        return dict(BLOCK_B=self.block_b, BLOCK_H=self.block_h, BLOCK_K=self.block_k, num_warps=self.num_warps)


@dataclass(frozen=True)
class PersistentConfig:
    """How a persistent kernel launches: its tiles, its grid of ``programs`` (one program per SM at most;
    1 is single-program mode: no grid barrier), and whether each program keeps its W_hh slices on chip
    (``resident``: needs one K tile, tiles.block_k >= H, and one hidden block per program)."""

    tiles: LaunchConfig
    programs: int
    resident: bool

    @property
    def single_program(self) -> bool:
        return self.programs == 1

    def meta(self) -> dict:
        """The kernels' mode and tile constexprs and the launch's num_warps and num_stages, as keyword
        arguments of a launch. num_stages=1: no software pipelining across the grid barrier (see
        kernels/grid_barrier.py)."""
        return dict(RESIDENT=self.resident, SINGLE_PROGRAM=self.single_program, num_stages=1, **self.tiles.meta())

    def record(self) -> dict:
        """JSON-ready fields for reports: the tiles, programs, resident, single_program."""
        return {**asdict(self.tiles), "programs": self.programs, "resident": self.resident,
                "single_program": self.single_program}


def persistent_tiles(batch: int, hidden: int, gates: int, dtype: str, allow_tf32: bool) -> LaunchConfig:
    """The compiled persistent kernels' tiles (the rule in the module docstring). gates: 4 (LSTM) or 3 (GRU);
    dtype: torch's name without "torch."; allow_tf32: whether fp32 products may use TF32."""
    element = 4 if dtype == "float32" else 2
    k_pad = pow2_at_least(hidden, 16, 1 << 30)
    block_b = pow2_at_least(batch, 16, 64)
    tensor_cores = dtype != "float32" or allow_tf32
    if (tensor_cores and gates * k_pad * PERSISTENT_BLOCK_H * element <= RESIDENT_WEIGHT_BYTES
            and block_b * k_pad * element <= RESIDENT_ROWS_BYTES):
        return LaunchConfig(block_b, PERSISTENT_BLOCK_H, k_pad, num_warps=8)
    return LaunchConfig(block_b, PERSISTENT_BLOCK_H, 32 if dtype == "float32" else 64, num_warps=4)


def persistent_config(batch: int, hidden: int, gates: int, dtype: str, allow_tf32: bool, interpreted: bool,
                      tiles: Optional[LaunchConfig] = None) -> PersistentConfig:
    """The PersistentConfig of a layer of this shape: ``tiles`` (when given) or the rule's, one program per
    hidden block when compiled, one program under the interpreter; resident when one K tile covers H and
    each program owns one hidden block."""
    if tiles is None:
        tiles = (interpreter_config(batch, hidden) if interpreted
                 else persistent_tiles(batch, hidden, gates, dtype, allow_tf32))
    blocks = -(-hidden // tiles.block_h)
    programs = 1 if interpreted else blocks
    return PersistentConfig(tiles, programs, resident=tiles.block_k >= hidden and programs == blocks)


@dataclass(frozen=True)
class TileKey:
    """What the best tiles depend on. kernel: one of KERNELS; dtype: torch's name without "torch."
    ("float32"); allow_tf32: whether fp32 tiles use TF32 (always False for other dtypes)."""

    kernel: str
    batch: int
    hidden: int
    dtype: str
    allow_tf32: bool

    def text(self) -> str:
        """The key as the cache file spells it, e.g. "lstm_forward B=20 H=200 float32 tf32=0"."""
        return f"{self.kernel} B={self.batch} H={self.hidden} {self.dtype} tf32={int(self.allow_tf32)}"


@dataclass(frozen=True)
class Choice:
    """A LaunchConfig and where it came from: "tuned" (timed in this process), "cached" (read from the tile
    cache), "heuristic" (nothing timed: see the module docstring) or "override" (set by the caller)."""

    config: LaunchConfig
    source: str


def interpreter_config(batch: int, hidden: int) -> LaunchConfig:
    """Under Triton's interpreter programs run one after another in numpy: fewest, largest tiles are fastest."""
    return LaunchConfig(pow2_at_least(batch, 16, 128), pow2_at_least(hidden, 16, 256), pow2_at_least(hidden, 16, 256))


def heuristic_config(key: TileKey) -> LaunchConfig:
    """The compiled kernels' default when nothing is timed. A step at these sizes is latency bound: thin
    hidden tiles spread it over more SMs, while the batch tile covers as many rows as it can so that each
    W_hh tile is read from L2 by few programs; bf16/fp16 tiles reduce over longer chunks for the tensor
    cores."""
    return LaunchConfig(pow2_at_least(key.batch, 16, 64), 32 if key.hidden >= 512 else 16,
                        32 if key.dtype == "float32" else 64, num_warps=4)


def candidates(key: TileKey) -> list[LaunchConfig]:
    """What the tuner times for ``key``: the heuristic first (so a tie keeps it), then at most five others
    that trade tile size for more programs, or the reverse. Each distinct one costs a compile on a GPU."""
    full_b = pow2_at_least(key.batch, 16, 64)
    chunk = 32 if key.dtype == "float32" else 64
    configs = [
        heuristic_config(key),
        LaunchConfig(full_b, 16, chunk, 4),  # one batch tile (for B <= 64), the thinnest hidden tiles
        LaunchConfig(full_b, 32, chunk, 4),
        LaunchConfig(16, 16, chunk, 2),  # the most programs, each small enough for two warps
        LaunchConfig(16, 32, chunk, 4),
        LaunchConfig(full_b, 16, 2 * chunk, 4),  # half the reduction loop's trips (backward's K is 4H or 3H)
    ]
    if key.hidden >= 1024:
        configs.append(LaunchConfig(full_b, 64, chunk, 8))  # at large H even wide tiles fill the GPU
    return list(dict.fromkeys(configs))  # without repeats, in order


def tuning_enabled() -> bool:
    """False when FASTLM_TRITON_TUNE=0 (read at each call)."""
    return os.environ.get("FASTLM_TRITON_TUNE", "").strip() != "0"


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def time_launch(launch: Callable[[], None]) -> float:
    """Milliseconds per call of ``launch`` (a kernel launch on the current CUDA device).

    One call compiles and warms the caches; then TIMED_LAUNCHES calls captured in a CUDA graph are replayed
    TIMED_REPLAYS times between CUDA events, and the fastest replay counts. The graph keeps the host's
    launch cost (tens of microseconds from Python, more than a small step kernel runs) out of the time, as
    it is out of a graph-captured training step; caches stay warm, as they are from one step to the next.
    """
    launch()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(TIMED_LAUNCHES):
            launch()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(TIMED_REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best / TIMED_LAUNCHES


class TileTuner:
    """Chooses each step kernel's LaunchConfig per key and machine, timing candidates at most once per key
    (see the module docstring). ``cache_dir`` None: default_cache_dir(), looked up at each use."""

    def __init__(self, cache_dir: Optional[Path] = None):
        self.cache_dir = cache_dir
        self._chosen: dict[tuple[str, TileKey], Choice] = {}
        self._warned: set[str] = set()

    def choose(self, key: TileKey, machine: str, measure: Callable[[LaunchConfig], float],
               interpreted: bool = False) -> Choice:
        """The config for ``key`` on ``machine`` (device name and triton version: what the cache file is
        for). ``measure(config)`` times one launch in ms; it is called only when the key is tuned."""
        if interpreted:
            return Choice(interpreter_config(key.batch, key.hidden), "heuristic")
        if not tuning_enabled():
            return Choice(heuristic_config(key), "heuristic")
        chosen = self._chosen.get((machine, key))
        if chosen is not None:
            return chosen
        path = self.cache_file(machine)
        entries = self._read(path, machine)
        if key.text() in entries:
            chosen = Choice(_config_from_entry(entries[key.text()]), "cached")
        elif capturing():
            return Choice(heuristic_config(key), "heuristic")  # not remembered: tuned at the next eager call
        else:
            chosen, ms = self._tune(key, measure)
            if ms is not None:
                self._write(path, machine, key, chosen.config, ms)
        self._chosen[(machine, key)] = chosen
        return chosen

    def cache_file(self, machine: str) -> Path:
        """The tile cache of one machine: one JSON file per device name and triton version."""
        from fastlm.data.cache import default_cache_dir  # here: importing fastlm.data loads the corpus modules

        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", machine).strip("-") or "unknown"
        return Path(self.cache_dir or default_cache_dir()) / "triton-tiles" / f"{slug}.json"

    def _tune(self, key: TileKey, measure: Callable[[LaunchConfig], float]) -> tuple[Choice, Optional[float]]:
        """The fastest candidate and its ms per launch; the heuristic and None when none ran."""
        timed = []
        for config in candidates(key):
            try:
                timed.append((measure(config), config))
            except Exception as error:  # noqa: BLE001 - a candidate that cannot run is skipped, never fatal
                log.warning("triton tiles: %s: %s failed (%s); skipped", key.text(), config, first_line(error))
        if not timed:
            log.warning("triton tiles: %s: no candidate ran; using the heuristic tiles", key.text())
            return Choice(heuristic_config(key), "heuristic"), None
        ms, config = min(timed, key=itemgetter(0))  # the first of equals: the heuristic on a tie
        log.info("triton tiles: %s -> %s, %.1f us per launch (%d candidates timed)", key.text(), config,
                 ms * 1e3, len(timed))
        return Choice(config, "tuned"), ms

    def _read(self, path: Path, machine: str) -> dict[str, dict]:
        """The cache file's entries (key text -> config fields and ms); {} when absent or unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("machine") == machine
                    and isinstance(data.get("configs"), dict)):
                raise ValueError(f"not a format-{FORMAT} tile cache of {machine!r}")
            for entry in data["configs"].values():
                _config_from_entry(entry)  # validates: one bad entry makes the file unreadable
            return data["configs"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as error:
            self._warn_once(str(path), f"ignoring the Triton tile cache {path} ({first_line(error)}); "
                                       f"its tiles are tuned again")
            return {}

    def _write(self, path: Path, machine: str, key: TileKey, config: LaunchConfig, ms: float) -> None:
        """Adds ``key`` to the cache file (re-read first: another process may have added keys meanwhile)."""
        entries = dict(self._read(path, machine))
        entries[key.text()] = {**asdict(config), "ms": ms}
        text = json.dumps({"format": FORMAT, "machine": machine, "configs": entries}, indent=1, sort_keys=True)
        try:
            replace_file(path, text)
        except OSError as error:
            self._warn_once(str(path.parent), f"cannot write the Triton tile cache {path} ({first_line(error)}); "
                                              f"tiles are tuned again in each process")

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, stacklevel=4)


def _config_from_entry(entry) -> LaunchConfig:
    """A cache entry's LaunchConfig; ValueError/TypeError/KeyError when it is not a valid one."""
    return LaunchConfig(**{name: entry[name] for name in ("block_b", "block_h", "block_k", "num_warps")})
