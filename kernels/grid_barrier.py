"""The grid-wide barrier of the persistent kernels, and the launch-time check that makes it safe.

A persistent kernel walks all T steps of a layer in one launch; its programs each own some hidden units and
exchange h (forward) or dL/dpre (backward) through global memory between steps, so step t+1 may start only
when every program has written step t. ``step_barrier`` is that separation.

Protocol (``grid_sync``). ``p_sync`` points at SYNC_WORDS int32 words, zeroed by the host before each
launch (``barrier_buffer``): word 0 counts arrivals, word 1 is set when a wait timed out. Barrier number e
(0-based: the one after the kernel's (e+1)-th step) is complete when word 0 reaches (e + 1) * P, P the
number of programs. The counter only grows, so no reset or sense reversal is needed between barriers: a
program that passed barrier e and arrives early at e+1 only raises the count beyond what the others of
barrier e wait for (>= (e + 1) * P). Buffers are whole-sequence (every step writes its own rows, and the
only in-place state, dc or dhz, belongs to one program), so the barrier only has to order writes of step t
before reads of step t+1; there is no write-after-read hazard to guard.

Memory ordering (PTX memory model; the scheme of CUDA's cooperative-groups grid sync):
  1. tl.debug_barrier() (bar.sync): every thread of the program has issued its stores of the step; they
     precede, in causality order, what the program's one atomic-issuing thread does next.
  2. arrive: atomic_add(word 0, 1, sem="acq_rel", scope="gpu"). Release: cumulative, it publishes the
     program's stores of the step to the whole GPU before its increment. Acquire: the last program to arrive
     does not poll, so its arrival must be what synchronizes it with the others.
  3. wait: poll with atomic_add(word 0, 0, sem="acquire", scope="gpu") (an atomic read: Triton 3.6 has
     no tl.atomic_load) until the count reaches the target. Every arrival is a read-modify-write, so the
     count's modification order is one release sequence per arrival and a read of the final count
     synchronizes with all of them.
  4. tl.debug_barrier() again: no thread of the program loads step t's data before the acquire.
Triton executes an atomic on a scalar pointer once per program (one thread, result broadcast through
shared memory), which is what makes the count a count of programs. Loads of data written by other
programs in the same launch use cache_modifier=".cg" (L2, not the SM's own L1, which is not coherent
across SMs): the acquire already orders them, so this is insurance, and it costs nothing, since data
another SM wrote is never usefully in this SM's L1. Atomics are side effects neither Triton nor LLVM moves
loads or stores across; the kernels are launched with num_stages=1 so that no software pipelining
prefetches the next step's operands above a barrier. (Compiled for sm_90 with Triton 3.6 and 3.9, the PTX
has bar.sync; one thread's atom.global.gpu.acq_rel.add; a poll loop of ld.global.gpu.acquire, which is
what Triton makes of an acquire atomic_add of 0; bar.sync; then ld.global.cg for the exchanged rows.)

Co-residency. A program spinning in the barrier occupies its SM until the others arrive, so the barrier is
only valid when all P programs are resident at once; a program that never got an SM would hang the launch.
The kernels run at most one program per SM, and the caller (fastlm.kernels.launch) checks at launch that
P <= the SM count (torch.cuda.get_device_properties(...).multi_processor_count; ``grid_reason``) and that
one program's registers and shared memory, read from the compiled kernel, fit an SM (``resources_reason``;
the limits from ``device_limits``); otherwise it falls back to the per-step kernels and records why. The
launch itself is cooperative where Triton offers it (``launch_options``), so that should the check ever be
wrong, the driver refuses the launch instead of starting programs that wait for others. The same checks run
in CI on kernels compiled ahead of time for a 132-SM sm_90 and a 108-SM sm_80 part (tests/test_triton_aot.py).
Kernels on other streams (NCCL's in data-parallel training) can delay our programs' start, never prevent
it, unless they themselves wait on this launch.

Timeout. A wait gives up after BARRIER_POLLS polls (2^24, each an L2 round trip and two CTA barriers: a few
seconds, within the GPU check's smoke part). A cooperative launch starts every program at once, so a sound
wait lasts about one step of the slowest program, microseconds; the bound is for a broken one, whose error
must come before a time limit kills the process and the message with it. A wait that gives up sets word 1,
and the program runs on without waiting at its later barriers (its results are void already; waiting again
would only multiply the delay by T). ``check_barrier``, enqueued after the launch, turns a set word 1 into a device-side assert
(asynchronous: no host sync), so a broken co-residency assumption ends as a CUDA error instead of a hung
process or silently wrong numbers.

Under TRITON_INTERPRET=1 programs run one after another, so a grid of more than one program would wait
forever in its first barrier: the interpreter runs the persistent kernels in single-program mode only
(SINGLE_PROGRAM: one program owns every hidden unit, and a step ends with a CTA barrier, no atomics). A
grid of one program with SINGLE_PROGRAM off runs the barrier code itself (it passes at once).
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from fastlm.kernels.common import INTERPRETED

SYNC_WORDS = 2  # [arrivals, timed out]
BARRIER_POLLS = tl.constexpr(1 << 24)


@triton.jit
def grid_sync(p_sync, barrier, patience):
    """Waits until every program of the grid has arrived at barrier number ``barrier`` (0-based), polling at
    most ``patience`` times; see the module docstring for the protocol and its memory ordering.
    p_sync: [SYNC_WORDS] int32. Returns the patience of the program's next wait: ``patience`` when this
    one completed; else 0, after setting the timeout word (the launch's results are void then, and waiting
    again would only delay the error ``check_barrier`` raises)."""
    tl.debug_barrier()
    target = (barrier + 1) * tl.num_programs(0)
    count = tl.atomic_add(p_sync, 1, sem="acq_rel", scope="gpu") + 1
    polls = 0
    while (count < target) & (polls < patience):
        count = tl.atomic_add(p_sync, 0, sem="acquire", scope="gpu")
        polls += 1
    if count < target:
        tl.atomic_xchg(p_sync + 1, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return tl.where(count >= target, patience, 0)


@triton.jit
def step_barrier(p_sync, step, steps, patience, SINGLE_PROGRAM: tl.constexpr):
    """What separates the kernel's step number ``step`` (0-based, in the order it walks them; ``steps`` in
    all) from the next: nothing after the last; in single-program mode a CTA barrier (the program's threads
    read each other's h next step); else the grid barrier, waiting at most ``patience`` polls. Returns the
    patience of the next barrier (see grid_sync): the kernels start with ``first_patience()`` and carry it
    through their time loop."""
    if step < steps - 1:
        if SINGLE_PROGRAM:
            tl.debug_barrier()
        else:
            patience = grid_sync(p_sync, step, patience)
    return patience


@triton.jit
def first_patience():
    """How many polls the first barrier of a launch may wait: BARRIER_POLLS, as an int32 scalar (a value the
    time loop carries and grid_sync may lower to 0)."""
    return tl.full([], BARRIER_POLLS, tl.int32)


@functools.cache
def cooperative_launch_accepted() -> bool:
    """Whether this Triton's CUDA launcher takes ``launch_cooperative_grid`` (a CUDA compile option in Triton
    3.6 and 3.9, read from its option fields rather than assumed from the version)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__


def launch_options(config) -> dict:
    """The keyword arguments a persistent kernel is launched (and compiled, for the co-residency check) with,
    for ``config`` (a PersistentConfig): its modes and tiles (``config.meta()``) and, with a grid barrier,
    ``launch_cooperative_grid=True`` where Triton takes it. A cooperative launch (cuLaunchKernelEx with the
    cooperative attribute) makes the driver refuse a grid whose programs cannot all be resident at once,
    an error at launch instead of programs waiting for others that never start."""
    meta = config.meta()
    if not config.single_program and cooperative_launch_accepted():
        meta["launch_cooperative_grid"] = True
    return meta


def barrier_buffer(device) -> torch.Tensor:
    """A zeroed barrier state for one launch: [SYNC_WORDS] int32."""
    return torch.zeros(SYNC_WORDS, dtype=torch.int32, device=device)


def barrier_state(like: torch.Tensor, config, steps: int):
    """(sync, check) for a launch of ``config`` (a PersistentConfig) over ``steps`` steps: with a grid
    barrier, a zeroed ``barrier_buffer`` and True (call ``check_barrier(sync)`` after the launch); in
    single-program mode ``like`` (it only fills the argument slot) and False. Raises ValueError when the
    launch's arrival count, programs * (steps - 1), would overflow the int32 counter, or when the launch
    would wait in a grid barrier under the interpreter (it would never return)."""
    if config.single_program:
        return like, False
    if config.programs * steps >= 2**31:
        raise ValueError(f"a persistent launch of {config.programs} programs over {steps} steps counts more "
                         f"barrier arrivals than an int32 holds")
    if INTERPRETED and config.programs > 1 and steps > 1:
        raise ValueError(f"a grid of {config.programs} programs cannot pass a grid barrier under the Triton "
                         f"interpreter, which runs programs one after another: use one program")
    return barrier_buffer(like.device), True


def check_barrier(sync: torch.Tensor) -> None:
    """Enqueues a device-side assert that no barrier wait of the launch timed out (no host sync on CUDA)."""
    torch._assert_async(sync[1] == 0, "persistent Triton kernel: a grid barrier timed out; its programs were not "
                                      "all resident at once (see fastlm/kernels/grid_barrier.py)")


@functools.cache
def device_limits(device_index: int) -> dict:
    """What bounds co-residency on the CUDA device: "sms" (torch's multi_processor_count: how many programs
    the persistent kernels may run at once, one per SM), and per SM (Triton's driver properties, which its
    occupancy tutorial uses) "max_num_regs" and "max_shared_mem" (bytes, the opt-in maximum)."""
    properties = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return {"sms": torch.cuda.get_device_properties(device_index).multi_processor_count,
            "max_num_regs": properties["max_num_regs"], "max_shared_mem": properties["max_shared_mem"]}


def kernel_resources(compiled) -> dict:
    """What one program of a compiled Triton kernel (from ``warmup``) needs: registers per thread, spilled
    registers, shared memory bytes and warps. Loading the module (``_init_handles``, as Triton's fused-softmax
    tutorial does) fills the register counts, and raises OutOfResources when the shared memory cannot fit."""
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
    return {"registers": int(getattr(compiled, "n_regs", 0) or 0), "spills": int(getattr(compiled, "n_spills", 0) or 0),
            "shared_bytes": int(compiled.metadata.shared), "num_warps": int(compiled.metadata.num_warps)}


def grid_reason(programs: int, limits: dict) -> Optional[str]:
    """None when a grid of ``programs`` programs, one per SM, fits the device (``device_limits``); else why
    not."""
    if programs > limits["sms"]:
        return f"its grid of {programs} programs (one per SM) exceeds the {limits['sms']} SMs of this GPU"
    return None


def resources_reason(resources: dict, limits: dict) -> Optional[str]:
    """None when one program with these ``resources`` (``kernel_resources``) fits an SM of the device
    (``device_limits``); else why not. With at most one program per SM (``grid_reason``), that makes every
    program of the grid resident at once."""
    registers = resources["registers"] * 32 * resources["num_warps"]
    if registers > limits["max_num_regs"]:
        return (f"one program needs {registers} registers ({resources['registers']} per thread x "
                f"{resources['num_warps']} warps), more than the {limits['max_num_regs']} of an SM")
    if resources["shared_bytes"] > limits["max_shared_mem"]:
        return (f"one program needs {resources['shared_bytes']} bytes of shared memory, more than the "
                f"{limits['max_shared_mem']} of an SM")
    return None


def coresidency_reason(programs: int, resources: dict, limits: dict) -> Optional[str]:
    """None when a grid of ``programs`` programs of kernels that need ``resources`` ({kernel name:
    ``kernel_resources``}) is resident all at once on a device with ``limits`` (``device_limits``): one program
    per SM (``grid_reason``) and each program fits an SM (``resources_reason``); else why not."""
    reason = grid_reason(programs, limits)
    if reason is not None:
        return reason
    for name, needs in resources.items():
        reason = resources_reason(needs, limits)
        if reason is not None:
            return f"{name}: {reason}"
    return None
