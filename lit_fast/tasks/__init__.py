"""The LightningModules a config names: one file per task family, on the shared base (base.py)."""

from lit_fast.tasks.base import LitTransformer
from lit_fast.tasks.causal_lm import CausalLM
from lit_fast.tasks.classifier import Classifier
from lit_fast.tasks.embedder import Embedder
from lit_fast.tasks.seq2seq import Seq2SeqLM

__all__ = ["CausalLM", "Classifier", "Embedder", "LitTransformer", "Seq2SeqLM"]
