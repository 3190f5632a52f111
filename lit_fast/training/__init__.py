"""Padding-free (packed) training: packed rows and their token-budget plan (packing.py), varlen attention inside
HF's own modules (attention.py), and the losses that read each example's own tokens (heads.py).
Design and measurements: docs/PACKED_TRAINING.md."""

from lit_fast.training.attention import use_packed_attention, varlen_attention
from lit_fast.training.heads import (
    CAUSAL_LM_TYPES,
    CLASSIFIER_HEADS,
    causal_lm_example_losses,
    causal_lm_loss,
    classification_loss,
    classifier_logits,
    token_classification_loss,
    token_classifier_logits,
)
from lit_fast.training.packing import (
    PackedBatch,
    TokenBudgetPlan,
    first_fit,
    pack_causal,
    pack_classification,
    pack_tokens,
)

__all__ = [
    "CAUSAL_LM_TYPES", "CLASSIFIER_HEADS", "PackedBatch", "TokenBudgetPlan", "causal_lm_example_losses",
    "causal_lm_loss", "classification_loss", "classifier_logits", "first_fit", "pack_causal", "pack_classification",
    "pack_tokens", "token_classification_loss", "token_classifier_logits", "use_packed_attention", "varlen_attention",
]
