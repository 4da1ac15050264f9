"""data.py: labels built from lengths, loading errors, the official training data path (prompts and tokenisation)."""

import json
from pathlib import Path

import pytest

from test_tokenizer import write_checkpoint_tokenizer
from data import IGNORE_INDEX, collate, load_examples, tokenize_example, train_prompt

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


class WordTokenizer:
    """A stand-in with the interface of bases.Tokenizer: one id per whitespace-separated word; pad == EOS == 0."""

    eos_token_id = pad_token_id = 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text, bos=None):
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]


def test_labels_come_from_lengths_and_keep_eos_when_pad_is_eos():
    tok = WordTokenizer()
    example = {"question": "What is 2 plus 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
    t = tokenize_example(example, tok, max_len=512)
    n_prompt = len(tok.encode(train_prompt(example)))
    assert t["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert t["labels"][n_prompt:] == t["input_ids"][n_prompt:] and t["labels"][-1] == tok.eos_token_id
    short = tokenize_example({"question": "Hi?", "response": "Yes. The answer is: 1"}, tok, max_len=512)
    ids, labels = collate([t, short], pad_id=tok.pad_token_id)
    # the EOS (id 0, like the padding) stays supervised; the padding after it does not
    assert labels[1, len(short["labels"]) - 1] == 0 and (labels[1, len(short["labels"]):] == IGNORE_INDEX).all()
    assert tokenize_example(example, tok, max_len=n_prompt) is None  # the prompt alone fills max_len


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(str(tmp_path / "empty.jsonl"))
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"fields \['text'\]; expected question/answer"):
        load_examples(str(tmp_path / "odd.jsonl"))
    (tmp_path / "meta.json").write_text(json.dumps([{"query": "q1", "response": "r1"}, {"query": "q2", "response": "r2"}]))
    assert load_examples(str(tmp_path / "meta.json"), max_samples=1) == [{"question": "q1", "instruction": "q1", "input": "", "response": "r1"}]


# -----------------------------------------------------------------------------------------------------------
# The official training data path (Trans-PEFT training_utils.py: SupervisedDataset, preprocess), written here from
# its definition, against ours.

OFFICIAL_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Response:")
OFFICIAL_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                  "Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
# MetaMathQA-style records: one-line GSM queries, MATH queries over several lines, a query ending in a newline.
METAMATH = [
    {"query": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
     "response": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10\nThe answer is: 10"},
    {"query": "What is the value of $x$ in the figure below?\n[asy]\ndraw((0,0)--(1,1));\nlabel(\"$x$\",(0.5,0.5));\n[/asy]",
     "response": "The line has slope 1, so $x = 45$.\nThe answer is: 45"},
    {"query": "Compute the sum:\n$$1 + 2 + 3 + \\cdots + 10.$$", "response": "This is $\\frac{10 \\cdot 11}{2} = 55$.\nThe answer is: 55"},
    {"query": "Find $x$ such that $2x + 3 = 11$.\n", "response": "Subtracting 3 gives $2x = 8$, so $x = 4$.\nThe answer is: 4"},
]


def official_source(record: dict) -> str:
    if "instruction" in record:  # Alpaca records are used as they are
        example = record
    else:
        query = record["query"]
        example = {"instruction": query.split("\n")[0], "input": "" if query.find("\n") == -1 else "\n".join(query.split("\n")[1:])}
    return OFFICIAL_INPUT.format_map(example) if example.get("input", "") != "" else OFFICIAL_NO_INPUT.format_map(example)


def official_preprocess(hf_tokenizer, record: dict, max_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels as the official collator makes them (pad id aside): source + response + eos_token tokenised
    as one string with truncation; the first len(tokens(source)) labels -100."""
    source = official_source(record)
    target = record.get("response", record.get("output")) + hf_tokenizer.eos_token
    ids = hf_tokenizer(source + target, max_length=max_len, truncation=True)["input_ids"]
    n_source = len(hf_tokenizer(source, max_length=max_len, truncation=True)["input_ids"])
    return ids, [IGNORE_INDEX] * min(n_source, len(ids)) + ids[n_source:]


def test_metamath_queries_split_into_instruction_and_input_as_official(tmp_path):
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}, {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = tmp_path / "metamath.json"
    path.write_text(json.dumps(METAMATH))
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    examples = load_examples(str(path)) + load_examples(str(tmp_path / "alpaca.json"))
    prompts = [train_prompt(e) for e in examples]
    assert prompts == [official_source(r) for r in METAMATH + alpaca]
    assert [("### Input:" in p) for p in prompts] == [False, True, True, False, True, False]  # "...\n" alone has no input
    assert prompts[1].endswith("### Instruction:\nWhat is the value of $x$ in the figure below?\n\n### Input:\n[asy]\n"
                               "draw((0,0)--(1,1));\nlabel(\"$x$\",(0.5,0.5));\n[/asy]\n\n### Response:")


def test_tokenisation_matches_the_official_preprocess(tmp_path):
    """Prompt and response tokenised as one string, the prompt's token count masked: ids and labels equal the
    official ones computed with transformers' tokenizer, including where that differs from tokenising the parts apart."""
    transformers = pytest.importorskip("transformers")
    from bases import load_tokenizer

    texts = [official_source(r) + r["response"] for r in METAMATH]
    write_checkpoint_tokenizer(tmp_path, "qwen2", post="bytelevel", corpus=texts * 5, vocab_size=700)  # Qwen2's pipeline: "Response:The" is one pre-token
    ours = load_tokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>")
    examples = load_examples(_write(tmp_path / "m.json", METAMATH))
    apart = 0
    for record, example in zip(METAMATH, examples):
        prompt = ours.encode(train_prompt(example))
        for max_len in (512, len(prompt) + 3):  # the second cuts the response (and its EOS) off
            t = tokenize_example(example, ours, max_len)
            ids, labels = official_preprocess(hf, record, max_len)
            assert (t["input_ids"], t["labels"]) == (ids, labels)
        # a prompt that fills max_len: no supervised token (the official code keeps such an example, this one drops it)
        assert tokenize_example(example, ours, len(prompt)) is None
        assert set(official_preprocess(hf, record, len(prompt))[1]) == {IGNORE_INDEX}
        apart += ours.encode(train_prompt(example) + example["response"]) != prompt + ours.encode(example["response"])
    assert apart > 0  # the boundary matters with this tokenizer: ":" merged into the response's first word


def _write(path: Path, records: list[dict]) -> str:
    path.write_text(json.dumps(records))
    return str(path)
