"""Deprecated module path, kept for one release: `lit_fast.seq2seq.Seq2SeqLM` is `lit_fast.Seq2SeqLM` (saved configs
name it so). See CHANGELOG.md."""

from lit_fast.tasks.seq2seq import Seq2SeqLM

__all__ = ["Seq2SeqLM"]
