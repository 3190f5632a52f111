"""Losses of packed rows through HF task models: the right token of each example, the model's own head.

A sequence classifier's HF head reads token 0 of each row, which in a packed row is only the first example's.
For each architecture a `ClassifierHead` says, as data, where the base model is, whether it takes token types,
where its position table starts, and how its head turns each example's first-token state into logits (BERT's
pooler, RoBERTa's classification head, DistilBERT's pre_classifier, ALBERT's pooler). The loss is the task
model's own (`ForSequenceClassificationLoss`, which reads `config.problem_type`). A token classifier's head is per
token: its own forward runs on the row (the same positions and token types), and the loss is the cross-entropy
mean over the labelled tokens, as HF's padded head computes it.

A causal LM runs its full forward (so peft's wrappers and the model's lm_head are used as they are) with
`logits_to_keep` naming the positions that have a target: prompt tokens get no logits at all. The loss is the mean
over every target token of the row, the value HF's padded loss with -100 labels gives.

Both need `use_packed_attention(model)` (training/attention.py) to have run once; they refuse a model whose
attention would let packed examples see each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from lit_fast.errors import ConfigError, UnsupportedModelError
from lit_fast.training.attention import NAME
from lit_fast.training.packing import IGNORE, PackedBatch


@dataclass(frozen=True)
class ClassifierHead:
    """How one architecture's `...ForSequenceClassification` runs on a packed row."""

    base: str  # the task model's attribute holding the encoder
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (task model, first tokens (N, H)) -> logits (N, C)
    token_types: bool = True  # the encoder takes token_type_ids
    position_offset: Callable[[object], int] = lambda config: 0  # the position of every example's first token


def _bert_head(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(model.bert.pooler(first[:, None])))


def _first_token_head(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    """RoBERTa's and ELECTRA's classification heads take the row's states and read token 0 themselves."""
    return model.classifier(first[:, None])


def _distilbert_head(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(nn.functional.relu(model.pre_classifier(first))))


def _albert_head(model: nn.Module, first: torch.Tensor) -> torch.Tensor:
    pooled = model.albert.pooler_activation(model.albert.pooler(first))
    return model.classifier(model.dropout(pooled))


def _roberta_positions(config) -> int:
    """RoBERTa's position ids count from padding_idx + 1 (create_position_ids_from_input_ids)."""
    return config.pad_token_id + 1


_ROBERTA = ClassifierHead(base="roberta", head=_first_token_head, position_offset=_roberta_positions)
CLASSIFIER_HEADS: dict[str, ClassifierHead] = {
    "bert": ClassifierHead(base="bert", head=_bert_head),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "electra": ClassifierHead(base="electra", head=_first_token_head),
    "distilbert": ClassifierHead(base="distilbert", head=_distilbert_head, token_types=False),
    "albert": ClassifierHead(base="albert", head=_albert_head),
}

# causal LMs whose forward takes position_ids from 0 and a tensor `logits_to_keep` (tested in
# tests/training/test_packed_equality.py)
CAUSAL_LM_TYPES = frozenset({"llama", "qwen2", "gpt2", "opt"})


def classifier_logits(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(N, num_labels) logits of a packed row's examples through a `...ForSequenceClassification` model."""
    task = _unwrap(model)
    spec = _classifier_head(task)
    hidden = getattr(task, spec.base)(**_encoder_inputs(task, spec, batch)).last_hidden_state
    first = hidden[0, batch.cu_seqlens[:-1].long()]
    return spec.head(task, first)


def _encoder_inputs(task: nn.Module, spec: ClassifierHead, batch: PackedBatch) -> dict:
    """The encoder's keywords for a packed row: ids, positions from the architecture's first position, token
    types where the encoder takes them, and the boundaries its attention keeps examples apart by."""
    offset = spec.position_offset(task.config)
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids + offset if offset else
              batch.position_ids, **batch.boundaries()}
    if batch.token_type_ids is not None:
        if not spec.token_types:
            raise ConfigError(f"{task.config.model_type} takes no token_type_ids; pack its examples without them")
        inputs["token_type_ids"] = batch.token_type_ids
    return inputs


def classification_loss(model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of a packed row: the mean over its examples, as HF's padded head computes it."""
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    if batch.labels is None:
        raise ConfigError("classification_loss needs labels in the packed batch (pack_classification with labels)")
    logits = classifier_logits(model, batch)
    return ForSequenceClassificationLoss(batch.labels, logits, _unwrap(model).config), logits


def token_classifier_logits(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(T, num_labels) logits of every token of a packed row through a `...ForTokenClassification` model: its own
    forward and head, which are per token, so only the positions and the boundaries change."""
    task = _unwrap(model)
    _check_attention(task)
    spec = CLASSIFIER_HEADS.get(task.config.model_type)
    if spec is None or not hasattr(task, spec.base) or not type(task).__name__.endswith("ForTokenClassification"):
        raise UnsupportedModelError(f"packed token classification supports {sorted(CLASSIFIER_HEADS)} token "
                                    f"classifiers, not {type(task).__name__}; train it padded (model.packing: false)")
    return task(**_encoder_inputs(task, spec, batch)).logits[0]


def token_classification_loss(model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits (T, num_labels)) of a packed row: the cross-entropy mean over its labelled tokens (-100 on
    the others), as HF's padded token classifier computes it."""
    if batch.labels is None:
        raise ConfigError("token_classification_loss needs labels in the packed batch (pack_tokens with labels)")
    logits = token_classifier_logits(model, batch)
    return nn.functional.cross_entropy(logits.float(), batch.labels[0], ignore_index=IGNORE), logits


def causal_lm_target_logits(model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (K, V), targets (K,), positions (K,)) for the K tokens of a packed row that have a target."""
    task = _unwrap(model)
    _check_attention(task)
    if task.config.model_type not in CAUSAL_LM_TYPES:
        raise UnsupportedModelError(f"packed causal-LM training supports {sorted(CAUSAL_LM_TYPES)}, not "
                                    f"{task.config.model_type}; train it padded (model.packing: false)")
    if batch.labels is None:
        raise ConfigError("a causal-LM loss needs labels in the packed batch (pack_causal)")
    targets = batch.labels[0]
    positions = torch.nonzero(targets != IGNORE).flatten()
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, logits_to_keep=positions,
                use_cache=False, **batch.boundaries())
    return out.logits[0], targets[positions], positions


def causal_lm_loss(model: nn.Module, batch: PackedBatch, num_items_in_batch: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy over the row's target tokens: their mean, or their sum / `num_items_in_batch` (the count
    over all ranks or accumulated micro-batches, as transformers' Trainer normalises)."""
    logits, targets, _ = causal_lm_target_logits(model, batch)
    if targets.numel() == 0:
        raise ConfigError("a packed causal-LM batch has no target tokens; every example needs a completion")
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def causal_lm_example_losses(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(N,) summed cross-entropy of each example's target tokens (which example contributes what)."""
    logits, targets, positions = causal_lm_target_logits(model, batch)
    per_token = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    example = torch.bucketize(positions, batch.cu_seqlens[1:].long(), right=True)
    return torch.zeros(batch.num_examples, dtype=per_token.dtype, device=per_token.device).index_add(
        0, example, per_token)


def _classifier_head(task: nn.Module) -> ClassifierHead:
    _check_attention(task)
    spec = CLASSIFIER_HEADS.get(task.config.model_type)
    if spec is None or not hasattr(task, spec.base):
        raise UnsupportedModelError(f"packed classification supports {sorted(CLASSIFIER_HEADS)} sequence "
                                    f"classifiers, not {type(task).__name__}; train it padded (model.packing: false)")
    return spec


def _check_attention(task: nn.Module) -> None:
    if task.config._attn_implementation != NAME:
        raise ConfigError(f"{type(task).__name__} runs {task.config._attn_implementation!r} attention, which would "
                          "let packed examples attend to each other; call "
                          "lit_fast.training.use_packed_attention(model) once after loading")


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers are injected in place, so they still run)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
