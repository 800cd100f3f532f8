"""The fast step captured once as a CUDA graph and replayed: one launch instead of hundreds per step.

At the example's sizes a step is hundreds of small kernels, and launching them one by one from the host can
cost more than the GPU's work itself. A CUDA graph records every kernel of a step (forward, backward, clip,
update) once and replays them with one call.

How it keeps the step's meaning:
- The first ``WARMUP_STEPS`` steps of a shape run eagerly, on a side stream (libraries set up their
  per-stream state there, as CUDA graph capture requires); they are real steps on real data.
- The next step of that shape is captured (which runs nothing), then replayed on that step's data.
  Inputs, targets and the hidden state live in static buffers the graph reads; each call copies its
  tensors in, and the graph ends by writing the new hidden state back into the state buffer, which is
  also what the call returns, so a trainer that passes the returned state back costs no copy.
- Any other shape (the short last chunk of an epoch) runs eagerly. The learning rate is baked into the
  captured update, so a changed lr (the schedule divides it by 4) drops the graph and captures again.
- The captured step is the eager step's own code (forward, backward, clip, update, gradients dropped), so
  gradients live and die inside the graph's memory pool and eager steps start with ``.grad`` None.
- The timer's phases cannot be marked inside a replay: a replayed step reports the whole step only.

If capture fails (an operation that cannot be captured), the step says so once and stays eager, on the
stream it was on before (torch leaves the capture stream current when ending a capture raises).
``captures``, ``replays`` and ``failure`` say what happened, for bench rows and profiles.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

from fastlm.errors import first_line
from fastlm.model import map_state
from fastlm.timing import PhaseTimer, active_timer

WARMUP_STEPS = 3
_UNTIMED = PhaseTimer("cpu", enabled=False)


@contextlib.contextmanager
def on_current_stream_afterwards():
    """Whatever happens inside, the stream current on entry is current again on exit.

    torch.cuda.graph makes its capture stream current and restores the previous one after ending the
    capture; when ending it raises (an operation that cannot be captured), the restore is skipped and the
    process would go on issuing all its work to the capture stream.
    """
    stream = torch.cuda.current_stream()
    try:
        yield
    finally:
        if torch.cuda.current_stream() != stream:
            torch.cuda.set_stream(stream)


class GraphedStep:
    def __init__(self, step):
        # The TrainStep on a CUDA device that owns this graph. Held weakly: a step and its graph that held each
        # other would keep the graph's memory pool alive after the step is dropped, until the cycle collector
        # happened to run (bench's peak-memory figures, empty_cache between cases).
        self.step = weakref.proxy(step)
        self.graph = None
        self.disabled = False
        self._shape = None  # (inputs shape, targets shape) of the warm-up run or the captured graph
        self._warm_steps = 0
        self._captured_lr = None
        self._static = None  # the captured graph's inputs, targets, state and loss tensors
        self._side_stream = None
        self.captures = 0  # graphs captured (one per shape and lr)
        self.replays = 0  # steps run as a replay
        self.failure: str | None = None  # why capture failed, once it has

    def __call__(self, inputs, targets, state, timer: PhaseTimer):
        action = self.next_action((tuple(inputs.shape), tuple(targets.shape)), self.step.lr)
        if action == "replay":
            return self._replay(inputs, targets, state)
        if action == "warm up":
            return self._warm_up(inputs, targets, state, timer)
        if action == "capture" and self._capture(inputs, targets, state):
            return self._replay(inputs, targets, None)
        return self.step.eager(inputs, targets, state, timer)

    def next_action(self, shape, lr) -> str:
        """What to do with a step of this shape at this lr: "eager", "warm up", "capture" or "replay"."""
        if self.graph is not None and self._captured_lr != lr:
            self._drop_graph()
        if self.disabled or (self.graph is not None and shape != self._shape):
            return "eager"
        if self.graph is not None:
            return "replay"
        if shape != self._shape:
            self._shape, self._warm_steps = shape, 0
        if self._warm_steps < WARMUP_STEPS:
            self._warm_steps += 1
            return "warm up"
        return "capture"

    def _warm_up(self, inputs, targets, state, timer):
        """An eager step on a side stream, as CUDA graph capture asks of the steps before it."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss, state = self.step.eager(inputs, targets, state, timer)
        torch.cuda.current_stream().wait_stream(side)
        return loss, state

    def _capture_graph(self, body):
        """(replay, outputs of body): body captured as a CUDA graph; each replay rewrites those outputs."""
        graph = torch.cuda.CUDAGraph()
        with on_current_stream_afterwards():
            with torch.cuda.graph(graph):
                outputs = body()
        return graph.replay, outputs

    def _capture(self, inputs, targets, state) -> bool:
        static_state = (map_state(lambda s: s.detach().clone(), state) if state is not None
                        else self.step.model.init_state(inputs.shape[1]))
        static_inputs, static_targets = inputs.clone(), targets.clone()
        for p in self.step.params:
            p.grad = None
        try:
            with active_timer(None):
                replay, (loss, _) = self._capture_graph(lambda: self._body(static_inputs, static_targets,
                                                                           static_state))
        except RuntimeError as error:
            for p in self.step.params:
                p.grad = None
            self.disabled = True
            self.failure = first_line(error)
            warnings.warn(f"CUDA graph capture of the training step failed ({self.failure}); training goes on "
                          f"eagerly. Pass --no-cuda-graphs to skip the attempt.", stacklevel=3)
            return False
        self.captures += 1
        self.graph, self._captured_lr = replay, self.step.lr
        self._static = {"inputs": static_inputs, "targets": static_targets, "state": static_state, "loss": loss,
                        "finite": self.step.finite}
        return True

    def _body(self, inputs, targets, state):
        """The step as captured: the eager step, untimed, then its new state written into ``state``."""
        loss, new_state = self.step.eager(inputs, targets, state, _UNTIMED)
        with torch.no_grad():
            map_state(torch.Tensor.copy_, state, new_state)
        return loss, new_state

    def _replay(self, inputs, targets, state):
        static = self._static
        static["inputs"].copy_(inputs)
        static["targets"].copy_(targets)
        if state is not None and state is not static["state"]:
            map_state(torch.Tensor.copy_, static["state"], state)
        self.graph()
        self.replays += 1
        self.step.finite = static["finite"].clone()
        return static["loss"].clone(), static["state"]

    def _drop_graph(self) -> None:
        self.graph, self._static, self._captured_lr = None, None, None
        self._warm_steps = WARMUP_STEPS  # already warm: the next full-size step captures again

