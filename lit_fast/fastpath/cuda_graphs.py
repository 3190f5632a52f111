"""One cache of CUDA graphs for the fast paths: the encoder's layers, the encoder's front and the decoding loop.

A CUDA graph replays a recorded sequence of kernels with one launch, where eager PyTorch pays host time for every
kernel (tens of microseconds each on the GPU machines) while the GPU waits. A graph is fixed to its shapes and to the
addresses it read, so each user keys its graphs by what they depend on; this cache owns the rest:

- a key is captured the `repeats`-th time it is asked for, so one-off shapes never pay for a capture;
- at most `max_graphs` graphs, whose static buffers take at most `max_bytes`, are kept (the oldest goes first);
- after `max_captures` captures the cache gives up and frees its graphs (too many keys for graphs to pay);
- the graphs of a cache share one memory pool (unless told not to), and each holds the tensors it reads so their
  memory stays valid;
- a capture warms up on a side stream first (lazy library initialisation and compilation stay out of the graph).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphLimits:
    """When a cache captures, how much it keeps, and when it gives up (None: no limit)."""

    repeats: int = 1
    max_graphs: Optional[int] = None
    max_bytes: Optional[int] = None
    max_captures: Optional[int] = None
    max_seen: int = 1024  # keys counted but not captured; past this a stream of one-off keys is forgotten
    # One memory pool for all graphs (their outputs must be consumed before another graph of the cache replays);
    # False: a pool of its own for each graph.
    shared_pool: bool = True


@dataclass
class Graph:
    """A captured graph, what its captured function returned (static buffers each replay rewrites), and what it
    holds."""

    graph: torch.cuda.CUDAGraph
    outputs: Any
    keep: tuple = ()  # tensors the graph reads besides its static buffers, held so their memory stays valid
    nbytes: int = 0  # the static buffers' size, counted against GraphLimits.max_bytes

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


class GraphCache:
    """Graphs by key, under `GraphLimits`; see the module docstring."""

    def __init__(self, limits: GraphLimits, name: str = "CUDA graphs") -> None:
        self.limits = limits
        self.name = name
        self.graphs: dict[Hashable, Graph] = {}  # oldest first
        self.seen: dict[Hashable, int] = {}
        self.captures = 0
        self.stopped = False
        self.pool = None

    def __deepcopy__(self, memo) -> "GraphCache":
        """A copied model gets the same limits and no graphs: they are tied to the original's tensors (and CUDA
        graphs cannot be copied)."""
        return GraphCache(self.limits, self.name)

    def get(self, key: Hashable) -> Optional[Graph]:
        return self.graphs.get(key)

    def due(self, key: Hashable) -> bool:
        """Count a sighting of `key`; whether to capture it now."""
        if self.stopped:
            return False
        if key not in self.seen and len(self.seen) >= self.limits.max_seen:
            self.seen.clear()
        self.seen[key] = count = self.seen.get(key, 0) + 1
        return count >= self.limits.repeats

    def capture(self, key: Hashable, run: Callable[[], Any], device: torch.device, *, warmups: int = 1,
                keep: tuple = (), nbytes: int = 0) -> Optional[Graph]:
        """Record `run()` as a graph for `key` after `warmups` runs on a side stream. `nbytes`: its static buffers'
        size. None when the cache has given up, or gives up now (max_captures); a capture this torch or driver
        cannot do raises."""
        limits = self.limits
        if self.stopped:
            return None
        if limits.max_captures is not None and self.captures >= limits.max_captures:
            self.stop(f"{self.captures} captures without settling on a few shapes")
            return None
        self.captures += 1
        stream = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(warmups):
                run()
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool if limits.shared_pool else None):
            outputs = run()
        if limits.shared_pool:
            self.pool = graph.pool()
        return self.admit(key, Graph(graph, outputs, keep, nbytes))

    def admit(self, key: Hashable, entry: Graph) -> Graph:
        """Keep `entry` for `key`, dropping the oldest graphs first while the limits would be exceeded (a graph
        larger than max_bytes alone is kept, alone)."""
        limits = self.limits
        while self.graphs and (
                (limits.max_graphs is not None and len(self.graphs) >= limits.max_graphs)
                or (limits.max_bytes is not None and entry.nbytes + self.nbytes > limits.max_bytes)):
            del self.graphs[next(iter(self.graphs))]
        self.graphs[key] = entry
        return entry

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.graphs.values())

    def drop(self, key: Hashable) -> None:
        self.graphs.pop(key, None)

    def stop(self, why: str) -> None:
        """Give up: no more captures, and the graphs' memory goes back."""
        log.info("fast path: %s are off from now on: %s", self.name, why)
        self.stopped = True
        self.graphs.clear()
        self.seen.clear()
        self.pool = None
