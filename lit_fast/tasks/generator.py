"""What the generating tasks share (CausalLM in causal_lm.py, Seq2SeqLM in seq2seq.py): generation settings, stop
strings, LoRA / QLoRA, the SDPA kernel policy, and turning new tokens into output rows."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from lit_fast.errors import ConfigError
from lit_fast.fastpath.decoder.loop import SamplingConfig
from lit_fast.fastpath.decoder.sdpa import (
    check_attention_implementation,
    check_sdpa_backends,
    parse_sdpa_backends,
    sdpa_policy,
)
from lit_fast.models.lora import LoraSettings, apply_lora, export_lora
from lit_fast.tasks.base import LitTransformer, position_limit

log = logging.getLogger(__name__)


class Generator(LitTransformer):
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
                from lit_fast.models.qlora import prepare_qlora

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
            from lit_fast.models.qlora import export_qlora

            export_qlora(self.model, directory, self.lora.export)
        else:
            export_lora(self.model, directory, self.lora.export)
        self.tokenizer.save_pretrained(directory)



def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to (not including) the first stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _head_dim(config) -> int:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    return int(getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
