"""Seq2seq task: encoder-decoder models (T5, BART) - fine-tune on source/target pairs, generate targets in predict.

Generation settings, stop strings, LoRA and the attention policy are shared with CausalLM (generator.py).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import torch
from transformers import AutoModelForSeq2SeqLM

from lit_fast.fastpath.decoder.loop import hf_generate
from lit_fast.models.lora import LoraSettings
from lit_fast.tasks.base import Attention, Packing
from lit_fast.tasks.codecs import Seq2SeqCodec
from lit_fast.tasks.generator import Generator
from lit_fast.tasks.optim import OptimizerName

log = logging.getLogger(__name__)


class Seq2SeqLM(Generator):
    """An encoder-decoder model (T5, BART): fine-tune on source/target pairs; generate targets in predict.

    Generation runs transformers ``generate`` (the fast loop covers decoder-only models).
    """

    auto_model_class = AutoModelForSeq2SeqLM
    needs_target = True
    peft_task_type = "SEQ_2_SEQ_LM"

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
        prefix: str = "",
        max_length: Optional[int] = None,
        max_target_length: int = 128,
        truncation: Literal["left", "error"] = "left",
        lora: Optional[LoraSettings] = None,
        lr: float = 1e-4,
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
        packing: Packing = "auto",
    ):
        """Args:
            pretrained: a local model directory or a hub id (e.g. google-t5/t5-small, facebook/bart-base).
            max_new_tokens: target tokens to generate (at most; stops at EOS).
            do_sample: sample instead of greedy decoding.
            temperature: sampling temperature (> 0).
            top_p: nucleus sampling threshold.
            top_k: keep only the k most likely tokens when sampling.
            seed: makes sampling reproducible.
            stop_strings: cut each output before the first of these strings.
            prefix: text put before every source (T5 task prefixes such as "summarize: ").
            max_length: longest source in tokens; default: the model's.
            max_target_length: longest training target in tokens (longer ones are cut).
            truncation: sources too long: left (keep their end, with a warning) or error.
            lora: LoRA settings; none: full fine-tune.
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
            dtype: weights dtype.
            attention: sdpa, eager or flash_attention_2.
            sdpa_backends: SDPA kernels allowed (flash, efficient, cudnn, math).
            attention_strict: when no allowed SDPA kernel fits, stop (true) or add math (false).
            quantization: bitsandbytes weights; with lora: QLoRA.
            packing: auto (default) and false: padded batches, which is what encoder-decoder models train on here
                (packed rows would need varlen cross-attention and T5's position bias per example; the log says so);
                true: an error.
        """
        super().__init__(
            pretrained, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop_strings=stop_strings, truncation=truncation, lora=lora,
            sdpa_backends=sdpa_backends, attention_strict=attention_strict, revision=revision,
            trust_remote_code=trust_remote_code, dtype=dtype, attention=attention, quantization=quantization,
            max_length=max_length, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
            optimizer=optimizer, optimizer_kwargs=optimizer_kwargs, lr_scheduler=lr_scheduler,
            lr_scheduler_kwargs=lr_scheduler_kwargs, monitor=monitor, packing=packing,
        )
        self._told_hf = False

    def codec(self) -> Seq2SeqCodec:
        return Seq2SeqCodec(self.tokenizer, self.max_length, self.hparams.max_target_length, self.hparams.prefix,
                            self.hparams.truncation)

    def compute_loss(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

    def predict_rows(self, batch: dict) -> list[dict]:
        if not self._told_hf:
            log.info("generation: transformers generate (the fast decoding loop covers decoder-only models)")
            self._told_hf = True
        cfg = self._sampling(batch)
        extra = {"stop_strings": self.stop_strings, "tokenizer": self.tokenizer} if self.stop_strings else {}
        new = hf_generate(self.model, batch["input_ids"], batch["attention_mask"], cfg, **extra)
        return self._rows(batch, new)
