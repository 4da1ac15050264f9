"""
A Hugging Face hub cache on disk, laid out as huggingface_hub writes it, so that the paper's command runs offline
(HF_HUB_OFFLINE=1) on tiny random models:

    <cache>/models--Qwen--Qwen2-7B/refs/main                      the snapshot's commit hash
    <cache>/models--Qwen--Qwen2-7B/snapshots/<hash>/config.json   a symlink into blobs/
    <cache>/models--Qwen--Qwen2-7B/blobs/<sha256>                 the file's content
    <cache>/datasets--openai--gsm8k/snapshots/<hash>/main/test-00000-of-00001.parquet
    <cache>/datasets--meta-math--MetaMathQA/snapshots/<hash>/MetaMathQA-395K.json
    <cache>/datasets--EleutherAI--hendrycks_math/snapshots/<hash>/<subject>/test-00000-of-00001.parquet

The models are Qwen2-architecture checkpoints with random weights and a byte-level BPE tokenizer trained here;
GSM8K comes from ../shared/gsm8k (the real test split, written as the parquet file the hub serves), MetaMathQA in
its real schema (type, query, original_question, response), MATH in the hub's (problem, level, type, solution; a few
problems written here, in each of the seven subjects' files). It needs only the project's requirements (no
transformers): .ci/run builds it in the venv that holds nothing else.

    python tests/fake_hub.py CACHE_DIR        # then HF_HUB_CACHE=CACHE_DIR HF_HUB_OFFLINE=1 python train.py --old qwen2 ...
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import MATH_SUBJECTS  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"
EOS = "<|endoftext|>"
# k_proj and v_proj are 64 wide (4 key/value heads of 16), so the recipe's LoRA rank 64 fits them
CONFIG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=128, intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
              rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False,
              use_sliding_window=False, torch_dtype="bfloat16")
# Written for this file: GSM8K-style problems, some with a second line (MetaMathQA's rephrased questions have them).
FALLBACK_QA = [("A farmer has 12 cows and buys 7 more. How many cows does he have?", "12 + 7 = 19", 19),
               ("Sam reads 15 pages a day.\nHow many pages does he read in 4 days?", "15 * 4 = 60", 60),
               ("A box holds 36 pens. Ana gives away 9 of them. How many are left?", "36 - 9 = 27", 27),
               ("Lena has 8 bags with 6 apples each.\nHow many apples is that?", "8 * 6 = 48", 48)]


# Written for this file: MATH-style problems, solutions ending in a \boxed answer.
MATH_PROBLEMS = [("What is $\\frac{1}{2} + \\frac{1}{4}$?",
                  "$\\frac{1}{2} + \\frac{1}{4} = \\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."),
                 ("Find $x$ if $2x + 3 = 11$.", "Subtracting 3 gives $2x = 8$, so $x = \\boxed{4}$."),
                 ("How many degrees are in each interior angle of a regular hexagon?",
                  "The angles sum to $180(6-2) = 720$ degrees, so each is $\\boxed{120^\\circ}$."),
                 ("Simplify $\\sqrt{50}$.", "$\\sqrt{50} = \\sqrt{25 \\cdot 2} = \\boxed{5\\sqrt{2}}$.")]


def gsm8k_records(split: str, n: int | None = None) -> list[dict]:
    path = SHARED_GSM8K / f"{split}.jsonl"
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines[:n]]
    records = [{"question": q, "answer": f"{work}\n#### {a}"} for q, work, a in FALLBACK_QA]
    n = n or 16  # repeated up to n (a whole split: 16): a batch of 16 fills, and --eval-limit 8 finds 8
    return (records * (n // len(records) + 1))[:n]


def metamath_records(n: int) -> list[dict]:
    """MetaMathQA rows (its four fields) made from GSM8K training problems; every third query has a second line."""
    rows = []
    for i, r in enumerate(gsm8k_records("train", n)):
        reasoning, answer = r["answer"].rsplit("#### ", 1)
        query = r["question"] + ("\nWhat is the answer?" if i % 3 == 0 else "")
        rows.append({"type": "GSM_Rephrased" if i % 3 == 0 else "GSM_AnsAug", "query": query,
                     "original_question": r["question"], "response": f"{reasoning.strip()}\nThe answer is: {answer.strip()}"})
    return rows


def train_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE (as Qwen2's) with <|endoftext|> as its one special token; every text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def random_checkpoint(vocab_size: int, seed: int, config: dict = CONFIG, std: float = 0.1) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = {**CONFIG, **config, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": 0}
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else std * torch.randn_like(p))
    return cfg, {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def put_snapshot(cache: Path, kind: str, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write files into the cache as huggingface_hub does: content in blobs/, symlinks in snapshots/<hash>/."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def build(cache: Path, n_train: int = 64, config: dict = CONFIG, std: float = 0.1) -> None:
    """The cache; config and std: other model shapes and weight scales (benchmarks/gpu.py builds 0.5B-shaped ones)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save

    test = gsm8k_records("test")
    metamath = metamath_records(n_train)
    tok = train_tokenizer([r["question"] + "\n" + r["answer"] for r in test] + [r["query"] + "\n" + r["response"] for r in metamath]
                          + [p + "\n" + s for p, s in MATH_PROBLEMS])
    tokenizer_config = {"eos_token": EOS, "pad_token": EOS, "bos_token": None, "model_max_length": 32768}
    for seed, repo_id in enumerate(["Qwen/Qwen2-7B", "Qwen/Qwen2.5-7B"]):
        cfg, tensors = random_checkpoint(tok.get_vocab_size(), seed, config, std)
        put_snapshot(cache, "model", repo_id, {
            "config.json": json.dumps(cfg, indent=2).encode(),
            "generation_config.json": json.dumps({"bos_token_id": None, "eos_token_id": 0, "max_new_tokens": 2048}).encode(),
            "model.safetensors": save(tensors, metadata={"format": "pt"}),
            "tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": json.dumps(tokenizer_config).encode(),
        })
    table = pa.Table.from_pylist([{"question": r["question"], "answer": r["answer"]} for r in test])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    put_snapshot(cache, "dataset", "openai/gsm8k", {"main/test-00000-of-00001.parquet": sink.getvalue().to_pybytes()})
    put_snapshot(cache, "dataset", "meta-math/MetaMathQA", {"MetaMathQA-395K.json": json.dumps(metamath, indent=2).encode()})
    files = {}
    for subject in MATH_SUBJECTS:
        rows = [{"problem": p, "level": "Level 1", "type": subject, "solution": s} for p, s in MATH_PROBLEMS]
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        files[f"{subject}/test-00000-of-00001.parquet"] = sink.getvalue().to_pybytes()
    put_snapshot(cache, "dataset", "EleutherAI/hendrycks_math", files)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/fake_hub.py CACHE_DIR")
    build(Path(sys.argv[1]))
    print(f"hub cache with Qwen/Qwen2-7B, Qwen/Qwen2.5-7B, openai/gsm8k (test), EleutherAI/hendrycks_math (test) and "
          f"meta-math/MetaMathQA at {sys.argv[1]}")
