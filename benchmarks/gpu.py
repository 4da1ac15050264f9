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
   overhead at the released recipe's rate (p_cross 0.1) and with knowledge masking on too (p_intra 0.1), peak memory
   both sides, and MFU:
       MFU = tokens/s * 4 * N / peak bf16 FLOP/s,  N = the base's weights that multiply (all but the input embedding
                                                     table, a lookup; a tied table counts once, as the output layer)
   4 N FLOPs per token: the forward's 2 N and the backward's 2 N through the frozen weights (no weight gradients);
   attention's and LoRA's own FLOPs are not counted, so MFU is slightly understated.
3. Decoding, at Qwen2-7B then Qwen2.5-0.5B shapes: greedy new tokens/s at batch 1, 16 and 64 (128-token prompts,
   256 new tokens), ours eager, ours compiled over the static cache with each step replayed as a CUDA graph
   (generate(compile=True); how long the compilation took, and how many graphs torch skipped), transformers'
   generate. First of 7B's rows (its target is at that size): the time to decode GSM8K's 1,319 test prompts at the
   evaluation's batch size (16) with 256 new tokens, eager and compiled, extrapolated from two batches of the
   length-sorted prompts (the median one, and the 16 longest, which set the static cache's length as in the whole
   run).
4. End to end, on the device: the toy study's quick form (`train.py --quick`) and a 20-step `train.py` run on two
   random Qwen2-0.5B-shaped bases in a hub cache on disk (tests/fake_hub.py), `--eval-limit 8`.

A row that fails (out of memory, a compilation error) records its error and the check goes on to the next.
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
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench import IdsTokenizer, interleaved  # noqa: E402
from data import next_token_targets  # noqa: E402
from eval import generate  # noqa: E402
from lora import add_lora  # noqa: E402
from bases import check_device  # noqa: E402
from model import ModelConfig, Transformer, rope_inv_freq  # noqa: E402
from transpeft import apply_transpeft, remove_transpeft  # noqa: E402

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
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)}  # k, v: 64 wide, for r 64
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


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(median seconds of fn over repeats, seconds of the first call before them: warm-up, compilation included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def failure(label: str, e: Exception, **row) -> dict:
    """The row of a part that raised: its error, printed with the traceback, instead of its figures."""
    traceback.print_exc()
    print(f"{label}: failed with {type(e).__name__}; the check goes on", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**row, "error": f"{type(e).__name__}: {str(e)[:400]}"}


def guarded(label: str, fn, **row) -> dict:
    """row updated with fn()'s dict, or with its error (one GPU window must not be lost to one failing row)."""
    try:
        return {**row, **fn()}
    except Exception as e:  # noqa: BLE001 - whatever a row raises (out of memory, a compiler error) is reported
        return failure(label, e, **row)


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


def matmul_params(model) -> int:
    """The parameters a token multiplies through: all but an untied input embedding table (a row lookup)."""
    embed = model.model.embed_tokens.weight
    return n_params(model) - (0 if model.lm_head.weight is embed else embed.numel())


# ---- 1. correctness --------------------------------------------------------------------------------------------


def correctness(budget: Budget) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]
    result = {"command": " ".join(cmd[2:])}
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, budget.left()))
    except subprocess.TimeoutExpired:
        return {**result, "returncode": None, "summary": f"timed out after {max(30, budget.left()):.0f} s"}
    failed = r.stdout[r.stdout.find("= FAILURES ="):][-3000:] if r.returncode not in (0, 5) else ""
    return {**result, "returncode": r.returncode, "summary": (r.stdout.strip().splitlines() or [""])[-1],
            "failures": failed}


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


def training_row(shape: dict, device, batch: int, seq: int, micro: int, repeats: int) -> dict:
    import peft

    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, theirs = twin_models(shape, device, dtype)
    N, N_matmul = n_params(ours), matmul_params(ours)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    add_lora(ours, r=64, alpha=128, dropout=0.05, targets=targets, verbose=False)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                                                         target_modules=targets))
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    opts = {id(m): torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for m in (ours, theirs)}
    # side: (model, Trans-PEFT's (p_intra, p_cross) on ours, or None). The last two: the released recipe's rate, then
    # with the paper's other intervention, knowledge masking, on as well.
    sides = {"ours": (ours, None), "theirs": (theirs, None), "transpeft": (ours, (0.0, 0.1)), "masking": (ours, (0.1, 0.1))}
    peak_mb = {side: None for side in sides}

    def step(side):  # each ends with the GPU idle, so that bench.interleaved's clock sees the whole step
        model, rates = sides[side]
        if model is ours and rates is None:  # a class swap per layer: microseconds
            remove_transpeft(ours)
        elif model is ours:  # drops drawn from torch's seeded RNG: a fresh pattern each repeat, as in training
            apply_transpeft(ours, *rates)
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_step(model, ids, micro, autocast, model is ours)
        opts[id(model)].step()
        opts[id(model)].zero_grad(set_to_none=True)
        sync(device)
        if device.type == "cuda":
            peak_mb[side] = max(peak_mb[side] or 0.0, torch.cuda.max_memory_allocated() / 2**20)

    seconds = interleaved({side: lambda side=side: step(side) for side in sides}, repeats)
    tokens = batch * seq
    return {"params": N, "matmul_params": N_matmul, "tokens_per_step": tokens,
            "ours_tokens_per_s": tokens / seconds["ours"], "theirs_tokens_per_s": tokens / seconds["theirs"],
            "speedup": seconds["theirs"] / seconds["ours"], "transpeft_overhead": seconds["transpeft"] / seconds["ours"] - 1,
            "masking_overhead": seconds["masking"] / seconds["ours"] - 1,
            "ours_peak_mb": peak_mb["ours"], "theirs_peak_mb": peak_mb["theirs"],
            "mfu_ours": tokens / seconds["ours"] * 4 * N_matmul / peak if peak else None,
            "mfu_theirs": tokens / seconds["theirs"] * 4 * N_matmul / peak if peak else None}


def training_rows(shapes: dict, device, budget: Budget, **kw) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        if budget.left() < 20:
            rows.append({"shape": name, "skipped": "training budget spent"})
            continue
        row = guarded(f"train {name}", lambda: training_row(shape, device, **kw), shape=name)
        rows.append(row)
        if "error" not in row:
            print(f"train {name}: ours {row['ours_tokens_per_s']:.0f} tok/s, theirs {row['theirs_tokens_per_s']:.0f}, "
                  f"x{row['speedup']:.2f}, Trans-PEFT {row['transpeft_overhead']:+.1%} (with masking "
                  f"{row['masking_overhead']:+.1%})", flush=True)
        if device.type == "cuda":  # the models of this shape are gone: give their memory back before the next
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


def decode_row(ours, theirs, shape: dict, device, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """New tokens/s at one batch size: ours eager, ours compiled with CUDA graphs, transformers' generate."""
    prompts = torch.randint(1, shape["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    tok = IdsTokenizer(prompts.tolist())
    on_device = prompts.to(device)
    counters = torch._dynamo.utils.counters
    row = {}
    for label, fn in (
        ("ours", lambda: generate(ours, tok, list(range(batch)), new_tokens, batch_size=batch, stop_strings=[])),
        ("ours_graphs", lambda: generate(ours, tok, list(range(batch)), new_tokens, batch_size=batch, stop_strings=[],
                                         compile=True, cuda_graphs=True)),
        ("theirs", lambda: theirs.generate(on_device, attention_mask=torch.ones_like(on_device), max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)),
    ):
        if label == "ours_graphs":  # a fresh compilation for this batch size, and its skipped graphs counted alone
            torch._dynamo.reset()
            counters.clear()
        with torch.inference_mode():
            seconds, first = timed(fn, device, 1)
        row[f"{label}_tokens_per_s"] = batch * new_tokens / seconds
        if label == "ours_graphs":
            row["compile_s"] = first - seconds
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    row["speedup_eager"] = row["ours_tokens_per_s"] / row["theirs_tokens_per_s"]
    row["speedup_graphs"] = row["ours_graphs_tokens_per_s"] / row["theirs_tokens_per_s"]
    return row


def gsm8k_row(ours, shape: dict, device, new_tokens: int) -> dict:
    """Seconds to decode GSM8K's 1,319 test prompts in batches of 16 (as eval.py, prompts sorted by length), eager and
    compiled, extrapolated from two batches: the median one and the 16 longest prompts (which set the static cache's
    length, as in the whole run). The compiled figure leaves out the one compilation (compile_s)."""
    lengths = gsm8k_prompt_lengths(1319)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, shape["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    middle = len(order) // 32 * 16
    sample = order[middle : middle + 16] + order[-16:]
    tok = IdsTokenizer(prompts)
    n_batches = -(-len(prompts) // 16)
    row = {"new_tokens": new_tokens, "extrapolated_from_batches": 2}
    for label, kw in (("eager", {}), ("graphs", dict(compile=True, cuda_graphs=True))):
        if kw:
            torch._dynamo.reset()
        with torch.inference_mode():
            seconds, first = timed(lambda: generate(ours, tok, sample, new_tokens, batch_size=16, stop_strings=[], **kw),
                                   device, 1)
        row[f"gsm8k_{label}_s"] = seconds / 2 * n_batches
        if kw:
            row["compile_s"] = first - seconds
    return row


def decoding_rows(shapes: dict, device, budget: Budget, batches, gsm8k_for, prompt_len: int, new_tokens: int) -> list[dict]:
    """Each shape's rows: the GSM8K estimate first where the shape is in gsm8k_for (its target is at Qwen2-7B), then
    one row per batch size."""
    rows = []
    for name, shape in shapes.items():
        try:
            decode_shape(rows, name, shape, device, budget, ["gsm8k"] * (name in gsm8k_for) + list(batches), prompt_len,
                         new_tokens)
        except Exception as e:  # noqa: BLE001 - building this shape's models failed: the next shape may still fit
            rows.append(failure(f"decode {name}", e, shape=name, batch="-"))
        torch._dynamo.reset()  # the compiled graphs hold this shape's weights
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def decode_shape(rows: list, name: str, shape: dict, device, budget: Budget, plan: list, prompt_len: int, new_tokens: int):
    ours, theirs = twin_models(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for item in plan:
        if budget.left() < 15:
            rows.append({"shape": name, "batch": item, "skipped": "decoding budget spent"})
            continue
        if item == "gsm8k":
            row = guarded(f"decode {name} GSM8K", lambda: gsm8k_row(ours, shape, device, new_tokens), shape=name,
                          batch="gsm8k")
            if "error" not in row:
                print(f"decode {name}: GSM8K 1,319 prompts ~{row['gsm8k_eager_s']:.0f} s eager, "
                      f"~{row['gsm8k_graphs_s']:.0f} s compiled (+{row['compile_s']:.0f} s compiling)", flush=True)
        else:
            row = guarded(f"decode {name} b{item}",
                          lambda: decode_row(ours, theirs, shape, device, item, prompt_len, new_tokens),
                          shape=name, batch=item)
            if "error" not in row:
                print(f"decode {name} b{item}: ours {row['ours_tokens_per_s']:.0f} tok/s, compiled + CUDA graphs "
                      f"{row['ours_graphs_tokens_per_s']:.0f} ({row['compile_s']:.0f} s compiling, "
                      f"{row['cudagraph_skips']} graphs skipped), generate {row['theirs_tokens_per_s']:.0f}", flush=True)
        rows.append(row)


# ---- 4. end to end ---------------------------------------------------------------------------------------------


def end_to_end(shape: dict, device, steps: int, budget: Budget) -> list[dict]:
    """The toy study's quick form, then the paper's command on random bases, each a train.py process on the device."""
    import fake_hub

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "hub"
        fake_hub.build(cache, config={**shape, "tie_word_embeddings": False}, std=0.02)
        env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSPEFT_CACHE": str(Path(tmp) / "toy")}
        runs = {"toy (quick)": ["--quick"],
                "paper's command": ["--old", "qwen2", "--new", "qwen2.5", "--max-steps", str(steps), "--eval-limit", "8",
                                    "--max-new-tokens", "64"]}
        for name, flags in runs.items():
            out = Path(tmp) / name.split()[0]
            cmd = [sys.executable, "train.py", *flags, "--device", str(device), "--out", str(out)]
            row = {"run": name, "command": " ".join(cmd[1:-2])}
            if budget.left() < 20:
                rows.append({**row, "skipped": "end-to-end budget spent"})
                continue
            t0 = time.time()
            try:
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30, budget.left()))
            except subprocess.TimeoutExpired:
                rows.append({**row, "returncode": None, "seconds": time.time() - t0, "tail": "timed out"})
                continue
            row.update(returncode=r.returncode, seconds=time.time() - t0, tail=(r.stdout + r.stderr)[-600:] if r.returncode else "")
            if r.returncode == 0:
                row["results"] = json.loads((out / "results.json").read_text())
            rows.append(row)
            print(f"end to end, {name}: exit {r.returncode} in {row['seconds']:.0f} s", flush=True)
    return rows


# ---- the report ------------------------------------------------------------------------------------------------


def fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    c = report["correctness"]
    lines = [f"# GPU check: {report['device']}, torch {report['torch']}, {report['date']}", "",
             f"correctness: `{c['command']}`: {c['summary']} (exit {c['returncode']})", "",
             "| training (LoRA r 64 on q,k,v,o) | params | tokens / step | ours tok/s | theirs tok/s | ours / theirs speed | "
             "Trans-PEFT overhead (p_cross 0.1) | with masking (p_intra 0.1) | MFU ours | MFU theirs | peak MB ours | "
             "peak MB theirs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["training"]:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['shape']} | {r.get('skipped') or 'error: ' + r['error']} |||||||||||")
            continue
        lines.append(f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | {fmt(r['ours_tokens_per_s'])} | {fmt(r['theirs_tokens_per_s'])} | "
                     f"{r['speedup']:.2f}x | {r['transpeft_overhead']:+.1%} | {r['masking_overhead']:+.1%} | {fmt(r['mfu_ours'], '.1%')} | {fmt(r['mfu_theirs'], '.1%')} | "
                     f"{fmt(r['ours_peak_mb'])} | {fmt(r['theirs_peak_mb'])} |")
    lines += ["", "| decoding | batch | ours eager tok/s | ours compiled + CUDA graphs tok/s | generate tok/s | eager / generate | "
              "compiled / generate | compiling s | graphs skipped |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["decoding"]:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | {r.get('skipped') or 'error: ' + r['error']} |||||||")
        elif r["batch"] == "gsm8k":
            lines.append(f"| {r['shape']} | GSM8K, 16 | 1,319 prompts x {r['new_tokens']} new tokens: eager ~{r['gsm8k_eager_s']:.0f} s, "
                         f"compiled ~{r['gsm8k_graphs_s']:.0f} s (extrapolated from {r['extrapolated_from_batches']} batches) ||||| "
                         f"{r['compile_s']:.0f} | |")
        else:
            lines.append(f"| {r['shape']} | {r['batch']} | {fmt(r['ours_tokens_per_s'])} | {fmt(r['ours_graphs_tokens_per_s'])} | "
                         f"{fmt(r['theirs_tokens_per_s'])} | {r['speedup_eager']:.2f}x | {r['speedup_graphs']:.2f}x | "
                         f"{r['compile_s']:.0f} | {r['cudagraph_skips']} |")
    lines.append("")
    for e in report["end_to_end"]:
        state = e.get("skipped") or f"exit {e.get('returncode')}, {fmt(e.get('seconds'))} s"
        lines.append(f"end to end, {e['run']}: `{e['command']}`: {state}")
    return "\n".join(lines + [""])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="The GPU check: correctness and speed against transformers + peft on one GPU.")
    p.add_argument("--out", required=True, help="directory for gpu.json and gpu.md")
    p.add_argument("--small", action="store_true", help="small shapes, on any device (tests the check's plumbing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=7.5, help="the whole check's time budget")
    args = p.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    total = args.minutes * 60
    shapes = SMALL if args.small else SHAPES
    t0 = time.time()

    def until(fraction):  # a part's budget: up to `fraction` of the whole check's time from its start
        return Budget(fraction * total - (time.time() - t0))

    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "small": args.small}
    print(f"GPU check on {report['device']} ({'small shapes' if args.small else 'real shapes'}), budget {args.minutes} min", flush=True)
    report["correctness"] = correctness(until(0.2))
    print(f"correctness: {report['correctness']['summary']}", flush=True)
    report["training"] = training_rows(shapes, device, until(0.45), batch=16 if not args.small else 4,
                                       seq=512 if not args.small else 32, micro=4 if not args.small else 2,
                                       repeats=3 if not args.small else 1)
    # 7B first: its GSM8K time is a target; 0.5B's rows follow as the budget allows
    decode_shapes = SMALL if args.small else {k: SHAPES[k] for k in ("qwen2-7b", "qwen2.5-0.5b")}
    report["decoding"] = decoding_rows(decode_shapes, device, until(0.85), batches=(1, 16, 64) if not args.small else (1, 4),
                                       gsm8k_for={"qwen2-7b", "small"}, prompt_len=128 if not args.small else 16,
                                       new_tokens=256 if not args.small else 8)
    report["end_to_end"] = end_to_end(SHAPES["qwen2.5-0.5b"] if not args.small else SMALL["small"], device,
                                      20 if not args.small else 2, until(1.0) if not args.small else Budget(600))
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
