"""
The data side of the transfer experiment: GSM8K, MetaMathQA and MATH, the official prompts, tokenisation with
labels, batching. (scoring.py reads the answers.)

Training follows the official Trans-PEFT code (training_utils.py: SupervisedDataset, preprocess) byte for byte: a
MetaMathQA query is split at its first newline into an instruction and an input; an example with an input gets
Alpaca's with-input prompt (PROMPT_INPUT), one without the no-input prompt (PROMPT); the response follows
"### Response:" directly (no space) and ends with EOS; the prompt and the response are tokenised as ONE string,
and its first len(tokens(prompt)) tokens are masked out of the loss:

    ids    = tokens(prompt + response) + [EOS], cut to max_len
    labels = ids with the first len(tokens(prompt)) positions set to -100

Tokenising the two parts together matters with byte-level BPE: the prompt's last ":" and the response's first
word form one pre-token (":The"), so the joint ids are not the two parts' ids side by side. The labels come from
the prompt's length, never from matching pad values (the pad id is often the EOS id, and matching would mask the
EOS the model must learn to emit). Two details of the official code are not reproduced (docs/differences.md): its
collator pads with id 2 and derives both the prompt length and the attention mask from `!= 2`, so a prompt token with
id 2 shortens the masked span and such tokens are hidden from attention; and an example whose prompt fills max_len
is kept there with no supervised token, dropped here.

The evaluation prompt (eval_prompt) and stop strings are here; the evaluation sets, one entry per task, in tasks.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from bases import is_main_process, read_json
from scoring import gold_answer

IGNORE_INDEX = -100  # label of a position that carries no loss (F.cross_entropy's default ignore_index)

# Alpaca's two prompts, as in the official training_utils.py PROMPT_DICT.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
EVAL_SUFFIX = " Let's think step by step."
STOP_STRINGS = ["Instruction:", "Instruction", "Response:", "Response"]  # the official evaluation's stop list


def split_query(query: str) -> tuple[str, str]:
    """A MetaMathQA query as the official code reads it: (first line, the remaining lines; "" without a newline)."""
    instruction, _, rest = query.partition("\n")
    return instruction, rest


def train_prompt(example: dict) -> str:
    """The training prompt of an example: with-input where it has a non-empty input, else no-input."""
    if example.get("input"):
        return PROMPT_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT.format(instruction=example.get("instruction", example["question"]))


def eval_prompt(question: str) -> str:
    return PROMPT.format(instruction=question) + EVAL_SUFFIX


# -----------------------------------------------------------------------------------------------------------
# Loading: every source becomes a list of {"question", "answer"} in GSM8K's format, or of
# {"question", "instruction", "input", "response"} (MetaMathQA, Alpaca)


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) for every record of a data file; where names the file and the line (or record number)."""
    if path.suffix == ".jsonl":
        records = []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise ValueError(f"{path}, line {line} is not UTF-8 text ({e.reason}): save the file as UTF-8.") from None
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{path}, line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n} is not valid JSON ({e.msg}): fix or remove that "
                                     "line.") from None
        return records
    if path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}; a .json data file must hold a list of "
                             "records (or use .jsonl, one record per line).")
        return [(f"{path}, record {i}", r) for i, r in enumerate(data)]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"Reading {path} needs pyarrow (pip install -r requirements.txt), or pass the data as "
                             ".jsonl.") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's own error types for a truncated or foreign file
            raise ValueError(f"{path} is not a readable parquet file ({str(e)[:120]}).") from None
        return [(f"{path}, row {i}", r) for i, r in enumerate(rows)]
    raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json or .parquet.")


def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not text.")
    return value


def _normalise(record, where: str) -> dict:
    """GSM8K {question, answer}, MetaMathQA {query, response} or Alpaca {instruction, input, output} -> ours, checked:
    the fields are text and a GSM8K answer ends in '#### <number>'."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not a record (an object with question/answer "
                         "fields).")
    if "question" in record and "answer" in record:
        answer = _text(record, "answer", where)
        try:
            gold_answer(answer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return {"question": _text(record, "question", where), "answer": answer}
    if "query" in record and "response" in record:
        query = _text(record, "query", where)
        instruction, extra = split_query(query)
        response = _text(record, "response", where)
        return {"question": query, "instruction": instruction, "input": extra, "response": response}
    if "instruction" in record and "output" in record:
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where) if record.get("input") is not None else ""
        question = instruction + ("\n" + extra if extra else "")
        response = _text(record, "output", where)
        return {"question": question, "instruction": instruction, "input": extra, "response": response}
    raise ValueError(f"{where} has fields {sorted(record)}; expected question/answer (GSM8K), "
                     "query/response (MetaMathQA) or instruction/output (Alpaca).")


def _hub_file(repo_id: str, filename: str, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as e:
        raise OSError(f"Could not get {what} from the Hugging Face hub ({type(e).__name__}): pass a local file path "
                      "instead (e.g. GSM8K's train.jsonl / test.jsonl), or set HF_HUB_OFFLINE=1 to use the hub "
                      "cache.") from None


def load_examples(source: str, split: str = "train", max_samples: int | None = None) -> list[dict]:
    """Examples from "gsm8k" (hub openai/gsm8k, config main), "metamath" (hub meta-math/MetaMathQA) or a local
    .jsonl/.json/.parquet file; the first max_samples of them (the official recipe takes MetaMathQA's first 100,000).
    Every record used is checked when loaded (a bad one is named by file and line), so that bad data stops a run
    before any compute. (Evaluation sets: tasks.load_eval_sets.)"""
    if source == "gsm8k":
        path = _hub_file("openai/gsm8k", f"main/{split}-00000-of-00001.parquet", f"GSM8K's {split} split")
    elif source == "metamath":
        path = _hub_file("meta-math/MetaMathQA", "MetaMathQA-395K.json", "MetaMathQA")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Data file {path} does not exist: give gsm8k, metamath or the path of a "
                                    ".jsonl/.json/.parquet file.")
    records = _read_records(path)
    if max_samples is not None:
        records = records[:max_samples]
    if not records:
        raise ValueError(f"{source} holds no examples: nothing to train or evaluate on.")
    examples = [_normalise(r, where) for where, r in records]
    return examples


def training_set(examples: list[dict], tokenizer, max_len: int, source: str) -> list[dict]:
    """Examples tokenised (tokenize_dataset); an example whose prompt alone fills max_len is dropped, and the count
    printed."""
    dataset, dropped = tokenize_dataset(examples, tokenizer, max_len)
    if not dataset:
        raise ValueError(f"No training example of {source} fits in --max-len {max_len}: every prompt fills it.")
    if dropped and is_main_process():
        print(f"note: {dropped} of {len(examples)} examples dropped: their prompt alone fills --max-len {max_len}")
    return dataset


def fingerprint(*collections: list[dict]) -> str:
    """The sha256 of the records a run uses, in order: a resumed run compares it with its start's."""
    h = hashlib.sha256()
    for records in collections:
        for r in records:
            h.update(json.dumps(r, sort_keys=True).encode())
    return h.hexdigest()


# -----------------------------------------------------------------------------------------------------------
# Training targets


def gsm8k_response(answer_text: str) -> str:
    """A GSM8K answer as a training response in MetaMathQA's style: calculator annotations <<...>> removed, the final
    '#### N' line replaced by 'The answer is: N', so that a GSM8K-trained model ends the way the official scorer
    reads."""
    reasoning, final = answer_text.rsplit("#### ", 1)
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return f"{reasoning}\nThe answer is: {final.strip()}"


# -----------------------------------------------------------------------------------------------------------
# Tokenisation and batching


def target_text(example: dict) -> str:
    """What the model learns to write: a MetaMathQA response as is, a GSM8K answer restyled (gsm8k_response)."""
    return example["response"] if "response" in example else gsm8k_response(example["answer"])


def tokenize_example(example: dict, tokenizer, max_len: int, prompt_fn=train_prompt) -> dict | None:
    """input_ids and labels for one example (the module docstring's equations), truncated to max_len; None if no
    supervised token survives."""
    prompt = prompt_fn(example)
    ids = (tokenizer.encode(prompt + target_text(example)) + [tokenizer.eos_token_id])[:max_len]
    n_prompt = len(tokenizer.encode(prompt))
    if n_prompt >= len(ids):
        return None
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


def tokenize_dataset(examples: list[dict], tokenizer, max_len: int, prompt_fn=train_prompt) -> tuple[list[dict], int]:
    """Tokenised examples, and how many were dropped because the prompt alone fills max_len."""
    out = [tokenize_example(e, tokenizer, max_len, prompt_fn) for e in examples]
    kept = [t for t in out if t is not None]
    return kept, len(out) - len(kept)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """What model(ids, targets=...) takes: position t predicts token t + 1, so labels (B, T) shifted left, with
    IGNORE_INDEX at the last position."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)


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
