"""Data in and out: reading input files, batching, the DataModule, and writing predictions."""

from lit_fast.data.datamodule import TextDataModule

__all__ = ["TextDataModule"]
