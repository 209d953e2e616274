"""A segment's matching step as a CUDA graph: captured once, replayed every inner step.

A step has static shapes within a segment and, after its first call, neither reads the device
from the host nor copies host tensors to it (tests/test_sync.py), so on a GPU the whole step
(draws from the device generator, every kernel of the forward, double backward and image
update) can be captured once and replayed, removing the launch cost of its many small kernels.
The step must read and write only tensors that live as long as the graph (the matcher keeps the
images, momentum, loss sum and matching network of a segment in place). On the CPU the same
path runs without the capture.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch


class GraphedStep:
    """Calls ``fn()`` (one step on static tensors, no arguments, no result) every time it is
    called: on the CPU directly; on a GPU the first call runs eagerly on a side stream (warm-up:
    caches, workspaces, compiled code), the second captures ``fn`` as a CUDA graph, with the
    ``generators`` registered so every replay draws afresh, and replays it; later calls replay.

    A capture that fails (or ``blocker``, a reason known before, such as the extension's
    ``accumulate_class_grads``, which uploads host rows per call) is said once, through ``log``
    (a metrics record) and one line on stderr, and the step stays eager. ``capture`` replaces the
    CUDA capture in tests: ``capture(fn)`` returns the replay callable (or raises).
    """

    def __init__(self, fn: Callable[[], None], device: torch.device,
                 generators: tuple[torch.Generator, ...] = (),
                 log: Callable[[dict], None] = lambda record: None, blocker: str | None = None,
                 capture: Callable[[Callable[[], None]], Callable[[], None]] | None = None):
        self.fn, self.generators, self.log = fn, generators, log
        self._cuda = capture is None
        self._capture = capture or self._cuda_capture
        on_gpu = torch.device(device).type == "cuda" or capture is not None
        self.state = "eager" if not on_gpu else "warm-up"
        self.replay: Callable[[], None] | None = None
        if on_gpu and blocker:
            self._fall_back(blocker)

    def __call__(self) -> None:
        if self.state == "eager":
            self.fn()
        elif self.state == "warm-up":
            self._warm_up()
            self.state = "capture"
        elif self.state == "capture":
            try:
                self.replay = self._capture(self.fn)
            except Exception as e:  # noqa: BLE001 - any failure: eager, said once
                self._fall_back(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                if str(e) else type(e).__name__)
                self.fn()  # the capture did no work: this step runs eagerly
                return
            self.state = "replay"
            self.log({"event": "cuda_graph", "captured": True})
            self.replay()  # the capture did no work: its first replay is this step
        else:
            self.replay()

    def _fall_back(self, reason: str) -> None:
        self.state = "eager"
        self.log({"event": "cuda_graph", "captured": False, "reason": reason})
        print(f"dasm: the matching step runs eagerly, not as a CUDA graph: {reason}",
              file=sys.stderr)

    def _warm_up(self) -> None:
        if not self._cuda:
            self.fn()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.fn()
        torch.cuda.current_stream().wait_stream(side)

    def _cuda_capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            graph.register_generator_state(g)
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
