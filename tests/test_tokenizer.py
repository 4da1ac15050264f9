"""load_tokenizer on tokenizer.json files built here with `tokenizers`: round trips and each family's BOS/EOS rules
(REFERENCE.md 5): Qwen2 adds no BOS and ends with <|endoftext|>; Llama 3 starts with <|begin_of_text|> exactly once
(its tokenizer.json post-processor adds one too); InternLM2 uses <s> / </s>."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model import load_tokenizer

TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n#### 72"
SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "llama": ["<|begin_of_text|>", "<|end_of_text|>"],
            "internlm2": ["<unk>", "<s>", "</s>"]}


def write_checkpoint_tokenizer(path, model_type, post_bos=False, tokenizer_config=None, config_extra=None):
    """A byte-level BPE tokenizer.json (as Qwen2 and Llama 3 use, 400 tokens) trained on a few sentences, plus a
    config.json naming the family unless the directory already has one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS[model_type], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "The quick brown fox jumps over the lazy dog. 1234567890 $%&"] * 3, trainer)
    if post_bos:  # Llama 3's tokenizer.json prepends <|begin_of_text|> in its post-processor
        bos = SPECIALS[model_type][0]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if not (path / "config.json").exists():  # beside a model checkpoint, keep the model's config.json
        (path / "config.json").write_text(json.dumps({"model_type": model_type, **(config_extra or {})}))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tok


def test_qwen2_no_bos_and_endoftext_eos(tmp_path):
    raw = write_checkpoint_tokenizer(tmp_path, "qwen2")
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(TEXT)
    assert ids == raw.encode(TEXT).ids  # nothing added
    assert tok.decode(ids) == TEXT
    assert tok.eos_token_id == raw.token_to_id("<|endoftext|>") == tok.pad_token_id


def test_llama3_bos_exactly_once(tmp_path):
    raw = write_checkpoint_tokenizer(tmp_path, "llama", post_bos=True)
    assert raw.encode(TEXT).ids[0] == raw.token_to_id("<|begin_of_text|>")  # the post-processor adds one...
    tok = load_tokenizer(tmp_path)
    ids = tok.encode(TEXT)
    bos = raw.token_to_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1  # ...and encode() still gives exactly one
    assert tok.encode(TEXT, bos=False) == ids[1:]
    assert tok.eos_token_id == raw.token_to_id("<|end_of_text|>")
    assert tok.decode(ids) == TEXT


def test_llama3_matches_transformers_fast_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_checkpoint_tokenizer(tmp_path, "llama", post_bos=True)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode(TEXT) == ref(TEXT)["input_ids"]


def test_internlm2_bos_and_eos(tmp_path):
    raw = write_checkpoint_tokenizer(tmp_path, "internlm2", config_extra={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    tok = load_tokenizer(tmp_path)
    assert tok.encode(TEXT)[0] == raw.token_to_id("<s>") == 1
    assert tok.eos_token_id == raw.token_to_id("</s>") == 2 and tok.pad_token_id == 2
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_tokenizer_config_overrides_family_defaults(tmp_path):
    """Qwen2.5's tokenizer_config.json states add_bos_token false and its eos/pad strings; they win."""
    raw = write_checkpoint_tokenizer(tmp_path, "qwen2", tokenizer_config={"add_bos_token": False, "bos_token": None,
                                                                           "eos_token": "<|im_end|>", "pad_token": {"content": "<|im_start|>"}})
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == raw.token_to_id("<|im_end|>") and tok.pad_token_id == raw.token_to_id("<|im_start|>")
    assert tok.encode("abc") == raw.encode("abc").ids


def test_missing_tokenizer_json_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internlm2"}))
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*SentencePiece"):
        load_tokenizer(tmp_path)
