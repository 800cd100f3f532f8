"""The grid-wide barrier of the persistent kernels, and the launch-time checks that make it safe.

Programs of a persistent kernel each own some hidden units and exchange h (forward) or dL/dpre (backward)
through global memory, so step t+1 may start only when every program has written step t: ``step_barrier``.
Protocol (``grid_sync``): ``p_sync`` points at SYNC_WORDS int32 words, zeroed by the host before each launch
(``barrier_buffer``): word 0 counts arrivals and only grows, word 1 is set when a wait timed out. Barrier e
(0-based: the one after the kernel's (e+1)-th step) is complete when word 0 reaches (e + 1) * P, P programs.
A program arrives with an acq_rel atomic add after a CTA barrier, then waits with acquire polls and a CTA
barrier; rows other programs wrote are loaded with cache_modifier=".cg", and launches use num_stages=1.
All P programs must be resident at once: fastlm.kernels.launch checks P <= the SM count (``grid_reason``) and
one program's resources (``resources_reason``, ``device_limits``), else runs the per-step kernels, and launches
cooperatively where Triton can (``launch_options``). A wait gives up after BARRIER_POLLS polls and sets word 1,
which ``check_barrier``, enqueued after the launch, turns into a device-side assert. The interpreter runs
programs one after another, so there the kernels run one program (SINGLE_PROGRAM: no atomics).
Memory ordering, co-residency, timeout: docs/semantics.md, "The Triton kernels: ...", "The grid barrier".
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
    most ``patience`` times; the protocol is in the module docstring, its memory ordering in docs/semantics.md
    ("The grid barrier").
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
                                      "all resident at once (see docs/semantics.md, 'The grid barrier')")


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
