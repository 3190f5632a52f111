"""The LightningModules a config names: one file per task family, on the shared base (base.py)."""

from lit_fast.tasks.base import LitTransformer
from lit_fast.tasks.causal_lm import CausalLM
from lit_fast.tasks.classifier import Classifier
from lit_fast.tasks.embedder import Embedder
from lit_fast.tasks.reranker import Reranker
from lit_fast.tasks.seq2seq import Seq2SeqLM
from lit_fast.tasks.token_classifier import TokenClassifier

__all__ = ["CausalLM", "Classifier", "Embedder", "LitTransformer", "Reranker", "Seq2SeqLM", "TokenClassifier"]
