"""load_tokenizer against transformers' AutoTokenizer on tokenizers built here: the checkpoint's own files decide the
special tokens (Qwen2 adds none, Llama 3 <|begin_of_text|> once, Llama 2-style and InternLM2 <s>, a Llama-architecture
model whose files add nothing, nothing); a SentencePiece-only tokenizer.model against sentencepiece itself; EOS and
the end ids of generation_config.json."""

import json
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from bases import load_model, load_tokenizer

TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n#### 72"
# Qwen2's pre-tokenizer split: one non-letter may lead a word (so "Response:The" is one pre-token), digits one by one.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "llama": ["<|begin_of_text|>", "<|end_of_text|>"],
            "internlm2": ["<unk>", "<s>", "</s>"]}


def write_checkpoint_tokenizer(path, model_type, post_bos=False, tokenizer_config=None, config_extra=None, post=None, extra_specials=(),
                               corpus=None, vocab_size=400):
    """A byte-level BPE tokenizer.json (as Qwen2 and Llama 3 use, 400 tokens) trained on a few sentences, plus a
    config.json naming the family unless the directory already has one. post="bytelevel": Qwen2's post-processor
    (adds nothing); post_bos: a template that prepends the family's first special token."""
    tok = Tokenizer(models.BPE())
    if model_type == "qwen2":  # Qwen2's pipeline (REFERENCE.md 5), which transformers' Qwen2Tokenizer rebuilds whatever the file says
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if post == "bytelevel":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = SPECIALS[model_type] + [t for t in extra_specials if t not in SPECIALS[model_type]]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or [TEXT, "The quick brown fox jumps over the lazy dog. 1234567890 $%&"] * 3, trainer)
    if post_bos:  # Llama 3's tokenizer.json prepends <|begin_of_text|> in its post-processor
        bos = {"llama": "<|begin_of_text|>", "internlm2": "<s>"}[model_type]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if not (path / "config.json").exists():  # beside a model checkpoint, keep the model's config.json
        (path / "config.json").write_text(json.dumps({"model_type": model_type, **(config_extra or {})}))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tok


TEXTS = [TEXT, "Hello", " leading space and  two", "<|im_start|>a<|im_end|>", ""]


def assert_ids_as_transformers(path, texts=TEXTS):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    for text in texts:
        assert ours.encode(text) == ref(text)["input_ids"], text
    return ours


def test_qwen2_adds_nothing_and_ends_with_endoftext(tmp_path):
    """Qwen2: a ByteLevel post-processor (nothing added), tokenizer_config saying add_bos_token false."""
    raw = write_checkpoint_tokenizer(tmp_path, "qwen2", post="bytelevel",
                                     tokenizer_config={"add_bos_token": False, "bos_token": None, "eos_token": "<|endoftext|>"})
    tok = assert_ids_as_transformers(tmp_path)
    assert tok.encode(TEXT) == raw.encode(TEXT, add_special_tokens=False).ids and tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_token_id == raw.token_to_id("<|endoftext|>") == tok.pad_token_id


def test_llama3_bos_from_its_post_processor_exactly_once(tmp_path):
    raw = write_checkpoint_tokenizer(tmp_path, "llama", post_bos=True,
                                     tokenizer_config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    tok = assert_ids_as_transformers(tmp_path)
    bos = raw.token_to_id("<|begin_of_text|>")
    assert tok.encode(TEXT)[0] == bos and tok.encode(TEXT).count(bos) == 1
    assert tok.eos_token_id == raw.token_to_id("<|end_of_text|>") and tok.decode(tok.encode(TEXT)) == TEXT


def test_llama_architecture_whose_files_add_nothing(tmp_path):
    """A Llama-architecture checkpoint with a GPT-2-style BPE, <|im_start|> as its BOS token, no add_bos_token key and
    a post-processor that adds nothing (as SmolLM's): no BOS, whatever Llama 3 does."""
    write_checkpoint_tokenizer(tmp_path, "llama", post="bytelevel", extra_specials=["<|im_start|>", "<|im_end|>"],
                               tokenizer_config={"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    tok = assert_ids_as_transformers(tmp_path)
    assert tok.bos_token_id not in tok.encode(TEXT)


def test_llama2_style_sentencepiece_derived_tokenizer_json_adds_s(tmp_path):
    """A Llama 2-style tokenizer.json (Metaspace-like normaliser, byte fallback, a template adding <s>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator([TEXT] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                                 "bos_token": "<s>", "eos_token": "</s>"}))
    # Texts of the training corpus's characters only (this small vocabulary has no byte-fallback pieces), and none
    # starting with a space: transformers 5 rebuilds a LlamaTokenizer's normaliser, and there " April" loses one "▁"
    # that tokenizer.json's own normaliser keeps (a known difference, docs/models.md).
    ours = assert_ids_as_transformers(tmp_path, [TEXT, "sold clips", "sold  clips"])
    assert ours.encode("sold")[0] == 1 and ours.eos_token_id == 2


def test_internlm2_tokenizer_json_adds_s(tmp_path):
    raw = write_checkpoint_tokenizer(tmp_path, "internlm2", post_bos=True, config_extra={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
                                     tokenizer_config={"bos_token": "<s>", "eos_token": "</s>"})
    tok = assert_ids_as_transformers(tmp_path)
    assert tok.encode(TEXT)[0] == raw.token_to_id("<s>") == 1
    assert tok.eos_token_id == raw.token_to_id("</s>") == 2 and tok.pad_token_id == 2


def test_sentencepiece_only_checkpoint(tmp_path):
    """internlm/internlm2-7b ships only tokenizer.model: a real SentencePiece BPE model, trained here, gives through
    load_tokenizer exactly sentencepiece's own ids, with InternLM2's <s> first (its tokenizer's add_bos_token default)
    or as tokenizer_config.json says."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is a requirement (requirements.txt), which CI "
                              "installs: this skips only where it was left out")
    corpus = [TEXT, "The quick brown fox jumps over the lazy dog. 1234567890 $%&", "Ünïcödé and emoji 🙂 stay byte-exact."] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internlm2", "bos_token_id": 1, "eos_token_id": 2}))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load_tokenizer(tmp_path)
    texts = TEXTS + ["Ünïcödé and emoji 🙂 stay byte-exact.", "unseen: ЖЖЖ 漢字"]
    for text in texts:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (1, 2, 400)
    assert tok.token_to_id("<|im_start|>") == 3 and 3 in tok.encode("<|im_start|>")  # a user-defined piece stays whole
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True, "eos_token": "</s>"}))
    assert load_tokenizer(tmp_path).encode("Hello") == sp.encode("Hello") + [2]


def test_generation_stops_at_any_end_id_of_generation_config(world):
    """generation_config.json's eos_token_id may be a list: decoding stops at whichever comes first."""
    from eval import generate

    model, tok = load_model(world["old"]), load_tokenizer(world["old"])
    first = generate(model, tok, ["What is 2 plus 3?"], max_new_tokens=4, stop_strings=[])[0]
    first_id = tok.encode(first)[0]
    assert first and first_id != tok.eos_token_id
    (Path(world["old"]) / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, first_id]}))
    tok = load_tokenizer(world["old"])
    assert tok.stop_ids == {tok.eos_token_id, first_id}
    assert generate(model, tok, ["What is 2 plus 3?"], max_new_tokens=4, stop_strings=[])[0] == ""


def test_missing_tokenizer_is_explained(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internlm2"}))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path)
