"""
The GPU check: one prepared command that proves the CUDA path and measures it against transformers + peft, on one
GPU, with nothing fetched (random weights; GSM8K lengths from ../shared/gsm8k where present).

    python benchmarks/gpu.py --out runs/gpu             # one NVIDIA GPU: the real shapes, about 8 minutes
    python benchmarks/gpu.py --small --out /tmp/gpu     # the same code path with small shapes, on any device (CPU too)

Writes OUT/gpu.json and OUT/gpu.md (a Markdown table). Four parts, each with a time budget: a row that would start
after its part's budget is spent is skipped, and says so.

1. correctness: `pytest -m cuda` (tests/test_cuda.py: logits vs transformers in fp32 and bf16, LoRA vs peft, a
   Trans-PEFT train step, all on the GPU; they skip without CUDA).
2. LoRA training at real shapes (Qwen2.5-0.5B, Qwen2.5-1.5B, Qwen2-7B configs; random bf16 base built on the device,
   shared by both sides): a step of the recipe's shapes, 16 sequences of 512 tokens in micro-batches of 4, LoRA r 64
   on q,k,v,o, bf16 autocast, AdamW. Tokens/s ours vs transformers + peft (interleaved, median), Trans-PEFT's
   overhead at the paper's rates (p_cross 0.1), peak memory both sides, and MFU:
       MFU = tokens/s * 4 * N_base / peak bf16 FLOP/s
   4 N_base FLOPs per token: the forward's 2 N and the backward's 2 N through the frozen weights (no weight
   gradients); attention's and LoRA's own FLOPs are not counted, so MFU is slightly understated.
3. Decoding: greedy new tokens/s at batch 1, 16 and 64 (128-token prompts, 256 new tokens), ours eager, ours
   compiled over the static cache, transformers' generate; and GSM8K's 1,319 test prompts at the evaluation's batch
   size (16) with 256 new tokens, eager, timed on the first batches and extrapolated (said so in the table).
4. End to end: a 20-step `train.py` run on two random Qwen2-0.5B-shaped bases in a hub cache on disk
   (tests/fake_hub.py), `--eval-limit 8`, on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench import IdsTokenizer  # noqa: E402
from data import next_token_targets  # noqa: E402
from eval import generate  # noqa: E402
from lora import add_lora  # noqa: E402
from model import ModelConfig, Transformer, rope_inv_freq  # noqa: E402
from transpeft import apply_transpeft  # noqa: E402

QWEN2 = dict(model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
             use_sliding_window=False)
SHAPES = {  # the hub configs' shapes (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B, Qwen/Qwen2-7B)
    "qwen2.5-0.5b": dict(QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-7b": dict(QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
SMALL = {"small": dict(QWEN2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense, FLOP/s
GSM8K_TEST = ROOT.parent / "shared" / "gsm8k" / "test.jsonl"


class Budget:
    """Seconds left for a part; rows check it before they start."""

    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def twin_models(shape: dict, device, dtype):
    """transformers' model with random weights built on the device, and ours over the very same tensors."""
    import transformers

    config = transformers.Qwen2Config(**{k: v for k, v in shape.items() if k not in ("model_type", "hidden_act")})
    torch.manual_seed(0)
    with torch.device(device):
        theirs = transformers.Qwen2ForCausalLM(config).to(dtype)
    cfg = ModelConfig.from_hf(shape)
    with torch.device("meta"):
        ours = Transformer(cfg)
    state = theirs.state_dict()
    if shape["tie_word_embeddings"]:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ours.load_state_dict(state, strict=True, assign=True)
    ours.inv_freq = rope_inv_freq(cfg).to(device)  # a non-persistent buffer: computed, as load_model does
    if shape["tie_word_embeddings"]:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return ours.eval(), theirs.eval()


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---- 1. correctness --------------------------------------------------------------------------------------------


def correctness(budget: Budget) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, budget.left()))
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return {"command": " ".join(cmd[2:]), "returncode": r.returncode, "summary": last}


# ---- 2. training -----------------------------------------------------------------------------------------------


def train_step(model, ids, micro: int, autocast, ours: bool):
    """One optimizer step's forward and backward passes (optimizer step included by the caller)."""
    n = (ids[:, 1:] != -100).sum()
    for i in range(0, ids.shape[0], micro):
        mb = ids[i : i + micro]
        with autocast:
            if ours:
                loss = model(mb, targets=next_token_targets(mb)) / n
            else:  # transformers' mean over the micro-batch's tokens, rescaled to the same sum / n
                loss = model(input_ids=mb, labels=mb).loss * (mb.shape[0] * (mb.shape[1] - 1)) / n
        loss.backward()


def training_rows(shapes: dict, device, budget: Budget, batch: int, seq: int, micro: int, repeats: int) -> list[dict]:
    import peft

    rows = []
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, shape in shapes.items():
        if budget.left() < 20:
            rows.append({"shape": name, "skipped": "training budget spent"})
            continue
        ours, theirs = twin_models(shape, device, dtype)
        N = n_params(ours)
        torch.manual_seed(0)
        add_lora(ours, r=64, alpha=128, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj"], verbose=False)
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device, generator=None)
        sides = {}
        for side, model in (("ours", ours), ("theirs", theirs)):
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

            def step(model=model, opt=opt, is_ours=side == "ours"):
                train_step(model, ids, micro, autocast, is_ours)
                opt.step()
                opt.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sides[side] = timed(step, device, repeats)
            mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            sides[side + "_peak_mb"] = mem
            del opt
        apply_transpeft(ours, p_intra=0.0, p_cross=0.1, seed=0)
        opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
        sides["transpeft"] = timed(lambda: (train_step(ours, ids, micro, autocast, True), opt.step(), opt.zero_grad()), device, repeats)
        tokens = batch * seq
        row = {"shape": name, "params": N, "tokens_per_step": tokens,
               "ours_tokens_per_s": tokens / sides["ours"], "theirs_tokens_per_s": tokens / sides["theirs"],
               "speedup": sides["theirs"] / sides["ours"], "transpeft_overhead": sides["transpeft"] / sides["ours"] - 1,
               "ours_peak_mb": sides["ours_peak_mb"], "theirs_peak_mb": sides["theirs_peak_mb"],
               "mfu_ours": tokens / sides["ours"] * 4 * N / peak if peak else None,
               "mfu_theirs": tokens / sides["theirs"] * 4 * N / peak if peak else None}
        rows.append(row)
        print(f"train {name}: ours {row['ours_tokens_per_s']:.0f} tok/s, theirs {row['theirs_tokens_per_s']:.0f}, "
              f"x{row['speedup']:.2f}, Trans-PEFT {row['transpeft_overhead']:+.1%}", flush=True)
        ours = theirs = opt = None  # free the GPU memory before the next shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- 3. decoding -----------------------------------------------------------------------------------------------


def gsm8k_prompt_lengths(n: int) -> list[int]:
    """Token counts of GSM8K's test prompts (the evaluation prompt around each question; ~4 characters a token
    without a real tokenizer at hand), or 200 each where ../shared/gsm8k is absent."""
    from data import eval_prompt

    if not GSM8K_TEST.exists():
        return [200] * n
    questions = [json.loads(line)["question"] for line in GSM8K_TEST.read_text().splitlines()[:n]]
    return [max(8, len(eval_prompt(q)) // 4) for q in questions]


def decoding_rows(shapes: dict, device, budget: Budget, batches, prompt_len: int, new_tokens: int, gsm8k_batches: int) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, shape in shapes.items():
        ours, theirs = twin_models(shape, device, dtype)
        for batch in batches:
            if budget.left() < 15:
                rows.append({"shape": name, "batch": batch, "skipped": "decoding budget spent"})
                continue
            prompts = torch.randint(1, shape["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
            tok = IdsTokenizer(prompts.tolist())
            on_device = prompts.to(device)
            times = {}
            for label, fn in (
                ("ours", lambda: generate(ours, tok, list(range(batch)), new_tokens, batch_size=batch, stop_strings=[])),
                ("ours_compiled", lambda: generate(ours, tok, list(range(batch)), new_tokens, batch_size=batch, stop_strings=[], compile=True)),
                ("theirs", lambda: theirs.generate(on_device, attention_mask=torch.ones_like(on_device), max_new_tokens=new_tokens,
                                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)),
            ):
                with torch.inference_mode():
                    times[label] = timed(fn, device, 1)
            row = {"shape": name, "batch": batch, **{f"{k}_tokens_per_s": batch * new_tokens / v for k, v in times.items()}}
            row["speedup_eager"], row["speedup_compiled"] = times["theirs"] / times["ours"], times["theirs"] / times["ours_compiled"]
            rows.append(row)
            print(f"decode {name} b{batch}: ours {row['ours_tokens_per_s']:.0f} tok/s, compiled {row['ours_compiled_tokens_per_s']:.0f}, "
                  f"generate {row['theirs_tokens_per_s']:.0f}", flush=True)
        if budget.left() > 30:  # GSM8K's test prompts at the evaluation's batch size, extrapolated from the first batches
            lengths = gsm8k_prompt_lengths(1319)
            g = torch.Generator().manual_seed(2)
            prompts = [torch.randint(1, shape["vocab_size"], (n,), generator=g).tolist() for n in lengths]
            tok = IdsTokenizer(prompts)
            first = list(range(16 * gsm8k_batches))
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():  # eager: a compiled step would put its compilation into the extrapolated time
                generate(ours, tok, first, new_tokens, batch_size=16, stop_strings=[])
            sync(device)
            seconds = (time.perf_counter() - t0) * 1319 / len(first)
            rows.append({"shape": name, "gsm8k_1319_prompts_s": seconds, "extrapolated_from_prompts": len(first), "new_tokens": new_tokens})
            print(f"decode {name}: GSM8K 1,319 prompts ~{seconds:.0f} s (from {len(first)})", flush=True)
        ours = theirs = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---- 4. end to end ---------------------------------------------------------------------------------------------


def end_to_end(shape: dict, device, steps: int, budget: Budget) -> dict:
    import fake_hub

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hub"
        fake_hub.build(cache, config={**shape, "tie_word_embeddings": False}, std=0.02)
        env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "train.py", "--old", "qwen2", "--new", "qwen2.5", "--max-steps", str(steps), "--eval-limit", "8",
               "--max-new-tokens", "64", "--device", str(device), "--out", str(Path(tmp) / "run")]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30, budget.left()))
        result = {"command": " ".join(cmd[1:-2]), "returncode": r.returncode, "seconds": time.time() - t0,
                  "tail": (r.stdout + r.stderr)[-600:] if r.returncode else ""}
        if r.returncode == 0:
            result["results"] = json.loads((Path(tmp) / "run" / "results.json").read_text())
    return result


# ---- the report ------------------------------------------------------------------------------------------------


def fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}, {report['date']}", "", f"correctness: `{report['correctness']['command']}`: "
             f"{report['correctness']['summary']} (exit {report['correctness']['returncode']})", "",
             "| training (LoRA r 64 on q,k,v,o) | params | tokens / step | ours tok/s | theirs tok/s | ours / theirs speed | "
             "Trans-PEFT overhead | MFU ours | MFU theirs | peak MB ours | peak MB theirs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["training"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | skipped: {r['skipped']} ||||||||||")
            continue
        lines.append(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | {fmt(r['ours_tokens_per_s'])} | {fmt(r['theirs_tokens_per_s'])} | "
                     f"{r['speedup']:.2f}x | {r['transpeft_overhead']:+.1%} | {fmt(r['mfu_ours'], '.1%')} | {fmt(r['mfu_theirs'], '.1%')} | "
                     f"{fmt(r['ours_peak_mb'])} | {fmt(r['theirs_peak_mb'])} |")
    lines += ["", "| decoding | batch | ours tok/s | ours compiled tok/s | generate tok/s | eager / generate | compiled / generate |",
              "|---|---|---|---|---|---|---|"]
    for r in report["decoding"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | skipped: {r['skipped']} |||||")
        elif "gsm8k_1319_prompts_s" in r:
            lines.append(f"| {r['shape']} | GSM8K, 16 | 1,319 prompts x {r['new_tokens']} new tokens, eager: ~{r['gsm8k_1319_prompts_s']:.0f} s "
                         f"(extrapolated from {r['extrapolated_from_prompts']}) |||||")
        else:
            lines.append(f"| {r['shape']} | {r['batch']} | {fmt(r['ours_tokens_per_s'])} | {fmt(r['ours_compiled_tokens_per_s'])} | "
                         f"{fmt(r['theirs_tokens_per_s'])} | {r['speedup_eager']:.2f}x | {r['speedup_compiled']:.2f}x |")
    e = report["end_to_end"]
    lines += ["", f"end to end: `{e.get('command', '')}`: exit {e.get('returncode')}, {fmt(e.get('seconds'))} s"
              + (f"; {e['skipped']}" if "skipped" in e else ""), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="The GPU check: correctness and speed against transformers + peft on one GPU.")
    p.add_argument("--out", required=True, help="directory for gpu.json and gpu.md")
    p.add_argument("--small", action="store_true", help="small shapes, on any device (tests the check's plumbing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=7.5, help="the whole check's time budget")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no CUDA device: run on a GPU machine, or pass --small --device cpu.")
    total = args.minutes * 60
    shapes = SMALL if args.small else SHAPES
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "small": args.small}
    print(f"GPU check on {report['device']} ({'small shapes' if args.small else 'real shapes'}), budget {args.minutes} min", flush=True)
    report["correctness"] = correctness(Budget(0.12 * total))
    print(f"correctness: {report['correctness']['summary']}", flush=True)
    report["training"] = training_rows(shapes, device, Budget(0.4 * total - (time.time() - t0) + 0.12 * total),
                                       batch=16 if not args.small else 4, seq=512 if not args.small else 32,
                                       micro=4 if not args.small else 2, repeats=3 if not args.small else 1)
    decode_shapes = {k: v for k, v in shapes.items() if k != "qwen2.5-1.5b"}
    report["decoding"] = decoding_rows(decode_shapes, device, Budget(0.8 * total - (time.time() - t0)),
                                       batches=(1, 16, 64) if not args.small else (1, 4), prompt_len=128 if not args.small else 16,
                                       new_tokens=256 if not args.small else 8, gsm8k_batches=2 if not args.small else 1)
    left = Budget(total - (time.time() - t0))
    if left.left() > 45 or args.small:
        report["end_to_end"] = end_to_end(SHAPES["qwen2.5-0.5b"] if not args.small else SMALL["small"], device, 20 if not args.small else 2, left)
    else:
        report["end_to_end"] = {"skipped": "end-to-end budget spent"}
    report["minutes"] = (time.time() - t0) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} ({report['minutes']:.1f} min)")
    return report


if __name__ == "__main__":
    main()
