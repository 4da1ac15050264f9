"""On a CUDA device (`pytest -m cuda`; skipped without one): the decoder's logits against transformers in fp32 and
bf16, LoRA against peft, compiled decoding under CUDA graphs against eager decoding, and a short train.py run with
Trans-PEFT, all on the GPU. benchmarks/gpu.py runs these."""

import json

import pytest
import torch

import train
from conftest import QUESTIONS
from data import eval_prompt
from eval import generate
from lora import add_lora
from bases import load_model, load_tokenizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", ["qwen2", "llama3.1"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
def test_logits_equal_transformers_on_cuda(hf_checkpoint, family, dtype, tol):
    path, hf = hf_checkpoint(family)
    hf = hf.to("cuda", dtype)
    ids = torch.randint(0, 96, (2, 100), device="cuda")
    with torch.no_grad():
        ours, theirs = load_model(path, dtype, "cuda")(ids).float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max() <= tol


def test_lora_equals_peft_on_cuda(hf_checkpoint):
    peft = pytest.importorskip("peft")
    path, hf = hf_checkpoint("qwen2")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = add_lora(load_model(path, torch.float32, "cuda"), r=4, alpha=8, targets=targets, verbose=False).eval()
    theirs = peft.get_peft_model(hf.to("cuda"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
                theirs.get_parameter("base_model.model." + name.replace(".weight", ".default.weight")).copy_(p)
        ids = torch.randint(0, 96, (2, 50), device="cuda")
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-3


def test_compiled_decoding_under_cuda_graphs_equals_eager(world):
    """generate(compile=True) on CUDA (mode "reduce-overhead": each step a CUDA graph over the static cache, reused
    by every batch of one size) gives the eager completions, with a LoRA attached; no graph was skipped (a skipped
    graph, e.g. for an input it mutates but does not know to be static, would still decode right, only slowly)."""
    model = add_lora(load_model(world["old"], torch.float32, "cuda"), r=4, alpha=8, dropout=0.1, verbose=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.normal_(0, 0.1)
    tok = load_tokenizer(world["old"])
    prompts = [eval_prompt(q) for q, _ in QUESTIONS][:3] + ["Short one", "A much longer prompt " * 5]
    eager = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, stop_strings=[], lookahead=False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    graphs = generate(model, tok, prompts, max_new_tokens=8, batch_size=2, stop_strings=[], compile=True)
    assert graphs == eager and any(graphs)
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_train_run_with_transpeft_on_cuda(world):
    out = world["tmp"] / "cuda-run"
    train.main(["--old", world["old"], "--new", world["new"], "--train-data", world["data"], "--eval-data", world["data"],
                "--out", str(out), "--lora-r", "4", "--lora-alpha", "8", "--p-cross", "0.3", "--p-intra", "0.1",
                "--batch-size", "6", "--micro-batch-size", "4", "--max-steps", "4", "--eval-limit", "3",
                "--max-new-tokens", "6", "--device", "cuda"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert json.loads((out / "results.json").read_text())["gsm8k"]["transfer_new"]["total"] == 3
