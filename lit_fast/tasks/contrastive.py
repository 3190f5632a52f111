"""Contrastive training of embedders, as sentence-transformers does it: (anchor, positive[, hard negatives]) rows,
MultipleNegativesRankingLoss (in-batch negatives), gradient caching for batches larger than memory, negatives
gathered from every rank, and the validation metric (recall@10 / MRR@10). docs/EMBEDDER_TRAINING.md explains each
piece.

A batch of pair rows holds the anchors as `input_ids` / `attention_mask` (what predict reads), the positives and the
hard negatives as sub-dicts `pair` / `negative`, and a 63-bit key of every positive and negative text: two rows whose
positive is the same text (several reviews of one film, one plot) must not count each other's positive as a
negative, which sentence-transformers avoids with a no-duplicates sampler and lit_fast with these keys.

Packed (`model.packing`, docs/PACKED_TRAINING.md), a batch is a `PackedContrastive`: every text of the batch (the
anchors, then the positives, then the hard negatives) in one row of real tokens, each text attending only to itself,
with the same keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lit_fast.data.collate import padded_batch
from lit_fast.tasks.codecs import EncoderCodec
from lit_fast.training.packing import PackedBatch, pack_classification
from lit_fast.training.ranks import any_rank, distributed, gather_rows, gathered_offset


@dataclass
class PackedTexts:
    """Texts in one packed row, with their lengths on the host: a range of texts is cut out (`select`) without
    waiting for the device (the gradient cache's mini-batches)."""

    row: PackedBatch
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def device(self) -> torch.device:
        return self.row.input_ids.device

    def select(self, start: int, stop: int) -> "PackedTexts":
        """Texts start..stop-1 as a row of their own (positions and boundaries are per text already)."""
        begin, end = sum(self.lengths[:start]), sum(self.lengths[:stop])
        bounds = self.row.cu_seqlens[start:stop + 1]
        row = replace(self.row, input_ids=self.row.input_ids[:, begin:end],
                      position_ids=self.row.position_ids[:, begin:end], cu_seqlens=bounds - bounds[0],
                      max_seqlen=max(self.lengths[start:stop]),
                      token_type_ids=None if self.row.token_type_ids is None else
                      self.row.token_type_ids[:, begin:end])
        return PackedTexts(row, self.lengths[start:stop])

    def to(self, device, non_blocking: bool = False) -> "PackedTexts":
        return PackedTexts(self.row.to(device, non_blocking=non_blocking), self.lengths)


@dataclass
class PackedContrastive:
    """A packed batch of pair rows: `texts` holds the N anchors, the N positives and the M hard negatives, in that
    order; the keys are the padded batch's."""

    texts: PackedTexts
    pair_key: torch.Tensor  # (N,)
    index: torch.Tensor  # (N,) the rows' numbers
    negative_key: Optional[torch.Tensor] = None  # (M,)

    @property
    def num_examples(self) -> int:
        """Rows (anchors): what a logged loss or metric is weighted by, as for a padded batch."""
        return self.pair_key.shape[0]

    @property
    def num_targets(self) -> int:
        """The loss's units, its anchors: under DDP a rank's mean is scaled by its share (base.training_step)."""
        return self.num_examples

    @property
    def counts(self) -> tuple[int, ...]:
        """Texts of each part: anchors, positives and (when the batch has any) negatives."""
        n, m = self.num_examples, len(self.texts) - 2 * self.num_examples
        return (n, n, m) if m else (n, n)

    def parts(self) -> list[PackedTexts]:
        bounds = [0, *accumulate(self.counts)]
        return [self.texts.select(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def to(self, device, non_blocking: bool = False) -> "PackedContrastive":
        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return PackedContrastive(move(self.texts), move(self.pair_key), move(self.index), move(self.negative_key))


Inputs = Union[dict[str, torch.Tensor], PackedTexts]


def text_key(text: str) -> int:
    """A stable 63-bit key of a text (the same in every process and every run, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class PairCodec:
    """Embedder rows: predict rows are texts (`text`: the EncoderCodec every embedder uses); training and evaluation
    rows add their positive (`pair`) and optional hard negatives (`negative`, a list), tokenized the same way. A
    row's length is all the tokens it puts through the model, so the batch token budget counts all of them."""

    text: EncoderCodec

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        examples = self.text.encode(records, stage)
        if stage == "predict" or not records or "pair" not in records[0]:
            return examples
        pairs = self._ids([r["pair"] for r in records])
        negatives = [r.get("negative", []) for r in records]
        flat = self._ids([t for texts in negatives for t in texts])
        start = 0
        for example, record, pair, texts in zip(examples, records, pairs, negatives):
            mine, start = flat[start:start + len(texts)], start + len(texts)
            example.update(pair_ids=pair, pair_key=text_key(record["pair"]), negative_ids=mine,
                           negative_keys=[text_key(t) for t in texts],
                           length=example["length"] + len(pair) + sum(len(ids) for ids in mine))
        return examples

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        texts = [self.text.prompt + t for t in texts]
        texts = [t.lower() for t in texts] if self.text.lower_case else texts
        return self.text.tokenizer(texts, truncation=True, max_length=self.text.max_length)["input_ids"]

    def collate(self, examples: list[dict]) -> dict:
        if "pair_ids" not in examples[0]:
            return self.text.collate(examples)
        tokenizer = self.text.tokenizer
        batch = padded_batch(tokenizer, [e["input_ids"] for e in examples])
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        batch["pair"] = padded_batch(tokenizer, [e["pair_ids"] for e in examples])
        batch["pair_key"] = torch.tensor([e["pair_key"] for e in examples], dtype=torch.long)
        negatives = [ids for e in examples for ids in e["negative_ids"]]
        if negatives:
            batch["negative"] = padded_batch(tokenizer, negatives)
            batch["negative_key"] = torch.tensor([k for e in examples for k in e["negative_keys"]], dtype=torch.long)
        return batch

    def pack(self, examples: list[dict]) -> Union[PackedContrastive, PackedBatch]:
        """The batch's anchors, positives and hard negatives in one packed row (rows without positives: their texts,
        which no loss can use; the Embedder says so)."""
        if "pair_ids" not in examples[0]:
            return pack_classification(examples)
        texts = ([e["input_ids"] for e in examples] + [e["pair_ids"] for e in examples]
                 + [ids for e in examples for ids in e["negative_ids"]])
        row = pack_classification([{"input_ids": ids} for ids in texts])
        negative_keys = [k for e in examples for k in e["negative_keys"]]
        return PackedContrastive(
            texts=PackedTexts(row, tuple(len(ids) for ids in texts)),
            pair_key=torch.tensor([e["pair_key"] for e in examples], dtype=torch.long),
            index=torch.tensor([e["index"] for e in examples], dtype=torch.long),
            negative_key=torch.tensor(negative_keys, dtype=torch.long) if negative_keys else None,
        )


# ---- the loss ------------------------------------------------------------------------------------------------
def ranking_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: Optional[torch.Tensor],
                 pair_keys: torch.Tensor, negative_keys: Optional[torch.Tensor], *, scale: float = 20.0,
                 symmetric: bool = False, gather: bool = False) -> torch.Tensor:
    """MultipleNegativesRankingLoss: each anchor's positive against every positive and hard negative of the batch
    (of every rank with `gather`), cosine similarity times `scale` (1 / temperature), cross-entropy. `symmetric`
    adds the positive -> anchors direction and averages the two (sentence-transformers' directions=("query_to_doc",
    "doc_to_query"), partition_mode="per_direction"). Candidates with the same key as an anchor's own positive are
    left out of its negatives; with distinct texts this is sentence-transformers' loss exactly."""
    n = anchors.shape[0]
    offset = 0
    all_anchors, all_positives, all_pair_keys = anchors, positives, pair_keys
    if gather and distributed():
        offset = gathered_offset(n, anchors.device)
        all_anchors, all_positives = gather_rows(anchors), gather_rows(positives)
        all_pair_keys = gather_rows(pair_keys)
        if any_rank(negatives is not None, anchors.device):
            negatives = gather_rows(_or_empty(negatives, anchors))
            negative_keys = gather_rows(_or_empty(negative_keys, pair_keys))
    candidates, keys = all_positives, all_pair_keys
    if negatives is not None and len(negatives):
        candidates, keys = torch.cat([all_positives, negatives]), torch.cat([all_pair_keys, negative_keys])
    rows = torch.arange(n, device=anchors.device)
    own = rows + offset  # where each local anchor's positive (and the anchor itself) sits among the gathered rows
    logits = scale * _cosine(anchors, candidates)
    loss = F.cross_entropy(_mask_duplicates(logits, keys, pair_keys, own), own)
    if not symmetric:
        return loss
    backward = scale * _cosine(positives, all_anchors)  # each positive against every anchor
    backward = _mask_duplicates(backward, all_pair_keys, pair_keys, own)
    return (loss + F.cross_entropy(backward, own)) / 2


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _mask_duplicates(logits: torch.Tensor, keys: torch.Tensor, own_keys: torch.Tensor, own: torch.Tensor
                     ) -> torch.Tensor:
    """-inf where a candidate other than the row's own has the key of the row's positive (the same text)."""
    same = keys[None, :] == own_keys[:, None]
    same[torch.arange(len(own), device=own.device), own] = False
    return logits.masked_fill(same, float("-inf"))


# ---- negatives from every rank (training/ranks.py gathers them) --------------------------------------------
def _or_empty(x: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A rank without hard negatives in this batch still takes part in the gather (with no rows)."""
    return x if x is not None else like.new_zeros((0, *like.shape[1:]))


# ---- gradient caching ----------------------------------------------------------------------------------------
class _RngReplay:
    """The RNG state before a mini-batch's first forward, restored for its second (dropout draws the same masks)."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, device)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


def _slices(inputs: Inputs, size: int) -> list[Inputs]:
    """Mini-batches of `size` rows (texts), each cut to its own longest row (right padding) or packed row."""
    if isinstance(inputs, PackedTexts):
        return [inputs.select(start, min(start + size, len(inputs))) for start in range(0, len(inputs), size)]
    rows = inputs["input_ids"].shape[0]
    chunks = []
    for start in range(0, rows, size):
        mask = inputs["attention_mask"][start:start + size]
        width = int(mask.sum(1).max()) if mask.numel() else 0
        chunks.append({k: v[start:start + size, :width] for k, v in inputs.items()})
    return chunks


class _CachedGradients(torch.autograd.Function):
    """The loss's value, whose backward hands each parameter the gradient gathered mini-batch by mini-batch: one
    gradient per parameter and step, as DDP's reducer expects (and scaled by whatever multiplies the loss: AMP's
    scaler, gradient accumulation)."""

    @staticmethod
    def forward(ctx, loss, grads, *params):
        ctx.grads = grads
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(grad_output * g for g in ctx.grads))


def cached_loss(embed: Callable[[Inputs], torch.Tensor], parts: list[Inputs], loss_of: Callable[..., torch.Tensor],
                mini_batch_size: int, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """GradCache (Gao et al. 2021; sentence-transformers' CachedMultipleNegativesRankingLoss): the same loss and
    gradients as `loss_of(*[embed(p) for p in parts])` with the activations of only `mini_batch_size` rows alive.
    A part is a padded batch's inputs or packed texts (`PackedTexts`: mini-batches of texts cut from the row).

    1. embed every mini-batch without a graph, keeping each one's RNG state;
    2. the loss on those embeddings, and its gradient with respect to them (the only full-batch step: vectors);
    3. embed each mini-batch again, with a graph and the same RNG, and pull the cached gradient through it into
       the parameters (`torch.autograd.grad`: no parameter hook fires yet);
    the returned loss then gives each parameter its summed gradient in the ordinary backward.
    """
    device = parts[0].device if isinstance(parts[0], PackedTexts) else parts[0]["input_ids"].device
    chunks, states, reps = [], [], []
    for part in parts:
        vectors = []
        for chunk in _slices(part, mini_batch_size):
            states.append(_RngReplay(device))
            with torch.no_grad():
                vectors.append(embed(chunk))
            chunks.append(chunk)
        reps.append(torch.cat(vectors).detach().requires_grad_())
    with torch.enable_grad():
        loss = loss_of(*reps)
        rep_grads = torch.autograd.grad(loss, reps)
    cached = [g for grad in rep_grads for g in grad.split(mini_batch_size)]  # the chunks' rows, in order
    grads = [torch.zeros_like(p) for p in params]
    for chunk, state, grad in zip(chunks, states, cached):
        with state, torch.enable_grad():
            out = embed(chunk)
            for total, g in zip(grads, torch.autograd.grad(out, params, grad, allow_unused=True)):
                if g is not None:
                    total += g
    return _CachedGradients.apply(loss.detach(), grads, *params)


# ---- retrieval metric ----------------------------------------------------------------------------------------
def retrieval_metrics(queries: torch.Tensor, query_keys: torch.Tensor, documents: torch.Tensor,
                      document_keys: torch.Tensor, k: int = 10) -> dict[str, torch.Tensor]:
    """Recall@k and MRR@k of each query's positive among the distinct documents (by key), cosine similarity: what
    sentence-transformers' InformationRetrievalEvaluator reports for one relevant document per query."""
    unique, first = _first_of_each(document_keys)
    corpus = F.normalize(documents[first].float(), dim=-1)
    scores = F.normalize(queries.float(), dim=-1) @ corpus.T
    target = torch.searchsorted(unique, query_keys)  # each query's document among the distinct ones
    own = scores.gather(1, target[:, None])
    rank = (scores > own).sum(1)  # 0 = first; ties count in the query's favour
    hit = rank < k
    return {f"recall@{k}": hit.float().mean(),
            f"mrr@{k}": torch.where(hit, 1.0 / (rank + 1).float(), torch.zeros_like(own[:, 0])).mean()}


def _first_of_each(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distinct keys and the position of each one's first occurrence."""
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    positions = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(unique),), len(keys), device=keys.device, dtype=positions.dtype)
    return unique, first.scatter_reduce(0, inverse, positions, reduce="amin")


class Retrieval(Metric):
    """`retrieval_metrics`' recall@k or MRR@k over a whole split: updated with each batch's (anchor vectors,
    positive keys, positive vectors), computed once over every rank's rows (torchmetrics gathers them)."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, measure: str, k: int = 10):
        super().__init__()
        self.name = f"{measure}@{k}"
        self.k = k
        for state in ("queries", "keys", "documents"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, queries: torch.Tensor, keys: torch.Tensor, documents: torch.Tensor) -> None:
        self.queries.append(queries.detach().float())
        self.keys.append(keys)
        self.documents.append(documents.detach().float())

    def compute(self) -> torch.Tensor:
        keys = dim_zero_cat(self.keys)
        found = retrieval_metrics(dim_zero_cat(self.queries), keys, dim_zero_cat(self.documents), keys, self.k)
        return found[self.name]
