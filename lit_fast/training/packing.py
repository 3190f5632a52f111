"""Packed training batches: several examples' real tokens in one row, and the token-budget plan that groups them.

A packed row concatenates the examples' token ids (1 x T, no padding), restarts positions at 0 for each example,
and records where each example starts (`cu_seqlens`, int32, `[0, l1, l1+l2, ..., T]`) so that attention stays
inside each example (training/attention.py). Architectures whose position table starts elsewhere (RoBERTa:
padding_idx + 1) add their offset in training/heads.py, so a packed batch depends on no model.

Labels: a sequence classifier's one label per example; a token classifier's per-token labels, in place; a causal
LM's per-token labels (-100 where no loss, as the codecs make them) become shifted targets: the token at position i
of an example is scored on that example's token i + 1, and each example's last token on nothing, so no token
predicts across a boundary.

The plan (`TokenBudgetPlan`) shuffles the examples each epoch (seeded) and places them, in that order, into the
first batch with room under `max_tokens` real tokens (first-fit; lengths are never sorted, so batches stay
random). Every rank computes the same plan and takes every world-th batch; in training the last few batches that
would leave ranks with unequal step counts wait for a later epoch's shuffle.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

from lit_fast.errors import ConfigError, InputDataError

IGNORE = -100  # the label that counts for no loss (torch's cross-entropy ignore_index)


@dataclass
class PackedBatch:
    """One packed row. Lightning moves it to the device like any batch (a dataclass of tensors)."""

    input_ids: torch.Tensor  # (1, T) int64
    position_ids: torch.Tensor  # (1, T) int64, 0 at every example's first token
    cu_seqlens: torch.Tensor  # (N + 1,) int32
    max_seqlen: int
    labels: Optional[torch.Tensor] = None  # classification (N, ...); causal LM (1, T) shifted targets
    token_type_ids: Optional[torch.Tensor] = None  # (1, T) for sentence pairs
    index: Optional[torch.Tensor] = None  # (N,) the examples' row numbers
    num_targets: int = 0  # labels that count for the loss (N for classification)

    @property
    def num_examples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def boundaries(self) -> dict:
        """The keywords HF models forward to their attention function (transformers' flash-attention names)."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def pack_classification(examples: Sequence[dict]) -> PackedBatch:
    """Examples {"input_ids": [...], "labels": class id (or floats), optional "token_type_ids", "index"} -> one
    row; `labels` is (N,) (or (N, labels) for float vectors), one per example in order."""
    batch = _pack(examples)
    if "labels" in examples[0]:
        batch.labels = torch.tensor([e["labels"] for e in examples])
        batch.num_targets = len(examples)
    return batch


def pack_causal(examples: Sequence[dict]) -> PackedBatch:
    """Examples {"input_ids": [...], "labels": [...] as long as the ids (-100: no loss), optional "index"} -> one
    row with shifted targets; without "labels" every next token is a target."""
    batch = _pack(examples)
    targets: list[int] = []
    for row, example in enumerate(examples):
        labels = example.get("labels", example["input_ids"])
        if len(labels) != len(example["input_ids"]):
            raise InputDataError(f"example {example.get('index', row)}: {len(labels)} labels for "
                                 f"{len(example['input_ids'])} tokens; a causal LM needs one label per token")
        targets += list(labels[1:]) + [IGNORE]
    batch.labels = torch.tensor(targets, dtype=torch.long).unsqueeze(0)
    batch.num_targets = sum(t != IGNORE for t in targets)
    return batch


def pack_tokens(examples: Sequence[dict]) -> PackedBatch:
    """Examples {"input_ids": [...], "labels": [...] one per token (-100: no loss), optional "token_type_ids",
    "index"} -> one row; `labels` is (1, T), each token's own label in place (a token classifier's, unshifted)."""
    batch = _pack(examples)
    if "labels" in examples[0]:
        labels: list[int] = []
        for row, example in enumerate(examples):
            if len(example["labels"]) != len(example["input_ids"]):
                raise InputDataError(f"example {example.get('index', row)}: {len(example['labels'])} labels for "
                                     f"{len(example['input_ids'])} tokens; token classification needs one per token")
            labels += example["labels"]
        batch.labels = torch.tensor(labels, dtype=torch.long).unsqueeze(0)
        batch.num_targets = sum(label != IGNORE for label in labels)
    return batch


def _pack(examples: Sequence[dict]) -> PackedBatch:
    if not examples:
        raise InputDataError("a packed batch needs at least one example, got none")
    lengths = [len(e["input_ids"]) for e in examples]
    for row, (example, length) in enumerate(zip(examples, lengths)):
        if length == 0:
            raise InputDataError(f"example {example.get('index', row)} has no tokens; drop empty texts first")
    ids = [token for e in examples for token in e["input_ids"]]
    positions = [p for length in lengths for p in range(length)]
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    batch = PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.long).unsqueeze(0),
        cu_seqlens=torch.tensor(starts, dtype=torch.int32),
        max_seqlen=max(lengths),
    )
    if "token_type_ids" in examples[0]:
        batch.token_type_ids = torch.tensor([t for e in examples for t in e["token_type_ids"]]).unsqueeze(0)
    if "index" in examples[0]:
        batch.index = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


@dataclass(frozen=True)
class TokenBudgetPlan:
    """A rank's packed batches for an epoch: `plan(epoch)` -> lists of example positions (EpochPlan's interface).

    Args:
        lengths: tokens of each example.
        max_tokens: real tokens a batch may carry; an example longer than this is an error.
        seed: the shuffle of epoch e uses seed + e.
        rank, world: this process and the number of data-parallel processes.
        shuffle: training (True): shuffled, equal step counts on every rank. Evaluation (False): input order,
            every example once, ranks may differ by one batch.
        max_examples: at most this many examples a batch (attention runs once per example on the CPU).
    """

    lengths: tuple[int, ...]
    max_tokens: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    shuffle: bool = True
    max_examples: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"data.max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {self.max_examples}")
        if not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} is not one of the {self.world} data-parallel ranks")
        longest = max(self.lengths, default=0)
        if longest > self.max_tokens:
            row = self.lengths.index(longest)
            raise ConfigError(f"example {row} has {longest} tokens, more than data.max_tokens={self.max_tokens}; "
                              "raise data.max_tokens to at least model.max_length")

    def __call__(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        batches = first_fit(order, self.lengths, self.max_tokens, self.max_examples)
        if self.shuffle:
            steps = len(batches) // self.world
            if steps == 0:
                raise ConfigError(f"{len(self.lengths)} examples make {len(batches)} batches of {self.max_tokens} "
                                  f"tokens, fewer than the {self.world} ranks; lower data.max_tokens")
            batches = batches[: steps * self.world]  # first-fit's last batches are its emptiest
        return batches[self.rank::self.world]


def first_fit(order: Sequence[int], lengths: Sequence[int], capacity: int,
              max_examples: Optional[int] = None) -> list[list[int]]:
    """Examples in `order` into batches of at most `capacity` tokens: each goes to the first batch (in order of
    creation) with room for it. A max-tree over the batches' free room finds that batch in O(log n)."""
    size = 1
    while size < max(1, len(order)):
        size *= 2
    free = [capacity] * (2 * size)  # leaves: every batch that can exist, unopened ones empty
    batches: list[list[int]] = []
    for j in order:
        need = lengths[j]
        node = 1
        while node < size:  # descend to the leftmost leaf with room
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(batches):
            batches.append([])
        batches[slot].append(j)
        full = max_examples is not None and len(batches[slot]) >= max_examples
        free[node] = -1 if full else free[node] - need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return batches
