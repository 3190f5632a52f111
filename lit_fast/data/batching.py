"""Batches: rows grouped by length under a token budget, dealt out to ranks, tokenized in loader workers.

Batches are made here, not by Lightning's samplers: each rank takes every world_size-th batch of one shared, seeded
list of batches, so no row is duplicated or dropped in predict (an unpadded split, like Lightning's
`UnrepeatedDistributedSampler`), and in training every rank sees the same number of batches. Loader workers receive
the examples (or the input texts) and the task's codec (tasks/codecs.py): never the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_fast.errors import ConfigError


def make_batches(
    lengths: list[int],
    batch_size: int,
    max_tokens: int | None = None,
    *,
    shuffle: bool = False,
    seed: int = 0,
    bucket_batches: int = 50,
) -> list[list[int]]:
    """Group positions into batches of similar length.

    Predict (shuffle=False): longest first, so the largest batch runs first (an out-of-memory error shows at once)
    and padding is minimal. Training (shuffle=True): shuffle, then sort inside buckets of `bucket_batches` batches
    and shuffle the batch order: little padding, still random. `max_tokens` caps padded tokens per batch
    (rows x longest row); a single row longer than the budget gets a batch of its own.
    """
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
        bucket = batch_size * bucket_batches
        chunks = [sorted(order[i:i + bucket], key=lambda j: -lengths[j]) for i in range(0, len(order), bucket)]
    else:
        chunks = [sorted(order, key=lambda j: (-lengths[j], j))]
    batches: list[list[int]] = []
    for chunk in chunks:
        current: list[int] = []
        longest = 0
        for j in chunk:
            grown = max(longest, lengths[j])
            full = len(current) >= batch_size or (max_tokens is not None and current and grown * (len(current) + 1) > max_tokens)
            if full:
                batches.append(current)
                current, grown = [], lengths[j]
            current.append(j)
            longest = grown
        if current:
            batches.append(current)
    if shuffle:
        rng.shuffle(batches)
    return batches


def loader_workers(local_ranks: int = 1) -> int:
    """Tokenizing loader workers for `num_workers: auto`: this process's cores shared by the ranks on this machine,
    less one core per rank for the rank itself (at most 16). Tokenization is the host's bottleneck in predict (W8):
    MiniLM on an H100 embeds rows faster than one core tokenizes them."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(16, cores // max(1, local_ranks) - 1))


# Predict batches are planned from characters, before tokenizing; English word pieces average about 4 characters,
# so a budget of N tokens plans about 4N characters. Texts that tokenize denser are split after tokenization.
CHARS_PER_TOKEN = 4


# `max_tokens: auto` for predict, by device: 64k-token batches keep a GPU busy; on a CPU, batches of 4k tokens ran
# MiniLM 1.2x faster than 64k ones (their activations stay in cache; docs/MEASUREMENTS.md, W8).
AUTO_PREDICT_MAX_TOKENS_CPU = 4096
AUTO_PREDICT_MAX_TOKENS_GPU = 65536


def predict_max_tokens(max_tokens: Any, device_type: str) -> Optional[int]:
    """Predict's token budget: `max_tokens` itself, or for "auto" the budget measured best on `device_type`."""
    if max_tokens != "auto":
        return max_tokens
    return AUTO_PREDICT_MAX_TOKENS_CPU if device_type == "cpu" else AUTO_PREDICT_MAX_TOKENS_GPU


def predict_plan(chars, batch_size: int, max_tokens: Optional[int]) -> list[np.ndarray]:
    """Predict batches from the texts' character lengths: longest first, at most `batch_size` rows, and about
    `max_tokens` padded tokens, so rows per batch follow the texts' lengths (PredictBatches enforces the budget
    exactly once the texts are tokenized)."""
    lengths = [int(c) for c in chars]
    budget = max_tokens * CHARS_PER_TOKEN if max_tokens else None
    return [np.asarray(b, dtype=np.int64) for b in make_batches(lengths, batch_size, budget)]


@dataclass(frozen=True)
class EpochPlan:
    """A rank's training (or evaluation) batches for an epoch: rows dealt out to ranks first, then length-bucketed
    per rank. In training every rank runs the same number of steps (the few batches over the smallest rank's count
    are left out of that epoch; a new shuffle each epoch leaves out others)."""

    lengths: tuple[int, ...]
    batch_size: int
    max_tokens: Optional[int]
    seed: int
    rank: int
    world: int
    shuffle: bool

    def _rank_batches(self, epoch: int, rank: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        mine = order[rank::self.world]
        made = make_batches([self.lengths[j] for j in mine], self.batch_size, self.max_tokens, shuffle=self.shuffle,
                            seed=self.seed + epoch)
        return [[mine[k] for k in batch] for batch in made]

    def __call__(self, epoch: int) -> list[list[int]]:
        mine = self._rank_batches(epoch if self.shuffle else 0, self.rank)
        if self.shuffle and self.world > 1:
            mine = mine[: min(len(self._rank_batches(epoch, r)) for r in range(self.world))]
        return mine


class Batches(IterableDataset):
    """Yields this rank's collated batches of one epoch (and, with loader workers, this worker's share of them).
    What workers receive: the examples, the batch list and the codec's collate; never the model."""

    def __init__(self, examples: list[dict], batches: list[list[int]], collate: Callable):
        self.examples, self.batches, self.collate = examples, batches, collate
        self.start = 0  # batches of the epoch already trained on (a run resumed mid-epoch); len() stays the epoch's

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        mine = self.batches[self.start:]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        for batch in mine:
            yield self.collate([self.examples[j] for j in batch])


class EpochLoader(DataLoader):
    """A DataLoader of `Batches` that plans each epoch's batches in the main process, before workers start.

    Stateful: Lightning keeps `state_dict()` in its checkpoints (loops/fit_loop.py saves stateful loaders), so a run
    resumed mid-epoch goes on with the batch after the last one trained, in the same order, not the epoch's first."""

    def __init__(self, dataset: Batches, plan: EpochPlan, epoch: Callable[[], int], num_workers: int = 0):
        # worker seeds come from the loader's own generator: an iterator made on resume must not draw from the global
        # one that dropout uses, or the resumed run would drift from an uninterrupted one
        super().__init__(dataset, batch_size=None, num_workers=num_workers,
                         generator=torch.Generator().manual_seed(plan.seed), worker_init_fn=one_thread_worker)
        self.plan, self.epoch = plan, epoch
        self._served = {"epoch": None, "batches": 0}  # the epoch under way, and how many of its batches went out
        self._resume: Optional[dict] = None  # a checkpoint's _served, applied to the next iteration of its epoch

    def __iter__(self) -> Iterator[dict]:
        # planned when the first batch is asked for: Lightning makes a resumed run's iterator before the saved
        # position is loaded (checkpoints.LastCheckpoint loads it) and before it knows whether the saved epoch was
        # complete (then the next epoch's batches are the ones due)
        return self._epoch_batches()

    def _epoch_batches(self) -> Iterator[dict]:
        epoch = self.epoch()
        resume, self._resume = self._resume, None
        self.dataset.batches = self.plan(epoch)
        self.dataset.start = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self._served = {"epoch": epoch, "batches": self.dataset.start}
        for batch in super().__iter__():
            self._served = {"epoch": epoch, "batches": self._served["batches"] + 1}
            yield batch

    def state_dict(self) -> dict:
        return dict(self._served)

    def load_state_dict(self, state: dict) -> None:
        self._resume = {"epoch": state["epoch"], "batches": int(state["batches"])}


class ArrowRows:
    """An Arrow column (an Array or a ChunkedArray) whose rows are taken a batch at a time in time proportional to
    the batch. `ChunkedArray.take` joins every chunk first, so over a column read from JSON lines or CSV (a chunk per
    block) each batch cost time proportional to the whole input: quadratic over a corpus."""

    def __init__(self, column) -> None:
        import pyarrow as pa

        self.chunks = list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]
        self.type = column.type
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])  # each chunk's first row

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows):
        """The values at `rows` (positions in the whole column), in that order, as one Array."""
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        if len(self.chunks) == 1:
            return self.chunks[0].take(rows)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        grouped = which[order]
        parts = []
        for chunk in np.unique(grouped):
            first, last = np.searchsorted(grouped, [chunk, chunk + 1])
            parts.append(self.chunks[chunk].take(rows[order[first:last]] - self.starts[chunk]))
        joined = pa.concat_arrays(parts) if parts else pa.array([], self.type)
        return joined.take(np.argsort(order))  # back to the order asked for


class PredictBatches(IterableDataset):
    """Predict batches, planned from character lengths and tokenized lazily by the rank (and worker) that runs them.

    The plan needs no tokenizer pass over the whole input and is the same for any number of ranks, so N ranks
    compute exactly the batches one process would (the same numbers, bit for bit where the math is
    deterministic), and each rank tokenizes only its own share. `max_tokens` is enforced after tokenization by
    splitting a batch that is over budget.
    """

    def __init__(self, texts, plan: list[np.ndarray], codec, max_tokens: Optional[int], rank: int, world: int,
                 pairs=None):
        self.texts, self.plan, self.codec = ArrowRows(texts), plan, codec
        self.pairs = ArrowRows(pairs) if pairs is not None else None
        self.max_tokens, self.rank, self.world = max_tokens, rank, world

    def __len__(self) -> int:
        if self.max_tokens is not None:
            # batches over the token budget are split after tokenization, so the count is not known in advance;
            # Lightning stops a sized loader after len() batches, so an estimate would lose rows: report none
            raise TypeError("the number of predict batches is known only after tokenization when max_tokens is set")
        return len(self.plan[self.rank::self.world])

    def __iter__(self) -> Iterator[dict]:
        mine = self.plan[self.rank::self.world]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        for rows in mine:
            texts = self.texts.take(rows).to_pylist()
            records = [{"index": int(i), "text": t if t is not None else ""} for i, t in zip(rows, texts)]
            if self.pairs is not None:
                for record, pair in zip(records, self.pairs.take(rows).to_pylist()):
                    record["pair"] = pair if pair is not None else ""
            examples = self.codec.encode(records, "predict")
            if self.max_tokens is None:
                yield self.codec.collate(examples)
                continue
            for part in make_batches([e["length"] for e in examples], len(examples), self.max_tokens):
                yield self.codec.collate([examples[j] for j in part])


def predict_loader(dataset: IterableDataset, num_workers: int = 0) -> DataLoader:
    """A DataLoader of ready predict batches whose workers send each batch back as NumPy arrays through the
    loader's pipe; `as_tensors` makes them tensors again in the main process without a copy (the DataModule's
    `on_before_batch_transfer`, the in-memory API's loop).

    Tensors from workers would travel as shared-memory files whose descriptors the main process fetches from each
    worker: a container's small /dev/shm (64 MB by default under Docker) or a worker gone before its descriptors
    were fetched stops the job with a connection reset (docs/MEASUREMENTS.md, W8). A predict batch is a few MB,
    which a pipe carries in about a millisecond."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=as_arrays if num_workers else None,
                      worker_init_fn=one_thread_worker)


def one_thread_worker(_: int) -> None:
    """A loader worker tokenizes on its own thread (PyTorch gives each worker one intra-op thread), whatever the
    environment says: with TOKENIZERS_PARALLELISM=true every worker would start a thread per core, N workers on N
    cores N^2 threads. The tokenizers library reads the variable when its pool is first used, after this."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def as_arrays(batch: dict) -> dict:
    """In a worker: the batch's tensors as NumPy arrays (pickled into the pipe, not shared)."""
    return {key: value.numpy() if torch.is_tensor(value) else value for key, value in batch.items()}


def as_tensors(batch: Any) -> Any:
    """A batch from `predict_loader` with tensors again (anything else as it is)."""
    if not isinstance(batch, dict):
        return batch
    return {key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value for key, value in batch.items()}
