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
from lit_fast.tasks.codecs import IGNORE
from lit_fast.tasks.metrics import LANGUAGE_MODEL_MODES, Perplexity

log = logging.getLogger(__name__)


class Generator(LitTransformer):
    """What causal and seq2seq tasks share: generation settings, stop strings, LoRA, attention policy, perplexity."""

    metric_modes = LANGUAGE_MODEL_MODES
    # causal LMs (True) predict token t+1 at t: the model shifts the labels, so the first is never a target
    shifts_labels = False

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

    def test_step(self, batch: dict, batch_idx: int) -> None:
        with sdpa_policy(self.sdpa_backends):
            super().test_step(batch, batch_idx)

    # ---- metrics ---------------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        return {"perplexity": Perplexity()}

    def evaluate_batch(self, batch: dict) -> dict:
        loss = self.compute_loss(batch)  # transformers' mean over the batch's target tokens
        labels = batch["labels"][:, 1:] if self.shifts_labels else batch["labels"]
        return {"loss": loss, "perplexity": (loss, (labels != IGNORE).sum())}

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

    def generate(self, prompts, batch_size: int = 32, *, device: Optional[str] = None, precision: str = "auto",
                 num_workers: Optional[int] = None) -> list[str]:
        """Generate a continuation of each prompt in this process, no Trainer: one string per prompt, in order (a
        chat's `messages` list is a prompt too). The same batching, decoding loop and precision choice as
        `lit-fast predict` (tasks/in_memory.py); sampling and length as the model's settings say."""
        from lit_fast.tasks.in_memory import predict_rows

        rows = predict_rows(self, prompts, batch_size=batch_size, device=device, precision=precision,
                            num_workers=num_workers)
        return [r["generated_text"] for r in rows]

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
