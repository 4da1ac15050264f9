"""
Benchmarks: this project against transformers + peft on the same checkpoints, the same inputs, the same machine,
in one process (peak memory: one fresh process per side). Not a test: it prints ratios and writes JSON.

    python benchmarks/bench.py                       # tiny and small checkpoints, everything
    python benchmarks/bench.py --sizes tiny --repeats 3 --out benchmarks/results.json

For each checkpoint size (built here with transformers, Qwen2 layout):
  1. a LoRA training step (r=16 on all seven projections, batch 8 x 256 tokens, forward + backward + AdamW):
     ours vs peft on transformers; the losses of the first step must agree;
  2. the same step of ours with Trans-PEFT on, as overhead over ours without: at the rates of the paper's released
     scripts (p_intra 0, p_cross 0.1) and with masking on too (p_intra 0.1, p_cross 0.1);
  3. greedy decoding with the KV cache, 64-token prompts, 128 new tokens, batch 1 and 16: ours (eval.generate,
     eager, then with compile=True after its compilation) vs transformers' generate; the generated tokens must agree;
  4. loading the checkpoint: ours (load_model) vs from_pretrained;
  5. peak memory of a training step (growth of the peak RSS over the step, in a fresh process per side).
Timings alternate ours / theirs after a warm-up and report the median of the repeats. Another process on the same
cores distorts everything: run this on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval import generate  # noqa: E402
from lora import add_lora  # noqa: E402
from bases import load_model  # noqa: E402
from transpeft import apply_transpeft  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=8192),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=32768),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_checkpoint(size: str, root: Path) -> Path:
    import transformers

    config = transformers.Qwen2Config(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    path = root / size
    model.save_pretrained(path)
    return path


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, run alternately so that drifts in machine load hit every side alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- the training step --------------------------------------------------------------------------------------


def ours_trainer(path, ids, p_intra: float = 0.0, p_cross: float = 0.0):
    torch.manual_seed(0)
    model = add_lora(load_model(path), r=16, alpha=32, dropout=0.0, targets=TARGETS, verbose=False).train()
    if p_intra or p_cross:
        apply_transpeft(model, p_intra=p_intra, p_cross=p_cross, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    # as train.py computes it: labels shifted left, the loss summed by the model at supervised positions
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    n_supervised = int((targets != -100).sum())

    def step():
        loss = model(ids, targets=targets) / n_supervised
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def theirs_trainer(path, ids):
    import peft
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---- decoding -----------------------------------------------------------------------------------------------


class IdsTokenizer:
    """The benchmark speaks token ids: encode(i) is the i-th prompt, decode(ids) the ids themselves (so eval.generate's
    'completions' are token lists), and EOS never comes, so every row decodes all its new tokens."""

    eos_token_id, pad_token_id, stop_ids = -1, 0, {-1}

    def __init__(self, prompts: list[list[int]]):
        self.prompts = prompts

    def encode(self, i):
        return self.prompts[i]

    def decode(self, ids, skip_special_tokens=True):
        return list(ids)


def decode_pair(path, batch: int, new_tokens: int = 128, prompt_len: int = 64, compile: bool = False):
    import transformers

    vocab = SIZES[path.name]["vocab_size"]
    prompts = torch.randint(1, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    ours_model, theirs_model = load_model(path), transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = IdsTokenizer(prompts.tolist())

    def ours():
        return generate(ours_model, tok, list(range(batch)), new_tokens, batch_size=batch, stop_strings=[], compile=compile)

    def theirs():
        with torch.no_grad():
            return theirs_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[:, prompt_len:].tolist()

    return ours, theirs


# ---- loading and memory ---------------------------------------------------------------------------------------

MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import bench
torch.set_num_threads({threads})
ids = torch.randint(0, {vocab}, (8, 256), generator=torch.Generator().manual_seed(0))
step = bench.ours_trainer({path!r}, ids) if {side!r} == "ours" else bench.theirs_trainer({path!r}, ids)
step()  # optimizer state exists from here on
def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss("VmRSS:")
step()
print(rss("VmHWM:") - before)
"""


def peak_step_memory_mb(path: Path, side: str) -> float | None:
    code = MEMORY_PROBE.format(root=str(ROOT), bench=str(Path(__file__).parent), threads=torch.get_num_threads(),
                               vocab=SIZES[path.name]["vocab_size"], path=str(path), side=side)
    # glibc keeps freed memory for reuse, so RSS would miss what a step frees and reallocates; with every allocation
    # of 64 KiB or more mmap-ed, freed tensors go back to the system and RSS follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        return None
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def cpu_info(field: str) -> str:
    """A field of the first CPU in /proc/cpuinfo ("model name"), or "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), "")
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results.json")
    args = parser.parse_args()

    cpu = cpu_info("model name") or platform.machine()  # the ratios depend on it: MKL differs on AMD and Intel
    rows, machine = [], f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    with tempfile.TemporaryDirectory() as tmp:
        can_compile = shutil.which("g++") or shutil.which("clang++")  # torch.compile on CPU needs a C++ compiler
        for size in args.sizes.split(","):
            path = build_checkpoint(size, Path(tmp))
            n_params = sum(v.numel() for v in load_model(path).state_dict().values()) / 1e6
            ids = torch.randint(0, SIZES[size]["vocab_size"], (8, 256), generator=torch.Generator().manual_seed(0))

            ours, theirs = ours_trainer(path, ids), theirs_trainer(path, ids)
            first = (ours(), theirs())
            assert abs(first[0] - first[1]) < 1e-4 * abs(first[1]), f"training losses differ: {first}"
            transpeft = {(0.0, 0.1): ours_trainer(path, ids, 0.0, 0.1), (0.1, 0.1): ours_trainer(path, ids, 0.1, 0.1)}
            t = interleaved({"ours": ours, "theirs": theirs, **transpeft}, args.repeats)
            rows.append({"size": size, "params_M": n_params, "what": "LoRA train step 8x256", "ours_s": t["ours"], "theirs_s": t["theirs"]})
            for p_intra, p_cross in transpeft:
                rows.append({"size": size, "params_M": n_params, "what": f"Trans-PEFT ({p_intra:g}, {p_cross:g}) on vs off (ours)",
                             "ours_s": t[(p_intra, p_cross)], "theirs_s": t["ours"]})

            for compile in (False, True) if can_compile else (False,):
                for batch in (1, 16):
                    o, h = decode_pair(path, batch, compile=compile)
                    assert o() == h(), f"greedy tokens differ at batch {batch}"  # (ours compiles here, if asked)
                    t = interleaved({"ours": o, "theirs": h}, max(1, args.repeats // 2))
                    what = f"greedy decode b{batch}, 64+128 tok" + (", compiled" if compile else "")
                    rows.append({"size": size, "params_M": n_params, "what": what, "ours_s": t["ours"], "theirs_s": t["theirs"],
                                 "ours_tok_s": 128 * batch / t["ours"], "theirs_tok_s": 128 * batch / t["theirs"]})

            import transformers

            t = interleaved({"ours": lambda: load_model(path), "theirs": lambda: transformers.AutoModelForCausalLM.from_pretrained(path)}, args.repeats)
            rows.append({"size": size, "params_M": n_params, "what": "load checkpoint", "ours_s": t["ours"], "theirs_s": t["theirs"]})
            mem = {side: peak_step_memory_mb(path, side) for side in ("ours", "theirs")}
            rows.append({"size": size, "params_M": n_params, "what": "peak memory of a train step (MB)", "ours_s": mem["ours"], "theirs_s": mem["theirs"]})

    print(f"\nmachine: {machine}")
    print(f"{'size':<6} {'params':>7}  {'what':<46} {'ours':>10} {'theirs':>10} {'ours/theirs':>12}")
    for r in rows:
        ratio = r["ours_s"] / r["theirs_s"] if r["ours_s"] and r["theirs_s"] else float("nan")
        unit = "MB" if "memory" in r["what"] else "s"
        print(f"{r['size']:<6} {r['params_M']:>6.1f}M  {r['what']:<46} {r['ours_s']:>9.4g}{unit} {r['theirs_s']:>9.4g}{unit} {ratio:>12.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
