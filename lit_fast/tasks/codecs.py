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
from typing import Any, Optional, Protocol, Union

import torch

from lit_fast.data.collate import pad_ids, padded_batch
from lit_fast.errors import ConfigError, InputDataError
from lit_fast.training.packing import PackedBatch, pack_causal, pack_classification

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without loss (prompt, padding): transformers' cross-entropy skips it


class Codec(Protocol):
    def encode(self, records: list[dict], stage: str) -> list[dict]: ...

    def collate(self, examples: list[dict]) -> dict: ...

    # codecs of tasks with packed training (base.LitTransformer.packing_types) also have
    # pack(examples) -> PackedBatch: the examples' real tokens in one row (lit_fast/training/packing.py)


def token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """`tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]`, straight from the Rust tokenizer
    where there is one: the same ids, without building the attention masks and token type ids that collate makes
    anyway (about a fifth of the time, and tokenization is predict's host bottleneck: W8)."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch"):
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    # what transformers' own call sets before it encodes (it resets them on its next call)
    backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
    backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)
    return [e.ids for e in encode(texts, add_special_tokens=True)]


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
        ids = token_ids(self.tokenizer, texts, self.max_length)
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

    def pack(self, examples: list[dict]) -> PackedBatch:
        """The examples in one packed row, one label each (a classifier's packed training)."""
        return pack_classification(examples)


@dataclass(frozen=True)
class ChatFormat:
    """How a prompt or a conversation becomes the model's input text: the tokenizer's chat template, with an optional
    system message (put first unless the conversation has its own)."""

    system_prompt: Optional[str] = None

    def messages(self, prompt: Union[str, list[dict]]) -> list[dict]:
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if self.system_prompt and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def render(self, tokenizer, prompt: Union[str, list[dict]]) -> str:
        """A prompt (one user message) or a conversation, ready for the next assistant turn."""
        return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, add_generation_prompt=True)

    def segments(self, tokenizer, conversation: list[dict], row: int) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is an assistant turn) pieces. An assistant turn is what the
        template adds after the generation prompt: the reply and its end-of-turn marker, what predict generates."""
        messages = self.messages(conversation)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        pieces, done = [], 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if k == 0:
                raise InputDataError(f"row {row}: the conversation starts with an assistant message; start it with a "
                                     "system or user message")
            prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            turn = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
            if not (text.startswith(prompt) and text.startswith(turn) and len(prompt) <= len(turn)):
                # e.g. templates that rewrite earlier turns (drop their reasoning) once a later one follows
                raise ConfigError(f"row {row}: the chat template renders the messages before message {k} (an "
                                  "assistant turn) differently once more follow, so the assistant turns cannot be "
                                  "found; give model.chat_template a template that renders each turn independently")
            pieces += [(text[done:len(prompt)], False), (text[len(prompt):len(turn)], True)]
            done = len(turn)
        pieces.append((text[done:], False))
        return [(piece, assistant) for piece, assistant in pieces if piece]


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

    def prompt_ids(self, prompts: list[Union[str, list[dict]]]) -> list[list[int]]:
        if not prompts:
            return []
        if self.chat is not None:  # the template already holds BOS and other special tokens
            texts = [self.chat.render(self.tokenizer, p) for p in prompts]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompts)["input_ids"]

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        # a conversation is a list of {"role": ..., "content": ...} messages
        records = [{**r, "text": self._messages(r["text"], r["index"])} if isinstance(r["text"], list) else r
                   for r in records]
        for r in records:
            if isinstance(r["text"], str) and not r["text"].strip() and (stage == "predict" or "target" in r):
                raise InputDataError(f"row {r['index']}: empty prompt; every row needs text to continue")
        if stage == "predict":
            prompts = self.prompt_ids([r["text"] for r in records])
            return [{"index": r["index"], "input_ids": self._fit_prompt(ids, r["index"]), "length": len(ids)}
                    for r, ids in zip(records, prompts)]
        eos = [self.tokenizer.eos_token_id]
        prompts = iter(self.prompt_ids([r["text"] for r in records if isinstance(r["text"], str)]))
        examples = []
        for r in records:
            if isinstance(r["text"], list):
                ids, labels = self._conversation(r["text"], r["index"])
            else:
                prompt = next(prompts)
                if "target" in r:  # loss on the completion (and its EOS) only
                    completion = self.tokenizer(r["target"], add_special_tokens=False)["input_ids"] + eos
                else:  # plain text: every token is a target
                    prompt, completion = [], prompt + eos
                ids, labels = _truncate_for_training(prompt, completion, self.max_length)
            examples.append({"index": r["index"], "input_ids": ids, "labels": labels, "length": len(ids)})
        return examples

    def _messages(self, messages: list, row: int) -> list[dict]:
        """A row's messages checked, each {"role", "content"} (and any other key the template reads)."""
        if self.chat is None:
            raise ConfigError(f"row {row} holds chat messages, but model.chat_template is false; chats need a chat "
                              "template (model.chat_template: true, or a Jinja template)")
        if not messages:
            raise InputDataError(f"row {row}: no messages; a conversation needs at least one")
        checked = []
        for k, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise InputDataError(f"row {row}, message {k}: expected {{\"role\": ..., \"content\": \"text\"}}, "
                                     f"got {str(message)[:80]}")
            checked.append({key: value for key, value in message.items() if value is not None})  # Arrow fills gaps
        return checked

    def _conversation(self, messages: list[dict], row: int) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation, labels on its assistant turns only. Each piece is tokenized apart, as
        predict tokenizes the prompt apart from what it generates."""
        ids, labels = [], []
        for text, assistant in self.chat.segments(self.tokenizer, messages, row):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if assistant else [IGNORE] * len(piece)
        if all(label == IGNORE for label in labels):
            raise InputDataError(f"row {row}: no assistant message to learn from; a training conversation needs one")
        if len(ids) > self.max_length:  # the end goes: the turns kept still follow what came before them
            log.warning("row %d: conversation of %d tokens cut to %d (model.max_length)", row, len(ids),
                        self.max_length)
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

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

    def pack(self, examples: list[dict]) -> PackedBatch:
        """Training examples in one packed row; labels become each example's own shifted targets."""
        return pack_causal(examples)


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
