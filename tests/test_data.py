"""data.py: GSM8K gold answers and answer extraction (on the real files where ../shared/gsm8k exists, and on tricky
hand-written completions), labels built from lengths, loading errors."""

import json
import re
from pathlib import Path

import pytest

from test_tokenizer import write_checkpoint_tokenizer
from data import (IGNORE_INDEX, collate, extract_answer, extract_answer_with_rule, gold_answer, gsm8k_response, is_correct,
                  load_examples, official_prediction, tokenize_example, train_prompt)

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


def openai_reference(answer: str) -> float:
    """grade-school-math's own parser (dataset.py): ANS_RE = '#### (\\-?[0-9\\.\\,]+)', commas removed."""
    return float(re.search(r"#### (\-?[0-9\.\,]+)", answer).group(1).strip().replace(",", ""))


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/gsm8k is absent")
def test_every_real_gold_answer_parses_and_scores():
    examples = load_examples(str(GSM8K / "train.jsonl")) + load_examples(str(GSM8K / "test.jsonl"))
    assert len(examples) == 7473 + 1319
    for e in examples:
        gold = gold_answer(e["answer"])
        assert gold == openai_reference(e["answer"])
        assert is_correct(e["answer"], e["answer"], "lenient")  # the reference solution itself, by the '#### ' rule
        assert not is_correct(e["answer"], e["answer"], "official")  # the official rule reads "The answer is: " only
        response = gsm8k_response(e["answer"])  # and restyled for training, by the official rule
        assert "<<" not in response and extract_answer_with_rule(response) == (gold, "official")


@pytest.mark.parametrize("completion,expected,rule", [
    ("18 + 54 = 72, altogether", 72, "last"),
    ("So she pays $1,234.50 in total.", 1234.5, "last"),
    ("He ends with -3 degrees.", -3, "last"),
    ("I do not know.", None, None),
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars", 18, "last"),  # subtraction is not a negative sign
    ("from 10-20 pages", 20, "last"),
    ("counts 1,2,3 then 45.", 45, "last"),  # a list is not glued into 123
    ("The answer is: 1,000", 1000, "official"),
    ("The answer is: 2.5 hours, or 150 minutes", 2, "official"),  # rounded as the official script does (round(2.5) = 2)
    ("The answer is: $18.\nInstruction", 18, "official"),
    ("Work: 3 + 4 = 7\n#### 7", 7, "gsm8k"),
    ("#### 18 eggs, 3 left over", 18, "gsm8k"),  # the first number after the last "#### ", not the last one
    ("The answer is: 5 apples. #### 6", 5, "official"),  # the official rule comes first
    ("The answer is: none. So 12 left", 12, "official"),  # official: the first number anywhere after the marker
    ("So 12 are left. The answer is: none", 12, "last"),  # no number after the marker: fall through
])
def test_tricky_completions(completion, expected, rule):
    assert extract_answer_with_rule(completion) == ((None if expected is None else float(expected)), rule)


def test_lenient_scorer_compares_numbers_against_the_gold_marker():
    gold = "She has 2 + 70 = <<2+70=72>>72 clips.\n#### 72"
    assert is_correct("... 72, altogether", gold, "lenient") and is_correct("The answer is: 72.00", gold, "lenient")
    assert not is_correct("The answer is: 27", gold, "lenient") and not is_correct("no idea", gold, "lenient")
    assert is_correct("a loss of -3", "#### -3", "lenient") and is_correct("it costs $1,234", "#### 1,234", "lenient")
    assert extract_answer("The answer is: 3/4") == 1.0  # fractions are divided, then rounded by the official rule


class WordTokenizer:
    """A stand-in with the interface of model.Tokenizer: one id per whitespace-separated word; pad == EOS == 0."""

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


# The official scorer, from its definition (Trans-PEFT math_infer/gsm8k_infer.py extract_answer_number + grader.py
# math_equal): the text after the LAST "The answer is: ", stripped; the first match of [\-+]?\d*[\.,/]?\d+; "a/b"
# -> round(a/b) (b "0" -> round(a)); else round(float(match without commas)), Python's half-to-even round; correct
# iff pred == gold or isclose(x, pred, rel_tol=1e-4) for x in (gold/100, gold, gold*100).
@pytest.mark.parametrize("completion, gold, official, lenient", [
    ("The answer is: 72", 72, True, True),
    ("The answer is: 1,234,567", 1234567, False, True),  # one separator only: reads 1,234
    ("The answer is: 1,234,567", 1234, True, False),
    ("The answer is: 12,5", 125, True, False),  # a comma anywhere is a thousands separator
    ("The answer is: .5", 0, True, False),  # round(0.5) == 0 (half to even)
    ("The answer is: 2.5", 2, True, True),  # both round after "The answer is: "
    ("The answer is: 3.5", 4, True, True),
    ("The answer is: 1 / 2", 1, True, False),  # the spaces end the match at "1"
    ("The answer is: 3/4", 1, True, True),
    ("The answer is: 7/0", 7, True, True),  # a zero denominator: the numerator, rounded
    ("The answer is: 5000", 50, True, False),  # a percentage form: gold * 100
    ("The answer is: 3", 300, True, False),  # gold / 100
    ("The answer is: 0.5", 50, False, False),  # rounded to 0 first
    ("The answer is: 123460", 123456, True, False),  # within rel_tol 1e-4 of a large answer
    ("The answer is: 123470", 123456, False, False),
    ("The answer is: 73", 72, False, False),
    ("The answer is: 5. No wait. The answer is: 7", 7, True, True),  # the last phrase counts
    ("The answer is: -3", -3, True, True),
    ("The answer is: +4", 4, True, True),
    ("The answer is: $18", 18, True, True),
    ("So the total is 72.\n#### 72", 72, False, True),  # no "The answer is: ": wrong, officially
    ("The answer is: seventy-two", 72, False, False),
    ("The answer is:72", 72, False, True),  # the phrase needs its space
])
def test_official_and_lenient_scorers(completion, gold, official, lenient):
    gold_text = f"reasoning\n#### {gold:,}"
    assert is_correct(completion, gold_text, "official") == official
    assert is_correct(completion, gold_text, "lenient") == lenient


def test_official_prediction_is_an_integer_or_none():
    assert official_prediction("The answer is: 3/4") == 1 and isinstance(official_prediction("The answer is: 2.6"), int)
    assert official_prediction("no phrase 42") is None and official_prediction("The answer is: 5/00") is None
    with pytest.raises(ValueError, match="Unknown scorer"):
        is_correct("The answer is: 1", "#### 1", "strict")


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
    from checkpoint import load_tokenizer

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
