"""How the fused decoder + loss splits its work: tokens per chunk and vocabulary columns per forward GEMM.

The best split depends on the machine (cache sizes, matrix units, threads) and the dtype, so on CPU it is
measured, not guessed: the first call of a (tokens, H, V, dtype, threads) shape with at least
TUNE_MIN_ELEMENTS logits times each of a few ``candidates`` (one warm-up, then the median of TUNE_REPEATS
calls of the real computation on the real tensors) and keeps the fastest,
- in this process, and
- on disk, in ``<cache dir>/loss-chunks/<cpu model>, torch <version>.json`` (the cache dir of
  fastlm.data.cache.default_cache_dir()), replaced atomically; an unreadable file is ignored and rewritten;
  not when other processes used the CPU while the tuning ran (fastlm.device.OtherWork): a choice timed under
  load is kept for the process only.
Tuning runs once per machine and shape; it is skipped (the heuristic ``default_chunking`` runs) for small
shapes, under no_grad (evaluation), with FASTLM_LOSS_TUNE=0, and on CUDA, where one chunk holds as many tokens
as CUDA_CHUNK_BYTES of fp32 logits allow (all of them at the example's sizes) and the GEMMs run whole.
The split changes speed, and summation order only (docs/semantics.md, "The fused decoder and loss").
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fastlm.paths import replace_file
from fastlm.timing import active_timer

log = logging.getLogger(__name__)

# The heuristic, measured on the 2-core development CPU in fp32 (bench/README.md, "decoder chunking").
CPU_CHUNK_TOKENS = 192
CPU_VOCAB_BLOCK = 2048
CUDA_CHUNK_BYTES = 1 << 30  # on CUDA a chunk's fp32 logits may take up to 1 GiB
TUNE_MIN_ELEMENTS = 4_000_000  # smaller shapes take the heuristic: too quick for the choice to matter
TUNE_REPEATS = 3
TUNE_VARIABLE = "FASTLM_LOSS_TUNE"
FORMAT = 2  # 2: the native CPU kernels moved onto torch's OpenMP pool; splits timed before no longer hold


@dataclass(frozen=True)
class Chunking:
    tokens: int  # tokens per chunk
    vocab_block: Optional[int]  # columns per forward GEMM call; None: the whole vocabulary at once


def default_chunking(device: torch.device, num_tokens: int, vocab_size: int) -> Chunking:
    """The untuned split: the heuristic on CPU, the memory budget on CUDA."""
    if torch.device(device).type == "cuda":
        tokens = max(1, min(num_tokens, CUDA_CHUNK_BYTES // (4 * vocab_size)))
        return Chunking(tokens, None)
    return Chunking(min(num_tokens, CPU_CHUNK_TOKENS), CPU_VOCAB_BLOCK)


def candidates(num_tokens: int, dtype: torch.dtype) -> list[Chunking]:
    """Token chunks from 64 to all tokens; vocabulary blocks where they helped on some CPU (fp32: the output
    block stays in cache; bf16 GEMMs ran fastest whole on the machines measured, so fewer blocks)."""
    tokens = sorted({min(num_tokens, t) for t in (64, 128, 192, 256, 384, num_tokens)})
    blocks = (None, 2048, 8192) if dtype == torch.float32 else (None, 8192)
    return [Chunking(t, b) for t in tokens for b in blocks]


def tuning_enabled() -> bool:
    return os.environ.get(TUNE_VARIABLE, "").strip() != "0"


class ChunkTuner:
    """Chooses and remembers the split per shape and machine (see the module doc)."""

    def __init__(self, cache_dir: Optional[Path] = None):
        self.cache_dir = cache_dir
        self._chosen: dict[str, Chunking] = {}

    def choose(self, device: torch.device, num_tokens: int, width: int, vocab: int, dtype: torch.dtype,
               measure: Callable[[Chunking], object]) -> Chunking:
        device = torch.device(device)
        if (device.type != "cpu" or not tuning_enabled() or num_tokens * vocab < TUNE_MIN_ELEMENTS
                or not torch.is_grad_enabled()):  # evaluation: the forward alone, not what is timed
            return default_chunking(device, num_tokens, vocab)
        key = f"N={num_tokens} H={width} V={vocab} {str(dtype).removeprefix('torch.')} threads={torch.get_num_threads()}"
        if key in self._chosen:
            return self._chosen[key]
        path = self.cache_file()
        entries = _read(path)
        if key in entries:
            chosen = Chunking(**entries[key]["chunking"])
        else:
            from fastlm.device import OtherWork

            other_work = OtherWork()
            chosen, ms = self._tune(num_tokens, dtype, measure)
            log.info("loss chunks: %s -> %s (%.1f ms)", key, chosen, ms)
            busy = other_work.busy()
            if busy:  # a choice timed under load is kept for this process only, never remembered
                log.warning("loss chunks: %s; this choice is not saved, the next process tunes again", busy)
            else:
                self._remember(path, key, chosen, ms)
        self._chosen[key] = chosen
        return chosen

    @staticmethod
    def _remember(path: Path, key: str, chosen: Chunking, ms: float) -> None:
        entries = {**_read(path, warn=False), key: {"chunking": asdict(chosen), "ms": ms}}
        try:
            replace_file(path, json.dumps({"format": FORMAT, "machine": machine(), "entries": entries},
                                           indent=1, sort_keys=True))
        except OSError as error:
            log.warning("loss chunks: cannot write %s (%s); tuned again in each process", path, error)

    def cache_file(self) -> Path:
        from fastlm.data.cache import default_cache_dir  # here: importing fastlm.data loads the corpus modules

        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", machine()).strip("-") or "unknown"
        return Path(self.cache_dir or default_cache_dir()) / "loss-chunks" / f"{slug}.json"

    @staticmethod
    def _tune(num_tokens: int, dtype: torch.dtype, measure) -> tuple[Chunking, float]:
        timed = []
        with active_timer(None):  # the tuning's calls are not the step's phases
            for chunking in candidates(num_tokens, dtype):
                measure(chunking)
                times = []
                for _ in range(TUNE_REPEATS):
                    start = time.perf_counter()
                    measure(chunking)
                    times.append(time.perf_counter() - start)
                timed.append((statistics.median(times) * 1e3, chunking))
        ms, chosen = min(timed, key=lambda pair: pair[0])
        return chosen, ms


def machine() -> str:
    from fastlm.device import cpu_model

    return f"{cpu_model()}, torch {torch.__version__}"


def _read(path: Path, warn: bool = True) -> dict:
    """The file's entries, {} when it is missing or unreadable (``warn``: say so; the read just before a write,
    which merges what other processes wrote meanwhile, does not repeat the warning of the first)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("machine") == machine()):
            raise ValueError("another format or machine")
        entries = data["entries"]
        for entry in entries.values():
            Chunking(**entry["chunking"])  # one bad entry makes the file unreadable
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        if warn:
            log.warning("loss chunks: ignoring %s (%s); it is rewritten after the next tuning", path, error)
        return {}


TUNER = ChunkTuner()


def choose_chunking(device: torch.device, num_tokens: int, width: int, vocab: int, dtype: torch.dtype,
                    measure: Callable[[Chunking], object]) -> Chunking:
    """The split for this shape on this machine (``measure(chunking)`` runs the computation once)."""
    return TUNER.choose(device, num_tokens, width, vocab, dtype, measure)
