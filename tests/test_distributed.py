"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 training give the loss curve and adapter of one process on the
same global batch, with and without Trans-PEFT's layer dropping, and every process drops the same layers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def args_for(w, out, p_cross, micro, *extra):
    return ["--old", w["old"], "--new", w["new"], "--train-data", w["data"], "--eval-data", w["data"], "--out", str(out),
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lora-targets", "q_proj,v_proj,gate_proj,down_proj",
            "--p-cross", str(p_cross), "--p-intra", "0", "--batch-size", "4", "--micro-batch-size", str(micro), "--max-steps", "5",
            "--lr", "1e-2", "--max-len", "320", "--eval-limit", "3", "--max-new-tokens", "4", *extra]


def torchrun(argv, n=2, script="train.py"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # a script outside the project imports it too
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]  # the tail: a C++ abort's reason comes last, in no "Error" line
    return r


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    # 1e-4: summed in another order, a near-zero gradient element differs by rounding, and Adam, which divides each
    # element's step by its own gradient scale, turns that into a visible difference of that one weight
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    ra, rb = json.loads((a / "results.json").read_text()), json.loads((b / "results.json").read_text())
    assert ra["gsm8k"]["transfer_new"]["total"] == rb["gsm8k"]["transfer_new"]["total"] == 3  # evaluation split across processes, gathered


def test_ddp_with_dropping_equals_one_process(world):
    """p_cross 0.5 on FFN LoRA: one drop pattern per step, so one process with 4 micro-batches of 1 trains as two
    processes with one micro-batch of 2 each."""
    one, two = world["tmp"] / "one", world["tmp"] / "two"
    train.main(args_for(world, one, 0.5, 1))
    torchrun(args_for(world, two, 0.5, 2))
    assert_same_run(one, two)
    assert not (two / "checkpoint.pt.tmp").exists() and (two / "checkpoint.pt").exists()


def test_ddp_with_gradient_accumulation_equals_one_process(world):
    """No dropping, two micro-batches per process (DDP's no_sync for the first)."""
    one, two = world["tmp"] / "one", world["tmp"] / "two"
    train.main(args_for(world, one, 0.0, 1))
    torchrun(args_for(world, two, 0.0, 1))
    assert_same_run(one, two)


def test_micro_batch_loss_mean_counts_every_process_micro_batches(world):
    """--loss-mean micro-batch (the released run's): each micro-batch's token mean, averaged over the global batch's
    micro-batches. With micro-batches of one example, one process (4 of them) and two processes (2 each) group the
    examples alike, so they train alike; dividing by one process's count would double the two processes' loss."""
    one, two = world["tmp"] / "one", world["tmp"] / "two"
    train.main(args_for(world, one, 0.0, 1, "--loss-mean", "micro-batch"))
    torchrun(args_for(world, two, 0.0, 1, "--loss-mean", "micro-batch"))
    assert_same_run(one, two)


def test_fsdp2_on_gloo_equals_one_process(world):
    one, two = world["tmp"] / "one", world["tmp"] / "fsdp"
    train.main(args_for(world, one, 0.5, 4))
    torchrun(args_for(world, two, 0.5, 2, "--fsdp"))
    assert_same_run(one, two)


def test_fsdp_stopped_and_resumed_equals_the_uninterrupted_run(world):
    """Sharded state saved by torch.distributed.checkpoint (each process its shards of the LoRA weights and of AdamW's
    moments, its own RNG state) and read back: the resumed run ends with the uninterrupted run's losses and adapter,
    bit for bit. LoRA dropout on, so that the RNG states matter."""
    whole, parts = world["tmp"] / "whole", world["tmp"] / "parts"
    torchrun(args_for(world, whole, 0.5, 2, "--fsdp", "--lora-dropout", "0.1"))
    torchrun(args_for(world, parts, 0.5, 2, "--fsdp", "--lora-dropout", "0.1", "--stop-after", "2"))
    assert (parts / "checkpoint-sharded" / "state.pt").exists() and not (parts / "results.json").exists()
    torchrun(args_for(world, parts, 0.5, 2, "--fsdp", "--lora-dropout", "0.1", "--resume"))
    assert losses(parts) == losses(whole)
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, parts))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_refusal_under_torchrun_is_said_once():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--old",
           "no-such-model", "--new", "qwen2.5", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and (r.stdout + r.stderr).count("error: ") == 1, r.stderr[-3000:]


DROP_PROBE = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
import loop
from data import load_examples, tokenize_dataset
from lora import add_lora
from bases import load_model, load_tokenizer
from transpeft import apply_transpeft

dist.init_process_group("gloo")
old, data, out = sys.argv[1:4]
torch.manual_seed(0)
model = apply_transpeft(add_lora(load_model(old), r=2, alpha=4, targets=["q_proj"], verbose=False), p_cross=0.5, seed=3)
seen = []
for i, layer in enumerate(model.model.layers):
    layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.append(i))
torch.rand(1000 * (dist.get_rank() + 1))  # the processes' global RNGs differ
ds, _ = tokenize_dataset(load_examples(data), load_tokenizer(old), 320)
args = loop.TrainSettings(lr=1e-2, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1.0, batch_size=4, micro_batch_size=1,
                           max_steps=6, epochs=1, seed=0, save_every=100, resume=False, stop_after=None, loss_mean="batch")
loop.train(model, ds, args, Path(out) / "run", 0)
patterns = [None] * dist.get_world_size()
dist.all_gather_object(patterns, seen)
if dist.get_rank() == 0:
    Path(out, "patterns.json").write_text(json.dumps(patterns))
dist.barrier()  # no collective may be in flight when the group goes: gloo aborts the process otherwise
dist.destroy_process_group()
"""


def test_every_process_drops_the_same_layers(world):
    (world["tmp"] / "probe.py").write_text(DROP_PROBE)
    torchrun([world["old"], world["data"], str(world["tmp"])], script=str(world["tmp"] / "probe.py"))
    patterns = json.loads((world["tmp"] / "patterns.json").read_text())
    assert patterns[0] == patterns[1]
    assert 0 < len(patterns[0]) < 6 * 2 * 2  # 6 steps x 2 micro-batches x 2 layers, about half of them dropped
