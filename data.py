"""
The data side of the transfer experiment: GSM8K and MetaMathQA, the official prompts, tokenisation with labels,
batching, and GSM8K answer extraction and scoring.

Training follows the official Trans-PEFT recipe (MetaMath's): an Alpaca prompt, the response plus EOS supervised,
the prompt masked out of the loss:

    input  = tokens(PROMPT.format(question)) + tokens(" " + response) + [EOS]
    labels = [-100] * len(prompt tokens)      + tokens(" " + response) + [EOS]

The labels come from the lengths of the two parts, never from matching pad values (the pad id is often the EOS id,
so matching would mask the EOS the model must learn to emit). The space between "### Response:" and the response
is ours: the evaluation prompt continues "### Response: Let's think step by step.", and training on the same
spacing keeps the two consistent.

Scoring: a completion is correct if the number it gives equals the number after "#### " in the gold answer. The
number is found by the first of three rules that finds one:
    official  the first number after the last "The answer is: " (Trans-PEFT's math_infer/gsm8k_infer.py, whose
              MetaMathQA-trained models end that way), rounded to an integer as that script does;
    gsm8k     the number after "#### " (the GSM8K answer format);
    last      the last number in the completion (LLM-Adapters' rule).
Numbers may carry a sign, a "$", thousands commas ("1,234") and decimals; "a/b" is a fraction. A comma not
followed by three digits ends a number ("72, altogether" is 72), so lists are never glued into one number.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

IGNORE_INDEX = -100  # label of a position that carries no loss (F.cross_entropy's default ignore_index)

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
EVAL_SUFFIX = " Let's think step by step."
STOP_STRINGS = ["Instruction:", "Instruction", "Response:", "Response"]  # the official evaluation's stop list


def train_prompt(question: str) -> str:
    return PROMPT.format(instruction=question)


def eval_prompt(question: str) -> str:
    return PROMPT.format(instruction=question) + EVAL_SUFFIX


# -----------------------------------------------------------------------------------------------------------
# Loading: every source becomes a list of {"question", "answer"} in GSM8K's format, or {"question", "response"}


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"Reading {path} needs pyarrow (pip install pyarrow), or pass the data as .jsonl.") from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json or .parquet.")


def _normalise(record: dict, source: str) -> dict:
    """GSM8K {question, answer}, MetaMathQA {query, response} or Alpaca {instruction, input, output} -> ours."""
    if "question" in record and "answer" in record:
        return {"question": record["question"], "answer": record["answer"]}
    if "query" in record and "response" in record:
        return {"question": record["query"], "response": record["response"]}
    if "instruction" in record and "output" in record:
        question = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        return {"question": question, "response": record["output"]}
    raise ValueError(f"{source}: a record has fields {sorted(record)}; expected question/answer (GSM8K), "
                     "query/response (MetaMathQA) or instruction/output (Alpaca).")


def _hub_file(repo_id: str, filename: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as e:
        raise OSError(f"Could not get {what} from the Hugging Face hub ({type(e).__name__}): pass a local file path "
                      "instead (e.g. GSM8K's train.jsonl / test.jsonl), or set HF_HUB_OFFLINE=1 to use the hub cache.") from None


def load_examples(source: str, split: str = "train", max_samples: int | None = None) -> list[dict]:
    """Examples from "gsm8k" (hub openai/gsm8k, config main), "metamath" (hub meta-math/MetaMathQA) or a local
    .jsonl/.json/.parquet file; the first max_samples of them (the official recipe takes MetaMathQA's first 100,000)."""
    if source == "gsm8k":
        path = _hub_file("openai/gsm8k", f"main/{split}-00000-of-00001.parquet", f"GSM8K's {split} split")
    elif source == "metamath":
        path = _hub_file("meta-math/MetaMathQA", "MetaMathQA-395K.json", "MetaMathQA")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist: give gsm8k, metamath or the path of a .jsonl/.json/.parquet file.")
    records = _read_records(path)
    if max_samples is not None:
        records = records[:max_samples]
    if not records:
        raise ValueError(f"{source} holds no examples: nothing to train or evaluate on.")
    return [_normalise(r, source) for r in records]


# -----------------------------------------------------------------------------------------------------------
# Answers


# A minus sign only when it touches the digits and follows no word character ("-3", "= -3", "(-3)" are negative;
# "10-20" and "16 - 3" give no negative number), an optional "$", the integer part with proper thousands commas or
# plain digits, decimals, and an optional "/denominator".
NUMBER = re.compile(r"(?:(?<![\w)])(-))?\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:\s?/\s?(\d+))?")


def _value(match: re.Match) -> float:
    sign, number, denominator = match.groups()
    value = float(number.replace(",", ""))
    if denominator is not None:
        value = value / float(denominator) if float(denominator) != 0 else value
    return -value if sign else value


def gold_answer(answer_text: str) -> float:
    """The number after the last "#### " of a GSM8K answer (commas removed)."""
    if "#### " not in answer_text:
        raise ValueError(f"Not a GSM8K answer (no '#### '): {answer_text[-80:]!r}")
    match = NUMBER.search(answer_text.rsplit("#### ", 1)[1])
    if match is None:
        raise ValueError(f"No number after '#### ' in: {answer_text[-80:]!r}")
    return _value(match)


def gsm8k_response(answer_text: str) -> str:
    """A GSM8K answer as a training response in MetaMathQA's style: calculator annotations <<...>> removed, the final
    '#### N' line replaced by 'The answer is: N', so that a GSM8K-trained model ends the way the official scorer reads."""
    reasoning, final = answer_text.rsplit("#### ", 1)
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return f"{reasoning}\nThe answer is: {final.strip()}"


def extract_answer_with_rule(completion: str) -> tuple[float | None, str | None]:
    """(number, rule) from the first rule that finds one: official, gsm8k, last; (None, None) if none does."""
    if "The answer is: " in completion:
        match = NUMBER.search(completion.rsplit("The answer is: ", 1)[1])
        if match:
            return float(round(_value(match))), "official"
    if "#### " in completion:
        match = NUMBER.search(completion.rsplit("#### ", 1)[1])
        if match:
            return _value(match), "gsm8k"
    matches = list(NUMBER.finditer(completion))
    if matches:
        return _value(matches[-1]), "last"
    return None, None


def extract_answer(completion: str) -> float | None:
    """The number a completion answers with (see extract_answer_with_rule), or None."""
    return extract_answer_with_rule(completion)[0]


def is_correct(completion: str, gold_answer_text: str) -> bool:
    """True iff the completion's number equals the gold answer's '#### N' (numerically, to 1e-6)."""
    predicted = extract_answer(completion)
    return predicted is not None and abs(predicted - gold_answer(gold_answer_text)) < 1e-6


# -----------------------------------------------------------------------------------------------------------
# Tokenisation and batching


def target_text(example: dict) -> str:
    """What the model learns to write: a MetaMathQA response as is, a GSM8K answer restyled (gsm8k_response)."""
    return example["response"] if "response" in example else gsm8k_response(example["answer"])


def tokenize_example(example: dict, tokenizer, max_len: int, prompt_fn=train_prompt) -> dict | None:
    """input_ids and labels for one example, truncated to max_len; None if no supervised token survives."""
    prompt = tokenizer.encode(prompt_fn(example["question"]))
    answer = tokenizer.encode(" " + target_text(example), bos=False) + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_dataset(examples: list[dict], tokenizer, max_len: int, prompt_fn=train_prompt) -> tuple[list[dict], int]:
    """Tokenised examples, and how many were dropped because the prompt alone fills max_len."""
    out = [tokenize_example(e, tokenizer, max_len, prompt_fn) for e in examples]
    kept = [t for t in out if t is not None]
    return kept, len(out) - len(kept)


def collate(batch: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels), each (B, T). Padding sits after every real token, so causal attention never
    lets a real token see it and no attention mask is needed; its labels are IGNORE_INDEX."""
    T = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        labels[i, : len(b["labels"])] = torch.tensor(b["labels"])
    return ids, labels
