"""What a row means to each task family: records -> token ids (`encode`) -> a batch of tensors (`collate`).

A task builds its codec (`LitTransformer.codec()`) from what it knows (tokenizer, lengths, labels, chat template) and
the DataModule hands it to its loader workers: they pickle the codec, never the model. Every codec is a plain frozen
dataclass of picklable fields.

Records are dicts with "index" and "text", and in training "label" (classification) or "target" (generation).
Examples are dicts with "index", "input_ids", "length" and whatever the batch needs ("labels").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from lit_fast.data.collate import pad_ids, padded_batch
from lit_fast.errors import ConfigError, InputDataError

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without loss (prompt, padding): transformers' cross-entropy skips it


class Codec(Protocol):
    def encode(self, records: list[dict], stage: str) -> list[dict]: ...

    def collate(self, examples: list[dict]) -> dict: ...


@dataclass(frozen=True)
class EncoderCodec:
    """Encoder tasks: right padding, truncation to `max_length`; `labels` (classification) maps label names to ids;
    `prompt` goes before every text, then the text is lower-cased where the model asks for it."""

    tokenizer: Any
    max_length: int
    lower_case: bool = False
    labels: Optional[tuple[str, ...]] = None
    prompt: str = ""  # put before every text (an embedding model's query: / passage: prompts)

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        texts = [self.prompt + r["text"] for r in records]
        texts = [t.lower() for t in texts] if self.lower_case else texts
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        examples = []
        for record, row in zip(records, ids):
            example = {"index": record["index"], "input_ids": row, "length": len(row)}
            if "label" in record and self.labels is not None:
                example["labels"] = self.labels.index(record["label"])
            examples.append(example)
        return examples

    def collate(self, examples: list[dict]) -> dict:
        batch = padded_batch(self.tokenizer, [e["input_ids"] for e in examples])
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return dict(batch)


@dataclass(frozen=True)
class ChatFormat:
    """How a prompt becomes the model's input text: the tokenizer's chat template, with an optional system message."""

    system_prompt: Optional[str] = None

    def render(self, tokenizer, prompt: str) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class CausalCodec:
    """Decoder-only LMs. Training rows are a prompt and optionally a completion (the loss counts the completion
    only; without one the whole text is the target), right-padded. Predict rows are prompts, left-padded, cut from
    the left (or refused, `truncation="error"`) to leave room for `max_new_tokens` in the context."""

    tokenizer: Any
    max_length: int
    max_new_tokens: int
    truncation: str = "left"
    chat: Optional[ChatFormat] = None  # None: prompts go in as plain text

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        if self.chat is not None:  # the template already holds BOS and other special tokens
            texts = [self.chat.render(self.tokenizer, p) for p in prompts]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompts)["input_ids"]

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        for r in records:
            if not r["text"].strip() and (stage == "predict" or "target" in r):
                raise InputDataError(f"row {r['index']}: empty prompt; every row needs text to continue")
        prompts = self.prompt_ids([r["text"] for r in records])
        if stage == "predict":
            return [{"index": r["index"], "input_ids": self._fit_prompt(ids, r["index"]), "length": len(ids)}
                    for r, ids in zip(records, prompts)]
        eos = [self.tokenizer.eos_token_id]
        examples = []
        for r, prompt in zip(records, prompts):
            if "target" in r:  # loss on the completion (and its EOS) only
                completion = self.tokenizer(r["target"], add_special_tokens=False)["input_ids"] + eos
            else:  # plain text: every token is a target
                prompt, completion = [], prompt + eos
            ids, labels = _truncate_for_training(prompt, completion, self.max_length)
            examples.append({"index": r["index"], "input_ids": ids, "labels": labels, "length": len(ids)})
        return examples

    def _fit_prompt(self, ids: list[int], row: int) -> list[int]:
        room = self.max_length - self.max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in the context of "
                              f"{self.max_length} tokens; lower max_new_tokens or raise max_length")
        if len(ids) <= room:
            return ids
        if self.truncation == "error":
            raise InputDataError(f"row {row}: the prompt has {len(ids)} tokens, more than the {room} that fit before "
                                 f"{self.max_new_tokens} new tokens in the context of {self.max_length}; shorten it "
                                 "or set model.truncation: left")
        log.warning("row %d: prompt of %d tokens truncated from the left to %d (context %d, max_new_tokens %d)",
                    row, len(ids), room, self.max_length, self.max_new_tokens)
        return ids[-room:]

    def collate(self, examples: list[dict]) -> dict:
        # left padding for generation (new tokens follow the prompt directly), right padding for training
        # (positions then start at 0 in every row without passing position ids)
        left = "labels" not in examples[0]
        ids, mask = pad_ids([e["input_ids"] for e in examples], self.tokenizer.pad_token_id, left)
        batch = {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([e["index"] for e in examples])}
        if not left:  # labels are as long as their input ids (_truncate_for_training); padded with IGNORE
            batch["labels"] = pad_ids([e["labels"] for e in examples], IGNORE)[0]
        return batch


@dataclass(frozen=True)
class Seq2SeqCodec:
    """Encoder-decoder models: a source (with `prefix`) cut from the left (or refused) to `max_length`, and in
    training a target of at most `max_target_length` tokens that ends with EOS."""

    tokenizer: Any
    max_length: int
    max_target_length: int
    prefix: str = ""
    truncation: str = "left"

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        tokenizer = self.tokenizer
        examples = []
        for r in records:
            if not r["text"].strip():
                raise InputDataError(f"row {r['index']}: empty source text")
            ids = tokenizer(self.prefix + r["text"])["input_ids"]
            if len(ids) > self.max_length:
                if self.truncation == "error":
                    raise InputDataError(f"row {r['index']}: {len(ids)} tokens, more than max_length "
                                         f"{self.max_length}; shorten it or set model.truncation: left")
                log.warning("row %d: source of %d tokens truncated from the left to %d", r["index"], len(ids),
                            self.max_length)
                ids = ids[: 1 if ids[0] == tokenizer.bos_token_id else 0] + ids[-(self.max_length - 1):]
            example = {"index": r["index"], "input_ids": ids, "length": len(ids)}
            if "target" in r:
                labels = tokenizer(text_target=r["target"], truncation=True,
                                   max_length=self.max_target_length)["input_ids"]
                if not labels or labels[-1] != tokenizer.eos_token_id:  # the model must learn to stop
                    labels = labels[: self.max_target_length - 1] + [tokenizer.eos_token_id]
                example["labels"] = labels
            examples.append(example)
        return examples

    def collate(self, examples: list[dict]) -> dict:
        batch = padded_batch(self.tokenizer, [e["input_ids"] for e in examples])
        batch["index"] = torch.tensor([e["index"] for e in examples])
        if "labels" in examples[0]:
            width = max(len(e["labels"]) for e in examples)
            batch["labels"] = torch.tensor([e["labels"] + [IGNORE] * (width - len(e["labels"])) for e in examples])
        return batch


def _truncate_for_training(prompt: list[int], completion: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Fit a training row in `limit` tokens: drop the prompt's oldest tokens first, then the completion's end."""
    if len(prompt) + len(completion) > limit:
        keep_prompt = max(0, limit - len(completion))
        prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt else []
        completion = completion[: limit - len(prompt)]
    return prompt + completion, [IGNORE] * len(prompt) + completion
