"""Deprecated module path, kept for one release: `lit_fast.generation.CausalLM` is `lit_fast.CausalLM` (saved
configs name it so). See CHANGELOG.md."""

from lit_fast.tasks.causal_lm import CausalLM

__all__ = ["CausalLM"]
