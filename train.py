"""
The transfer experiment: train a PEFT module on the OLD base, then measure it on the old base (source accuracy)
and, unchanged, on the NEW base (direct transfer); optionally train the same PEFT on the new base (the upper bound).

    python train.py --old qwen2 --new qwen2.5                  # the paper's Qwen2-7B -> Qwen2.5-7B run (GPU, hub)
    python train.py --old qwen2 --new qwen2.5 --p-cross 0      # the "direct transfer" baseline: plain LoRA

The defaults are the official recipe (github gccnlp/Trans-PEFT, scripts/trans-peft-qwen.sh): LoRA r=64, alpha=128,
dropout 0.05 on q,k,v,o; p_cross=0.1, p_intra=0; the first 100,000 MetaMathQA rows, max length 512; AdamW lr 3e-4,
weight decay 0, cosine schedule with 3% warmup, 3 epochs, global batch 16, gradient clipping at 1.0 (the HF Trainer
default), bf16 autocast on CUDA, seed 42; GSM8K test by exact match.

The loop, top to bottom: seed -> data -> model -> PEFT -> Trans-PEFT -> AdamW over the trainable parameters ->
for each step {lr = get_lr(step); micro-batches: loss summed over supervised tokens / their count in the whole
batch, backward; clip; step; zero_grad} -> checkpoint (PEFT weights, optimizer, step, RNG states) atomically.
The loss is normalised by the number of supervised tokens in the whole batch, not averaged per micro-batch: a mean
of micro-batch means would weight a token of a short answer more than a token of a long one.

Files in the run directory (--out): args.json, train_log.jsonl (one line per step), checkpoint.pt (to --resume),
adapter/ (PEFT format for LoRA), eval-*.jsonl (per example), results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapter as adapter_lib
import lora as lora_lib
from data import IGNORE_INDEX, collate, load_examples, tokenize_dataset
from eval import attach_peft, evaluate
from model import load_config, load_model, load_tokenizer, print_trainable
from transpeft import apply_transpeft, remove_transpeft

ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")


class StopRequested(Exception):
    """--stop-after was reached: a checkpoint is written, --resume continues."""


class Diverged(Exception):
    """The loss or gradient stopped being finite."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Trans-PEFT's transfer experiment: train a PEFT module on --old, evaluate it on --old and --new.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--old", help="the base to train on (alias, directory or hub id); none = the embedded toy study")
    p.add_argument("--new", help="its update, where the trained module is evaluated unchanged")
    p.add_argument("--peft", choices=["lora", "adapter"], default="lora")
    p.add_argument("--p-intra", default="0.0", help="knowledge-masking rate: one float, or one per layer, comma-separated")
    p.add_argument("--p-cross", default="0.1", help="knowledge-dropping rate: one float, or one per layer, comma-separated")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=128)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated projection names")
    p.add_argument("--adapter-bottleneck", type=int, default=8)
    p.add_argument("--adapter-placement", choices=["series", "parallel"], default="series")
    p.add_argument("--train-data", default="metamath", help="metamath, gsm8k, or a local .jsonl/.json/.parquet")
    p.add_argument("--eval-data", default="gsm8k", help="gsm8k (its test split), or a local GSM8K-format file")
    p.add_argument("--max-samples", type=int, default=100_000, help="train on the first N examples")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass (gradient accumulation)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="run directory (default: runs/<old>-<new>-<peft>-cross<p>-intra<p>-seed<s>)")
    p.add_argument("--refit-new", action="store_true", help="also train a plain PEFT module on --new (the upper bound)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N examples only")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--stop-after", type=int, help="stop after this step with a checkpoint, to --resume later (e.g. time-limited jobs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for name in ("batch_size", "micro_batch_size", "max_len", "max_new_tokens", "save_every", "eval_batch_size", "max_samples"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("max_steps", "eval_limit", "stop_after"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.epochs <= 0:
        p.error("--epochs must be positive")
    if not 0 <= args.warmup_ratio < 1:
        p.error("--warmup-ratio must be in [0, 1)")
    try:
        args.p_intra, args.p_cross = parse_rate(args.p_intra), parse_rate(args.p_cross)
    except ValueError:
        p.error("--p-intra and --p-cross take a float, or comma-separated floats (one per layer)")
    if (args.old is None) != (args.new is None):
        p.error("give both --old and --new, or neither (the toy study)")
    return args


def parse_rate(text) -> float | list[float]:
    values = [float(v) for v in str(text).split(",")]
    return values[0] if len(values) == 1 else values


def default_out(args) -> Path:
    def short(name):
        return Path(str(name)).name.replace("/", "_")

    rate = lambda r: r if isinstance(r, float) else "layerwise"  # noqa: E731
    return Path("runs") / f"{short(args.old)}-{short(args.new)}-{args.peft}-cross{rate(args.p_cross)}-intra{rate(args.p_intra)}-seed{args.seed}"


def check_compatible(old: str, new: str) -> None:
    """Refuse, before any training, an old/new pair a PEFT module cannot move between."""
    a, b = asdict(load_config(old)), asdict(load_config(new))
    for field in ARCH_FIELDS:
        if a[field] != b[field]:
            raise ValueError(f"{old} and {new} differ in {field} ({a[field]} vs {b[field]}): a PEFT module trained on one "
                             "cannot be applied to the other; pick two versions of the same architecture and size.")


def get_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total` (step counts from 0)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def add_peft(model, args) -> None:
    if args.peft == "lora":
        lora_lib.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()], verbose=False)
    else:
        adapter_lib.add_adapter(model, bottleneck=args.adapter_bottleneck, placement=args.adapter_placement, verbose=False)
    print_trainable(model)


def save_peft(model, out_dir: Path, base: str) -> None:
    if any(isinstance(m, lora_lib.LoRALinear) for m in model.modules()):
        lora_lib.save_lora(model, out_dir, base_model_name_or_path=base)
    else:
        adapter_lib.save_adapter(model, out_dir, base_model_name_or_path=base)


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_state(model, optimizer, step: int) -> dict:
    return {
        "step": step,
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "transpeft_rng": model.transpeft_rng.get_state() if getattr(model, "transpeft_rng", None) is not None else None,
    }


def restore_checkpoint(model, optimizer, path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["trainable"]):
        raise ValueError(f"{path} was written for other PEFT settings than these: resume with the run's original flags (see args.json).")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if state["transpeft_rng"] is not None:
        model.transpeft_rng.set_state(state["transpeft_rng"])
    return state["step"]


def train(model, dataset: list[dict], args, run_dir: Path, pad_id: int, desc: str = "train") -> list[dict]:
    """The training loop. Returns the per-step log (also appended to run_dir/train_log.jsonl)."""
    device = model.lm_head.weight.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(dataset) / args.batch_size)
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = math.ceil(args.warmup_ratio * total)
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "train_log.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)

    start = 0
    if args.resume and ckpt_path.exists():
        start = restore_checkpoint(model, optimizer, ckpt_path)
        print(f"resuming {desc} from step {start} of {total}")
    # The log keeps the steps up to the checkpoint; steps done after it (before an interruption) are redone.
    kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start] if log_path.exists() else []
    log_path.write_text("".join(line + "\n" for line in kept))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    model.train()
    last_saved = start
    bar = tqdm(range(start, total), initial=start, total=total, desc=desc, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        # The data order is a fixed function of (seed, epoch), so a resumed run sees what the uninterrupted one would.
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
        batch = [dataset[i] for i in order[index * args.batch_size : (index + 1) * args.batch_size].tolist()]
        lr = get_lr(step, total, args.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr

        n_supervised = sum(sum(label != IGNORE_INDEX for label in b["labels"][1:]) for b in batch)
        loss_sum, n_tokens = 0.0, 0
        for i in range(0, len(batch), args.micro_batch_size):
            ids, labels = collate(batch[i : i + args.micro_batch_size], pad_id)
            ids, labels = ids.to(device), labels.to(device)
            with autocast:
                logits = model(ids)
            # position t predicts token t+1; sum over supervised tokens, divided by their count in the whole batch
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum") / n_supervised
            loss.backward()
            loss_sum += loss.item()
            n_tokens += sum(len(b["input_ids"]) for b in batch[i : i + args.micro_batch_size])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip).item()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            bar.close()
            raise Diverged(f"The loss became {loss_sum} at step {step + 1}: training stopped, nothing of this step was kept. "
                          f"The last good checkpoint (step {last_saved}) is {ckpt_path if last_saved else 'not written yet'}; "
                          "lower --lr and --resume, or check the data.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        entry = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_tokens / (time.time() - t0)}
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        done = step + 1
        if done % args.save_every == 0 or done == total or done == args.stop_after:
            save_atomic(checkpoint_state(model, optimizer, done), ckpt_path)
            last_saved = done
        if done == args.stop_after and done < total:
            bar.close()
            raise StopRequested(f"Stopped after step {done} of {total} as asked (--stop-after): run the same command with --resume to continue.")
    bar.close()
    model.eval()
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def train_and_save(base: str, dataset, args, run_dir: Path, pad_id: int, desc: str, transpeft: bool):
    """Load base, attach a fresh PEFT module, (optionally) switch Trans-PEFT on, train, save the module."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(args.seed)
    model = load_model(base, dtype=dtype, device=args.device)
    add_peft(model, args)
    rates_on = any(r > 0 for rate in (args.p_intra, args.p_cross) for r in (rate if isinstance(rate, list) else [rate]))
    if transpeft and rates_on:
        apply_transpeft(model, p_intra=args.p_intra, p_cross=args.p_cross, seed=args.seed)
    log = train(model, dataset, args, run_dir, pad_id, desc)
    remove_transpeft(model)
    save_peft(model, run_dir / "adapter", base)
    return model, log


def prepare_data(source: str, tokenizer, args) -> list[dict]:
    examples = load_examples(source, "train", args.max_samples)
    dataset, dropped = tokenize_dataset(examples, tokenizer, args.max_len)
    if not dataset:
        raise ValueError(f"No training example of {source} fits in --max-len {args.max_len}: every prompt fills it.")
    if dropped:
        print(f"note: {dropped} of {len(examples)} examples dropped: their prompt alone fills --max-len {args.max_len}")
    return dataset


def run_experiment(args) -> dict:
    out = Path(args.out) if args.out else default_out(args)
    if (out / "results.json").exists() and not (args.overwrite or args.resume):
        raise ValueError(f"{out} already holds a finished run (results.json): pass --overwrite to replace it, or another --out.")
    if args.resume and not (out / "checkpoint.pt").exists():
        raise ValueError(f"Nothing to resume in {out}: it has no checkpoint.pt. Start the run without --resume.")
    check_compatible(args.old, args.new)
    old_tok = load_tokenizer(args.old)
    train_set = prepare_data(args.train_data, old_tok, args)
    eval_set = load_examples(args.eval_data, "test", args.eval_limit)
    if any("answer" not in e for e in eval_set):
        raise ValueError(f"{args.eval_data} is not in GSM8K's format: evaluation needs question/answer records with '#### N'.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    print(f"run directory: {out}  ({len(train_set)} training examples, {len(eval_set)} evaluation examples)")

    t0 = time.time()
    model, log = train_and_save(args.old, train_set, args, out, old_tok.pad_token_id, "train on old", transpeft=True)
    ev = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    results = {"old": args.old, "new": args.new, "peft": args.peft, "p_intra": args.p_intra, "p_cross": args.p_cross,
               "final_train_loss": log[-1]["loss"] if log else None}
    results["source_old"] = evaluate(model, old_tok, eval_set, out_jsonl=out / "eval-old.jsonl", desc="eval on old", **ev)
    del model

    new_tok = load_tokenizer(args.new)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    moved = attach_peft(load_model(args.new, dtype=dtype, device=args.device), out / "adapter")
    results["transfer_new"] = evaluate(moved, new_tok, eval_set, out_jsonl=out / "eval-new.jsonl", desc="eval on new", **ev)
    del moved

    results["refit_new"] = None
    if args.refit_new:  # the upper bound: a plain PEFT module trained on the new base itself
        refit_set = prepare_data(args.train_data, new_tok, args)
        refit, _ = train_and_save(args.new, refit_set, args, out / "refit-new", new_tok.pad_token_id, "train on new", transpeft=False)
        results["refit_new"] = evaluate(refit, new_tok, eval_set, out_jsonl=out / "refit-new" / "eval-new.jsonl", desc="eval refit", **ev)
    results["minutes"] = (time.time() - t0) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(results_table(results))
    return results


def results_table(r: dict) -> str:
    rows = [("trained on old, on old (source)", r["old"], r["source_old"]),
            ("same module on new (direct transfer)", r["new"], r["transfer_new"])]
    if r.get("refit_new"):
        rows.append(("trained on new, on new (upper bound)", r["new"], r["refit_new"]))
    width = max(len(str(base)) for _, base, _ in rows)
    lines = [f"\n{'setting':<38} {'base':<{width}}  GSM8K exact match"]
    lines += [f"{name:<38} {str(base):<{width}}  {res['accuracy']:7.2%}  ({res['correct']}/{res['total']})" for name, base, res in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.old is None:
        sys.exit("error: the embedded toy study is not built yet (toy.py); run the transfer experiment with --old and --new.")
    try:
        run_experiment(args)
    except StopRequested as e:
        print(e)
    except Diverged as e:
        sys.exit(f"error: {e}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
