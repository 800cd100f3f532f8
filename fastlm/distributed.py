"""Data-parallel training on torch.distributed: one process per device, launched by torchrun.

The example's batch columns are independent streams (batchify lays the corpus out as B contiguous slices),
so rank r of W takes the contiguous share of columns [r*B/W, (r+1)*B/W) of every split: the global batch is
the one asked for, and each rank's mean loss is over an equal share of the tokens, so the gradients
DistributedDataParallel averages are the one-process gradients (to float noise; with dropout 0: each rank
draws its own dropout masks, so with dropout the runs differ as two seeds do). Clipping and the update then
see the same averaged gradients on every rank, and the replicas stay identical. In bf16 the gradients are
averaged in bf16 (DDP's buckets take the parameters' dtype) before they are widened for the fp32 masters.

What happens once, not once per rank: metrics, progress, checkpoints and the run folder belong to rank 0;
validation and test add up every rank's share of the split (exact over the whole split); the loss a step
reports is averaged over the ranks (so it is the one-process loss, and every rank agrees on whether a step
was finite). Decisions that depend on the clock or on a signal (--max-minutes, Ctrl-C) are agreed by all
ranks at log intervals, so no rank leaves a collective the others are in.

Failure: a collective that cannot complete (a rank died, or hung past ``--dist-timeout``) raises in the
others; ``collective_errors`` turns that into one clear line, and torchrun ends the remaining processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fastlm.errors import FastlmError, first_line, short


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def columns(self, batch_size: int, flag: str = "--batch-size") -> slice:
        """This rank's contiguous share of ``batch_size`` columns."""
        if batch_size % self.size:
            raise FastlmError(f"{flag} {batch_size} does not divide among {self.size} processes; give a multiple "
                              f"of {self.size} (each process takes an equal share of the batch's columns)")
        share = batch_size // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


SINGLE = World(0, 1, 0)  # one process: no torch.distributed at all


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device_choice: str, timeout_s: float) -> tuple[World, str]:
    """Joins the process group torchrun set up (NCCL on GPUs, gloo on CPU); returns this rank's World and the
    device it should use ("cuda:<local rank>" when the choice is auto or cuda, else the choice)."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    on_cuda = device_choice.startswith("cuda") or (device_choice == "auto" and torch.cuda.is_available())
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise FastlmError(f"process {rank} has local rank {local_rank} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s): start at most that many per machine")
        device_choice = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, local_rank), device_choice


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# gloo's words for a peer that is gone or late (not every torch version raises a DistError subclass for them).
_LOST_PEER = ("connection reset by peer", "connection closed by peer", "timed out waiting", "broken pipe")


@contextlib.contextmanager
def collective_errors(world: World):
    """A collective that failed because another rank died or hung ends the run with one clear line; other
    errors go on as they are. (With NCCL a lost peer does not raise here: NCCL's watchdog ends the process
    after the timeout, with its own report.)"""
    try:
        yield
    except RuntimeError as error:
        lost = isinstance(error, dist.DistError) or any(word in str(error).lower() for word in _LOST_PEER)
        if world.size == 1 or isinstance(error, FastlmError) or not lost:
            raise
        raise FastlmError(f"process {world.rank} of {world.size} lost the others ({short(first_line(error))}): a "
                          f"process died or hung past --dist-timeout; the run stopped, and its last checkpoint "
                          f"(rank 0's run folder) can be resumed") from None


def sum_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """In place: the sum of ``tensor`` over the ranks."""
    if world.size > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_columns(tensor: torch.Tensor, world: World, dim: int = 1) -> torch.Tensor:
    """Every rank's share of columns (along ``dim``), put back together in rank order: the whole batch."""
    if world.size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def gather_objects(value, world: World) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if world.size == 1:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value, world: World):
    """Rank 0's ``value`` on every rank (others pass anything, e.g. None)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_parameters(module: torch.nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers into every rank's ``module`` (e.g. after rank 0 loaded a checkpoint)."""
    if world.size == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor, src=0)


def on_rank_zero(work, world: World):
    """``work()`` run by rank 0 alone, its result on every rank: for what must happen once (creating the run
    folder, writing a checkpoint) and what every rank must agree on (its name). When it fails, every rank
    stops with its message at once (rank 0 with the error itself), instead of the others waiting for rank 0
    in their next collective until the timeout."""
    if world.size == 1:
        return work()
    outcome = None
    if world.main:
        try:
            outcome = ("ok", work())
        except Exception as error:
            message = str(error) if isinstance(error, FastlmError) else f"process 0 failed: {first_line(error)}"
            broadcast_object(("error", message), world)
            raise
    kind, value = broadcast_object(outcome, world)
    if kind == "error":
        raise FastlmError(value)
    return value


def first_on_each_machine(work, world: World):
    """``work()`` by each machine's first process (local rank 0), then by the others: for filling a cache that
    the others then read (tokenising a corpus once per machine, not once per process). A FastlmError of any
    first process stops every rank with its message."""
    if world.size == 1:
        return work()
    result, error = None, None
    if world.local_rank == 0:
        try:
            result = work()
        except FastlmError as failure:
            error = str(failure)
    errors = [e for e in gather_objects(error, world) if e is not None]
    if errors:
        raise FastlmError(errors[0])
    return result if world.local_rank == 0 else work()


def torchrun_command(nproc: int, argv: list[str], python: Optional[str] = None) -> list[str]:
    """``fastlm <argv>`` in ``nproc`` processes on this machine, through torchrun (as python -m, so that the
    same interpreter and environment run every rank; fastlm.launch: without torchrun's own report of a
    failure, after the processes' one-line errors)."""
    import sys

    return [python or sys.executable, "-m", "fastlm.launch", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "fastlm", *argv]
