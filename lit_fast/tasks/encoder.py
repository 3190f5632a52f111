"""What encoder tasks share (embedder.py, classifier.py): right-padded, truncated token ids and the model inputs."""

from __future__ import annotations

from lit_fast.tasks.base import LitTransformer
from lit_fast.tasks.codecs import EncoderCodec


class EncoderTask(LitTransformer):
    """What encoder tasks share: their codec (right padding, truncation to max_length) and the model inputs."""

    lower_case = False
    # on an H100 a packed BERT-base step ran 48 ms against 42 ms padded at steady state (W3,
    # docs/PACKED_TRAINING.md), so `packing: auto` pads encoders on CUDA until that is fixed; on the CPU it packs
    packs_on_cuda = False

    def codec(self) -> EncoderCodec:
        return EncoderCodec(self.tokenizer, self.max_length, self.lower_case)

    @staticmethod
    def _inputs(batch: dict) -> dict:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
