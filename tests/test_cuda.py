"""On a CUDA device (`pytest -m cuda`; skipped without one): the decoder's logits against transformers in fp32 and
bf16, LoRA against peft, and a short train.py run with Trans-PEFT, all on the GPU. benchmarks/gpu.py runs these."""

import json

import pytest
import torch

import train
from lora import add_lora
from model import load_model

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


def test_train_run_with_transpeft_on_cuda(world):
    out = world["tmp"] / "cuda-run"
    train.main(["--old", world["old"], "--new", world["new"], "--train-data", world["data"], "--eval-data", world["data"],
                "--out", str(out), "--lora-r", "4", "--lora-alpha", "8", "--p-cross", "0.3", "--p-intra", "0.1",
                "--batch-size", "6", "--micro-batch-size", "4", "--max-steps", "4", "--eval-limit", "3",
                "--max-new-tokens", "6", "--device", "cuda"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)
    assert json.loads((out / "results.json").read_text())["transfer_new"]["total"] == 3
