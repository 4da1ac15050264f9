"""
The transfer experiment: train a PEFT module on the OLD base, then measure it on the old base (source accuracy)
and, unchanged, on the NEW base (direct transfer); optionally train the same PEFT on the new base (the upper bound).

    python train.py                                            # the embedded toy study (toy.py): CPU, minutes
    python train.py --old qwen2 --new qwen2.5                  # the paper's Qwen2-7B -> Qwen2.5-7B run (GPU, hub)
    python train.py --old qwen2 --new qwen2.5 --p-cross 0      # the "direct transfer" baseline: plain LoRA

The defaults are the released recipe (github gccnlp/Trans-PEFT, scripts/trans-peft-qwen.sh): LoRA r=64, alpha=128,
dropout 0.05 on q,k,v,o; p_cross=0.1, p_intra=0; the first 100,000 MetaMathQA rows, its prompts and tokenisation
(data.py), max length 512; AdamW lr 3e-4, weight decay 0, transformers' cosine schedule with 3% warmup, 3 epochs,
global batch 16, gradient clipping at 1.0 (the HF Trainer default), bf16 autocast on CUDA, seed 42; GSM8K test,
the official scorer. Three choices of this code differ from the released run, each with a flag that restores it
(--as-released sets all three; README, "Where this code differs from the official code"):
    --peft-dtype   float32 PEFT weights and AdamW state (released: bfloat16)
    --loss-mean    batch: the loss summed over supervised tokens / their count in the whole batch (released:
                   micro-batch, each micro-batch's token mean, averaged), so that a token of a short answer weighs
                   no more than a token of a long one, and the result does not depend on the micro-batch split
    --eval-merged  off: the adapter is evaluated beside the base (released: merged into the bf16 base first)

The loop, top to bottom: seed -> data -> model -> PEFT -> Trans-PEFT -> AdamW over the trainable parameters ->
for each step {lr = get_lr(step); micro-batches: loss, backward; clip; step; zero_grad} -> checkpoint (PEFT
weights, optimizer, step, RNG states) atomically.

Files in the run directory (--out): args.json, train_log.jsonl (one line per step), checkpoint.pt (to --resume),
adapter/ (PEFT format for LoRA), eval-*.jsonl (per example), results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import adapter as adapter_lib
import lora as lora_lib
import toy
from data import IGNORE_INDEX, SCORERS, collate, load_examples, next_token_targets, tokenize_dataset
from eval import evaluate, load_for_eval
from model import (ARCH_FIELDS, Transformer, cache_dir, check_device, is_main_process, load_config, load_model,
                   load_tokenizer, print_trainable, read_json, read_torch_file)
from transpeft import (apply_attention_masking, apply_transpeft, ffn_gradient, per_layer, remove_attention_masking,
                       remove_transpeft, reseed_drops)



class StopRequested(Exception):
    """--stop-after was reached: a checkpoint is written, --resume continues."""


class Diverged(Exception):
    """The loss or gradient stopped being finite."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Trans-PEFT's transfer experiment: train a PEFT module on --old, evaluate "
                                            "it on --old and --new.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--old", help="the base to train on (alias, directory or hub id); none = the embedded toy study")
    p.add_argument("--new", help="its update, where the trained module is evaluated unchanged")
    p.add_argument("--peft", choices=["lora", "adapter"], default="lora")
    p.add_argument("--p-intra", default="0.0",
                   help="knowledge-masking rate: one float, or one per layer, comma-separated")
    p.add_argument("--p-cross", default="0.1",
                   help="knowledge-dropping rate: one float, or one per layer, comma-separated")
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
    p.add_argument("--arms",
                   help="the study's arms, comma-separated: with --old/--new any of plain (direct transfer), transpeft "
                   "(the rates given), refit (trained on --new), one run each and the paper's table; for the toy study "
                   "a subset of toy.ARMS or all (default: all but mask and refit)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N examples only")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--scorer", choices=SCORERS, default="official",
                   help="official: Trans-PEFT's GSM8K rule; lenient: ours (see data.is_correct)")
    released = p.add_argument_group("this code's choices vs the released run's (README: where this code differs from "
                                    "the official code)")
    released.add_argument("--peft-dtype", choices=["float32", "bfloat16"],
                          help="dtype of the trained weights and their AdamW state "
                          "(default float32; the released run: bfloat16, peft casting the module to the bf16 base's "
                          "dtype)")
    released.add_argument("--loss-mean", choices=["batch", "micro-batch"],
                          help="batch (default): the summed loss / the global "
                          "batch's supervised tokens; micro-batch (the released run): each micro-batch's token mean, "
                          "averaged")
    released.add_argument("--eval-merged", action="store_true", default=None,
                          help="evaluate with the LoRA merged into the base in "
                          "bfloat16, as the released evaluation does (default: the adapter kept apart, the base as "
                          "trained)")
    released.add_argument("--as-released", action="store_true",
                          help="every released choice above: --peft-dtype bfloat16 "
                          "--loss-mean micro-batch --eval-merged (flags given explicitly still win)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--stop-after", type=int,
                   help="stop after this step with a checkpoint, to --resume later (e.g. time-limited jobs)")
    p.add_argument("--device", help="default: cuda where there is one, else cpu; the toy study: cpu (where its "
                   "README figures were measured)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the base across processes with FSDP2 (else DDP)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each layer's activations in backward: less memory, one more forward pass")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer for training (the first step compiles), "
                   "and the decoding step of single-process evaluations (its first batch compiles; on CUDA each step "
                   "is then replayed as a CUDA graph)")
    toy_flags = p.add_argument_group("the toy study (no --old/--new); its recipe is toy.LORA_RECIPE")
    toy_flags.add_argument("--seeds", type=int,
                           help="paired seeds per arm (toy study: seeds 0..N-1, default 2; with --arms: from --seed, "
                                "default 1)")
    toy_flags.add_argument("--update-seeds", default="0",
                           help="comma-separated updates of toy-v1 per regime (0 = toy-v2)")
    toy_flags.add_argument("--regimes", default="full,ffn,attn", help="which weights the updates train (toy.REGIMES): "
                           "full = all, ffn = FFN only, attn = attention only")
    toy_flags.add_argument("--quick", action="store_true",
                           help="a seconds-long smoke run (tiny bases, few steps): numbers meaningless")
    args = p.parse_args(argv)
    for name in ("batch_size", "micro_batch_size", "max_len", "max_new_tokens", "save_every", "eval_batch_size",
                 "max_samples"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("max_steps", "eval_limit", "stop_after"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.epochs <= 0:
        p.error("--epochs must be positive")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and args.old is not None else "cpu"
    try:
        check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if not 0 <= args.warmup_ratio < 1:
        p.error("--warmup-ratio must be in [0, 1)")
    try:
        args.p_intra, args.p_cross = parse_rate(args.p_intra), parse_rate(args.p_cross)
    except ValueError:
        p.error("--p-intra and --p-cross take a float, or comma-separated floats (one per layer)")
    for name in ("p_intra", "p_cross"):
        rates = getattr(args, name)
        if not all(0 <= r < 1 for r in (rates if isinstance(rates, list) else [rates])):
            p.error(f"--{name.replace('_', '-')} must be in [0, 1): it is the probability of taking knowledge away")
    if (args.old is None) != (args.new is None):
        p.error("give both --old and --new, or neither (the toy study)")
    for name, ours, official in (("peft_dtype", "float32", "bfloat16"), ("loss_mean", "batch", "micro-batch"),
                                 ("eval_merged", False, True)):
        if getattr(args, name) is None:
            setattr(args, name, official if args.as_released else ours)
    if args.eval_merged and args.peft != "lora":
        p.error("--eval-merged (and --as-released) merge a LoRA into its base; a bottleneck adapter cannot be merged")
    try:
        args.update_seeds = [int(u) for u in str(args.update_seeds).split(",")]
    except ValueError:
        p.error("--update-seeds takes comma-separated integers")
    if (args.seeds is not None and args.seeds <= 0) or any(u < 0 for u in args.update_seeds):
        p.error("--seeds must be positive and --update-seeds non-negative")
    if args.old is None and args.seeds is None:
        args.seeds = 2
    args.regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if unknown := set(args.regimes) - set(toy.REGIMES):
        p.error(f"--regimes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(toy.REGIMES)}")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    if args.arms is not None and not args.arms:
        p.error("--arms needs at least one arm")
    return args


def parse_rate(text) -> float | list[float]:
    values = [float(v) for v in str(text).split(",")]
    return values[0] if len(values) == 1 else values


def default_out(args, kind: str = "") -> Path:
    def short(name):
        return Path(str(name)).name.replace("/", "_")

    def rate(r):  # per-layer rates by a short hash of their values: two schedules never share a directory
        return r if isinstance(r, float) else "layerwise-" + hashlib.sha1(json.dumps(r).encode()).hexdigest()[:8]

    rates = f"cross{rate(args.p_cross)}-intra{rate(args.p_intra)}"
    return Path("runs") / f"{short(args.old)}-{short(args.new)}-{args.peft}{kind}-{rates}-seed{args.seed}"


def check_compatible(old: str, new: str) -> None:
    """Refuse, before any training, an old/new pair a PEFT module cannot move between."""
    a, b = asdict(load_config(old)), asdict(load_config(new))
    for field in ARCH_FIELDS:
        if a[field] != b[field]:
            raise ValueError(f"{old} and {new} differ in {field} ({a[field]} vs {b[field]}): a PEFT module trained on "
                             "one cannot be applied to the other; pick two versions of the same architecture and size.")


def get_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """The learning rate of optimizer step `step` (from 0), as transformers' get_cosine_schedule_with_warmup gives it
    to the HF Trainer of the official run: linear warmup from 0 (lr0 * step / warmup, so the first step has lr 0),
    then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def add_peft(model, args, verbose: bool = True) -> None:
    if args.peft == "lora":
        lora_lib.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()], verbose=False)
    else:
        adapter_lib.add_adapter(model, bottleneck=args.adapter_bottleneck, placement=args.adapter_placement,
                                verbose=False)
    if verbose:
        print_trainable(model)


def check_settings(args) -> None:
    """Refuse, before anything is written or computed, what would fail later: an old/new pair a PEFT module cannot
    move between, per-layer rates of the wrong length, PEFT settings the model cannot take (tried on a weightless
    `meta` copy of the model), a new base whose tokenizer cannot be read."""
    check_compatible(args.old, args.new)
    cfg = load_config(args.old)
    per_layer(args.p_intra, cfg.num_hidden_layers, "--p-intra")
    per_layer(args.p_cross, cfg.num_hidden_layers, "--p-cross")
    with torch.device("meta"):
        add_peft(Transformer(cfg), args, verbose=False)
    load_tokenizer(args.new)  # (the old base's is loaded next, for the data) for a hub id: the new base is fetched now


def save_peft(model, out_dir: Path, base: str) -> None:
    """Write the module to out_dir.tmp, then rename: a kill while saving never leaves a half-written adapter."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    if any(isinstance(m, lora_lib.LoRALinear) for m in model.modules()):
        lora_lib.save_lora(model, tmp, base_model_name_or_path=base)
    else:
        adapter_lib.save_adapter(model, tmp, base_model_name_or_path=base)
    if is_main_process():
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)


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
    }


CHECKPOINT_KEYS = {"step", "trainable", "optimizer", "torch_rng", "cuda_rng"}


def restore_checkpoint(model, optimizer, path: Path) -> int:
    state = read_torch_file(path)
    if not CHECKPOINT_KEYS <= state.keys():
        raise ValueError(f"{path} is not a checkpoint written by train.py (it lacks "
                         f"{', '.join(sorted(CHECKPOINT_KEYS - state.keys()))}): "
                         "start the run again with --overwrite.")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["trainable"]):
        raise ValueError(f"{path} holds other trainable weights than this run's PEFT module: start the run again with "
                         "--overwrite.")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def wrap_layers(model, grad_checkpointing: bool = False, compile: bool = False) -> None:
    """Options for the training of large bases, applied to every decoder layer (undone by unwrap_layers):

    compile: torch.compile the layer (the kernels of a layer fuse; a Trans-PEFT drop decision is Python and stays
        outside the compiled graphs). The first steps pay the compilation.
    grad_checkpointing: in training, the layer keeps only its input and recomputes its activations in the backward
        pass: activation memory of one layer instead of all, for one more forward pass of compute. The recomputation
        must draw the random numbers the forward pass drew: torch.utils.checkpoint replays torch's global RNG
        (knowledge masking, LoRA dropout); Trans-PEFT's layer-dropping generator is replayed here."""
    for layer in model.model.layers:
        forward = layer.forward  # bound to the layer's class now (Trans-PEFT's, if it is on)
        if compile:
            forward = torch.compile(forward)
        if grad_checkpointing:
            forward = partial(_checkpointed, layer, forward)
        layer.forward = forward  # an instance attribute: Module.__call__ finds it before the class's


def unwrap_layers(model) -> None:
    for layer in model.model.layers:
        layer.__dict__.pop("forward", None)


@contextmanager
def interventions(model, p_intra=0.0, p_cross=0.0, seed: int = 0, p_attn: float = 0.0, grad_checkpointing: bool = False,
                  compile: bool = False):
    """Everything a training run switches on, in the one order that works, undone in reverse on the way out:
    Trans-PEFT (rates p_intra, p_cross; its drop generator seeded with `seed`, then reseeded per step by train()),
    control A (p_attn), then the layer wrappers (a wrapper binds the forward of the class the layer has when wrapped,
    so it must come after the class swaps). Afterwards the model has model.py's plain layers again, as evaluation
    expects. With every rate 0 nothing is switched on: the plain model trains."""
    if p_intra or p_cross:
        apply_transpeft(model, p_intra=p_intra, p_cross=p_cross, seed=seed)
    if p_attn:
        apply_attention_masking(model, p_attn)
    wrap_layers(model, grad_checkpointing, compile)
    try:
        yield model
    finally:
        unwrap_layers(model)
        remove_attention_masking(model)
        remove_transpeft(model)


def _checkpointed(layer, forward, *args, **kwargs):
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    rng = getattr(layer, "transpeft_rng", None)  # DroppingDecoderLayer's generator, shared by the model's layers
    state = rng.get_state() if rng is not None else None

    @contextmanager
    def replay():  # the recomputation sees the generator as the forward pass did; afterwards it is left as it was
        if state is None:
            yield
            return
        now = rng.get_state()
        rng.set_state(state)
        try:
            yield
        finally:
            rng.set_state(now)

    return checkpoint(forward, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), replay()), **kwargs)


def world() -> tuple[int, int]:
    """(rank, number of processes): (0, 1) unless launched by torchrun with several processes."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(args) -> None:
    """Under torchrun with more than one process: join the process group (NCCL on GPUs, gloo on CPUs) and pin this
    process to its GPU. Nothing happens in a plain `python train.py`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        on_gpu = args.device.startswith("cuda")
        dist.init_process_group("nccl" if on_gpu else "gloo")
        if on_gpu:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(args.device)


def shard(model) -> None:
    """FSDP2: shard every decoder layer, then the rest, across the processes. Each process keeps 1/N of every
    parameter (frozen base and PEFT alike) and gathers a layer's weights just before that layer runs."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def train(model, dataset: list[dict], args, run_dir: Path, pad_id: int, desc: str = "train") -> list[dict]:
    """The training loop. Returns the per-step log (also appended to run_dir/train_log.jsonl).

    With N processes (torchrun), every process builds the same global batch (the order is a function of the seed),
    takes every N-th example of it, and scales its loss by N: DDP and FSDP average gradients over processes, so the
    update equals the one-process update on the whole batch (with --loss-mean micro-batch, only where the
    micro-batches hold the same examples, as in the released run).
    """
    rank, n_proc = world()
    fsdp = n_proc > 1 and getattr(args, "fsdp", False)
    if n_proc > 1 and args.batch_size % n_proc:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {n_proc} processes.")
    device = model.lm_head.weight.device
    engine = model  # what the forward pass goes through
    if fsdp:
        shard(model)  # in place; the optimizer must see the sharded parameters
    elif n_proc > 1:
        # A PEFT weight inside a dropped FFN (a LoRA on gate/up/down, an FFN adapter) gets no gradient in that step:
        # DDP must be told to expect unused parameters.
        unused = any(r > 0 for r in (getattr(model, "transpeft_rates", None) or {}).get("p_cross", []))
        engine = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    # An epoch's last, incomplete batch is dropped (there is none with 100,000 MetaMathQA rows in batches of 16):
    # every batch then splits evenly over processes, and one process trains on exactly what N processes do.
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training examples do not fill one batch of {args.batch_size}.")
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = math.ceil(args.warmup_ratio * total)
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "train_log.jsonl"
    checkpoints = not fsdp  # sharded optimizer state: not checkpointed (yet); --resume is refused with --fsdp
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    start = 0
    if args.resume and ckpt_path.exists():
        start = restore_checkpoint(model, optimizer, ckpt_path)
        if rank == 0:
            print(f"resuming {desc} from step {start} of {total}")
    if rank == 0:  # the log keeps the steps up to the checkpoint; steps done after it are redone
        logged = log_path.read_text().splitlines() if log_path.exists() else []
        kept = [line for line in logged if json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
    on_gpu = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    model.train()
    last_saved, order_epoch = start, None
    bar = tqdm(range(start, total), initial=start, total=total, desc=desc, dynamic_ncols=True, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        # The data order is a fixed function of (seed, epoch), so a resumed run sees what the uninterrupted one would.
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = torch.randperm(len(dataset),
                                                generator=torch.Generator().manual_seed(args.seed + epoch)), epoch
        batch = [dataset[i] for i in order[index * args.batch_size : (index + 1) * args.batch_size].tolist()]
        lr = get_lr(step, total, args.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr

        n_supervised = sum(sum(label != IGNORE_INDEX for label in b["labels"][1:]) for b in batch)  # whole batch
        mine = batch[rank::n_proc]
        micro = [mine[i : i + args.micro_batch_size] for i in range(0, len(mine), args.micro_batch_size)]
        n_micro = n_proc * len(micro)  # micro-batches in the global batch: every process has as many
        loss_sum, n_tokens = 0.0, 0
        for j, mb in enumerate(micro):
            reseed_drops(model, args.seed, step)  # one drop pattern per step, for every micro-batch and process
            last = j == len(micro) - 1  # gradients are averaged across processes after the last micro-batch only
            if fsdp:
                model.set_requires_gradient_sync(last)
            ids, labels = collate(mb, pad_id)
            targets = next_token_targets(labels).to(device)
            with engine.no_sync() if (n_proc > 1 and not fsdp and not last) else nullcontext(), autocast:
                # summed over supervised tokens (the model computes logits only there), divided by their count in the
                # whole batch; times the process count, which the cross-process gradient average divides out again
                loss = engine(ids.to(device), targets=targets)
                if args.loss_mean == "batch":
                    loss = loss / n_supervised
                else:  # the released run's (HF Trainer): each micro-batch's own token mean, averaged over micro-batches
                    loss = loss / (targets != IGNORE_INDEX).sum() / n_micro
                (loss * n_proc).backward()
            loss_sum = loss_sum + loss.detach()  # a tensor: no host-device sync per micro-batch
            n_tokens += sum(len(b["input_ids"]) for b in mb)
        if n_proc > 1:  # the batch's loss and throughput, summed over processes
            totals = torch.stack([loss_sum.double(), torch.tensor(float(n_tokens), dtype=torch.float64, device=device)])
            dist.all_reduce(totals)
            loss_sum, n_tokens = totals[0], int(totals[1].item())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # one host-device sync for the loss and the gradient norm together (float64 holds both exactly)
        loss_sum, grad_norm = torch.stack([torch.as_tensor(loss_sum, dtype=torch.float64, device=device),
                                           grad_norm.double()]).tolist()
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            bar.close()
            kept = (f"the last good checkpoint (step {last_saved}) is {ckpt_path}" if last_saved
                    else "no checkpoint was written yet")
            raise Diverged(f"The loss became {loss_sum} at step {step + 1}: training stopped, nothing of this step was "
                           f"kept and {kept}. Resuming would repeat the same steps: start again with a lower --lr "
                           "(--overwrite), or check the data.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        entry = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": n_tokens / (time.time() - t0)}
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        done = step + 1
        if checkpoints and (done % args.save_every == 0 or done == total or done == args.stop_after):
            if rank == 0:
                save_atomic(checkpoint_state(model, optimizer, done), ckpt_path)
            last_saved = done
        if done == args.stop_after and done < total:
            bar.close()
            raise StopRequested(f"Stopped after step {done} of {total} as asked (--stop-after): run the same command "
                                "with --resume to continue.")
    bar.close()
    model.eval()
    if n_proc > 1:
        dist.barrier()  # rank 0 has finished writing the log
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def train_and_save(base: str, dataset, args, run_dir: Path, pad_id: int, desc: str, transpeft: bool):
    """Load base, attach a fresh PEFT module, (optionally) switch Trans-PEFT on, train, save the module."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(args.seed)
    model = load_model(base, dtype=dtype, device=args.device)
    add_peft(model, args)
    if args.peft_dtype == "bfloat16":  # the released run's: peft casts a new LoRA to its bf16 base's dtype
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)  # and AdamW keeps its state in the parameters' dtype
    rates = dict(p_intra=args.p_intra, p_cross=args.p_cross) if transpeft else {}
    with interventions(model, **rates, seed=args.seed, grad_checkpointing=args.grad_checkpointing,
                       compile=args.compile):
        log = train(model, dataset, args, run_dir, pad_id, desc)
    save_peft(model, run_dir / "adapter", base)
    if dist.is_initialized():
        dist.barrier()  # the adapter is on disk before any process reads it
    return model, log


def prepare_data(source: str, tokenizer, args) -> list[dict]:
    examples = load_examples(source, "train", args.max_samples)
    dataset, dropped = tokenize_dataset(examples, tokenizer, args.max_len)
    if not dataset:
        raise ValueError(f"No training example of {source} fits in --max-len {args.max_len}: every prompt fills it.")
    if dropped and is_main_process():
        print(f"note: {dropped} of {len(examples)} examples dropped: their prompt alone fills --max-len {args.max_len}")
    return dataset


# What a run writes into its directory, and the flags a resumed run may change: they decide how it runs, not what
# it computes (the checkpoint and the data order are the same whatever they are).
RUN_OUTPUTS = ("args.json", "train_log.jsonl", "checkpoint.pt", "adapter", "eval-old.jsonl", "eval-new.jsonl",
               "results.json", "refit-new")
HOW_FLAGS = ("device", "micro_batch_size", "eval_batch_size", "save_every", "stop_after", "resume", "overwrite",
             "compile", "grad_checkpointing", "out")


def check_run_dir(out: Path, args) -> None:
    """Refuse, before anything is written, a run that would lose or mix another: a finished run without --overwrite,
    an unfinished one without --resume or --overwrite, a --resume with other result-deciding flags than the run's."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them.")
    started = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if (out / "results.json").exists() and not args.overwrite:
        raise ValueError(f"{out} already holds a finished run (results.json): pass --overwrite to replace it, or "
                         "another --out.")
    if started and not (args.resume or args.overwrite):
        raise ValueError(f"{out} holds an unfinished run ({', '.join(started)}): pass --resume to continue it, or "
                         "--overwrite to start it again (or choose another --out).")
    if not args.resume:
        return
    if not (out / "checkpoint.pt").exists():
        raise ValueError(f"Nothing to resume in {out}: it has no checkpoint.pt (none is written before step "
                         "--save-every). Start the run again with --overwrite.")
    if not (out / "args.json").exists():
        raise ValueError(f"{out} has a checkpoint but no args.json, so its flags are unknown: start the run again with "
                         "--overwrite.")
    stored, now = read_json(out / "args.json"), json.loads(json.dumps(vars(args), default=str))
    for name, value in now.items():
        if name not in HOW_FLAGS and stored.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{out} was started with {flag} {stored.get(name)} and this command says {value}: a "
                             "resumed run keeps the flags that decide its result (only "
                             f"{', '.join('--' + h.replace('_', '-') for h in HOW_FLAGS)} "
                             "may change). Resume with the original value, or start again with --overwrite.")


def remove(*paths: Path) -> None:
    """Delete files and directories that may or may not exist."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def begin_run(out: Path, args) -> None:
    """After every check: clear a run that --overwrite replaces, remove what an interrupted save left behind, and
    record the flags (a resumed run keeps the args.json it started with)."""
    if not is_main_process():
        return
    if args.overwrite:
        remove(*(out / name for name in RUN_OUTPUTS))
    remove(out / "checkpoint.pt.tmp", out / "adapter.tmp", out / "refit-new" / "checkpoint.pt.tmp",
           out / "refit-new" / "adapter.tmp")
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))


def model_for_eval(base: str, adapter_dir: Path, args):
    """base with the saved adapter (merged in bf16 with --eval-merged; eval.load_for_eval), sharded under --fsdp."""
    model = load_for_eval(base, adapter_dir, args.device, args.eval_merged)
    if dist.is_initialized() and args.fsdp:
        shard(model)
    return model


def run_experiment(args, train_on_new: bool = False) -> dict:
    """Train on --old, evaluate there (source) and, unchanged, on --new (transfer); with --refit-new, or alone with
    train_on_new (the refit arm of --arms), a plain module trained on --new and evaluated there (the upper bound)."""
    out = Path(args.out) if args.out else default_out(args)
    check_run_dir(out, args)
    check_settings(args)
    old_tok, new_tok = load_tokenizer(args.old), load_tokenizer(args.new)
    train_set = None if train_on_new else prepare_data(args.train_data, old_tok, args)
    eval_set = load_examples(args.eval_data, "test", args.eval_limit, need_answers=True)
    begin_run(out, args)
    if is_main_process() and train_set is not None:
        print(f"run directory: {out}  ({len(train_set)} training examples, {len(eval_set)} evaluation examples)")

    t0 = time.time()
    ev = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
              compile=args.compile and not dist.is_initialized(),
              scorer=args.scorer)
    results = {"old": args.old, "new": args.new, "peft": args.peft, "p_intra": args.p_intra, "p_cross": args.p_cross,
               "peft_dtype": args.peft_dtype, "loss_mean": args.loss_mean, "eval_merged": args.eval_merged,
               "source_old": None, "transfer_new": None, "refit_new": None}
    if not train_on_new:
        model, log = train_and_save(args.old, train_set, args, out, old_tok.pad_token_id, "train on old",
                                    transpeft=True)
        results["final_train_loss"] = log[-1]["loss"] if log else None
        if args.eval_merged:  # the released evaluation: the saved adapter merged into a freshly loaded bf16 base
            del model
            model = model_for_eval(args.old, out / "adapter", args)
        results["source_old"] = evaluate(model, old_tok, eval_set, out_jsonl=out / "eval-old.jsonl", desc="eval on old",
                                         **ev)
        del model
        moved = model_for_eval(args.new, out / "adapter", args)
        results["transfer_new"] = evaluate(moved, new_tok, eval_set, out_jsonl=out / "eval-new.jsonl",
                                           desc="eval on new", **ev)
        del moved

    if args.refit_new or train_on_new:  # the upper bound: a plain PEFT module trained on the new base itself
        refit_set = prepare_data(args.train_data, new_tok, args)
        refit, _ = train_and_save(args.new, refit_set, args, out / "refit-new", new_tok.pad_token_id, "train on new",
                                  transpeft=False)
        if args.eval_merged:
            del refit
            refit = model_for_eval(args.new, out / "refit-new" / "adapter", args)
        results["refit_new"] = evaluate(refit, new_tok, eval_set, out_jsonl=out / "refit-new" / "eval-new.jsonl",
                                        desc="eval refit", **ev)
    results["minutes"] = (time.time() - t0) / 60
    if is_main_process():
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(results_table(results))
    return results


# -----------------------------------------------------------------------------------------------------------
# The study: arms × seeds × bases, paired. The toy study (python train.py with no --old/--new) runs every arm of
# toy.ARMS on toy-v1 and moves each trained module to every update of every regime; --arms runs the paper's
# comparison on real bases with the same summary.


def toy_lora(arm: dict, seed: int, base: str, dataset, tokenizer, run_dir: Path, recipe: dict, device="cpu"):
    """One arm's LoRA for one seed, trained on base and saved to run_dir/adapter; returns (model, log).

    Pairing: every arm of a seed starts from the same LoRA initialisation (torch.manual_seed(seed) right before
    add_lora) and sees the same data order (train() draws it from the seed); the Trans-PEFT drops from a generator
    seeded with the seed. Only the arm's own intervention differs."""
    targs = argparse.Namespace(lr=recipe["lr"], weight_decay=0.0, warmup_ratio=recipe["warmup_ratio"], grad_clip=1.0,
                               batch_size=recipe["batch_size"], micro_batch_size=recipe["batch_size"],
                               max_steps=recipe["steps"], epochs=1, seed=seed, save_every=10**9, resume=False,
                               stop_after=None, loss_mean="batch")
    torch.manual_seed(seed)
    model = load_model(base, device=device)
    lora_lib.add_lora(model, r=recipe["r"], alpha=recipe["alpha"], dropout=arm.get("lora_dropout", recipe["dropout"]),
                      targets=list(recipe["targets"]), verbose=False)
    rates = {k: arm[k] for k in ("p_intra", "p_cross", "p_attn") if k in arm}
    with interventions(model, **rates, seed=seed):
        log = train(model, dataset, targs, run_dir, tokenizer.pad_token_id,
                    desc=f"seed {seed} {arm['key']} on {Path(base).name}")
    lora_lib.save_lora(model, run_dir / "adapter", base_model_name_or_path=base)
    return model, log


def toy_arm(arm: dict, seed: int, old: str, updates: list[tuple], dataset, test, test_batch, tokenizer, run_dir: Path,
            recipe: dict, device="cpu") -> list[dict]:
    """Train one arm for one seed on toy-v1 and evaluate it there (source) and, unchanged, on every update (transfer),
    with both sides of the paper's bound (transpeft.ffn_gradient) on the test questions; one row per update.
    updates: (regime, update seed, directory). The upper bound (train_on="new") is trained on each of `updates`
    itself; the study passes it the first update only, as each costs a training."""
    ev = dict(max_new_tokens=recipe["max_new_tokens"], batch_size=len(test))
    ids, targets = test_batch
    if arm.get("train_on") == "new":
        rows = []
        for regime, u, path in updates:
            model, log = toy_lora(arm, seed, path, dataset, tokenizer, run_dir / Path(path).name, recipe, device)
            acc = evaluate(model, tokenizer, test, out_jsonl=run_dir / Path(path).name / "eval.jsonl",
                           desc=f"eval on {Path(path).name}", **ev)
            rows.append({"arm": arm["key"], "seed": seed, "regime": regime, "update_seed": u,
                         "final_loss": log[-1]["loss"], "source": None, "transfer": acc["accuracy"]})
        return rows
    model, log = toy_lora(arm, seed, old, dataset, tokenizer, run_dir, recipe, device)
    own = evaluate(model, tokenizer, test, out_jsonl=run_dir / "eval-toy-v1.jsonl", desc="eval on toy-v1", **ev)
    loss_old, grad = ffn_gradient(model, ids, targets)
    rows = []
    for regime, u, path in updates:
        moved = lora_lib.load_lora(load_model(path, device=device), run_dir / "adapter")
        name = Path(path).name
        on_new = evaluate(moved, tokenizer, test, out_jsonl=run_dir / f"eval-{name}.jsonl", desc=f"eval on {name}",
                          **ev)
        with torch.no_grad():
            loss_new = (moved(ids, targets=targets) / (targets != IGNORE_INDEX).sum()).item()
        rows.append({"arm": arm["key"], "seed": seed, "regime": regime, "update_seed": u, "final_loss": log[-1]["loss"],
                     "source": own["accuracy"], "transfer": on_new["accuracy"], "ffn_grad_norm": grad,
                     "loss_old": loss_old, "loss_new": loss_new})
    return rows


# ---- statistics: paired differences over seeds


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


LEARNED = 0.9  # source accuracy from which an arm counts as having learned the task on toy-v1


# Student's t quantile t(0.975, df): a 95% interval for a mean is mean ± T975[df] * SE (df = n - 1; a df between
# the listed ones takes the next smaller one, which widens the interval slightly).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201,
        12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060,
        30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired sign-flip (permutation) test of "mean difference 0": under that hypothesis
    each seed's difference is as likely to have either sign, so p = the fraction of the 2^n sign patterns whose
    |mean| reaches the observed one. Exact up to n = 16 (65,536 patterns); beyond, 2^16 random patterns."""
    d = torch.tensor(diffs, dtype=torch.float64)
    n = len(diffs)
    if n <= 16:
        signs = (torch.arange(2**n)[:, None] >> torch.arange(n)) & 1  # (2^n, n): every pattern, the identity included
    else:
        signs = torch.randint(0, 2, (2**16, n), generator=torch.Generator().manual_seed(0))
        signs[0] = 0
    flipped = ((1 - 2 * signs.double()) * d).mean(1).abs()
    return (flipped >= d.mean().abs() - 1e-12).double().mean().item()


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment: the k-th smallest of m p-values times (m - k + 1), kept monotone, capped at 1.
    Rejecting where the adjusted p < 0.05 keeps the chance of any false "beyond noise" among the m at 5%."""
    m, adjusted, running = len(pvalues), [0.0] * len(pvalues), 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired_interval(diffs: list[float]) -> dict:
    """Mean of paired differences, its std, SE, the half-width of its 95% t interval (n >= 2), and the sign-flip p."""
    m, sd = mean_std(diffs)
    se = sd / len(diffs) ** 0.5
    half = T975[max(k for k in T975 if k <= len(diffs) - 1)] * se
    return {"n": len(diffs), "mean": m, "std": sd, "se": se, "ci95": half, "excludes_0": abs(m) > half,
            "p": sign_flip_p(diffs)}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties share their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var > 0 else float("nan")


PREDICTION = {"full": "the paper expects Trans-PEFT to help where an update rewrites FFN knowledge more than attention",
              "ffn": "the paper predicts the largest Trans-PEFT gains here and none from control A",
              "attn": "the paper predicts no Trans-PEFT gain here; control A, which hides attention instead, should "
                      "gain"}


def summarize_study(rows: list[dict], arms: list[dict] | None = None, source_label: str = "source (toy-v1)",
                    learned: float | None = LEARNED) -> tuple[str, dict]:
    """The study's tables from its rows (one per arm, seed, regime, update seed).

    Per regime and arm: transfer accuracy, and the paired difference of transfer against plain LoRA over seeds
    (primary: every seed, intention to treat, since whether an intervention lets the task be learned at all is part
    of its effect; secondary, where `learned` is given: the seeds where both arms reached that source accuracy,
    labelled so, since it compares arms on different subsets). Every update seed of a regime evaluates the same
    trained modules, so the independent samples are the seeds: a seed's differences are averaged over the regime's
    update seeds, and n is the number of seeds. 95% intervals from the t distribution; p from the sign-flip test,
    Holm-adjusted over every arm × regime comparison.
    Then, where both the FFN-only and the attention-only update were run, the regime contrast: the paper's own
    prediction is that Trans-PEFT's gain depends on what the update moved, so per arm and seed
    c = Δ(ffn update) − Δ(attn update), with its t interval and sign-flip p, Holm-adjusted over the arms (a family of
    its own): c > 0 for the FFN interventions, c < 0 for control A, if the paper's account is the one at work.
    Then the paper's bound: per arm the FFN-output gradient norm G on toy-v1 and the loss gap per regime, with
    Spearman's rank correlation of the two over arms × seeds."""
    arms = arms or toy.ARMS
    names = {a["key"]: a["name"] for a in arms}
    present = [a["key"] for a in arms if any(r["arm"] == a["key"] for r in rows)]
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    threshold = learned

    def has_learned(r):  # the upper bound is trained on the update itself
        return threshold is not None and (r["source"] is None or r["source"] >= threshold)

    summary: dict = {"regimes": {}, "arms": {}, "learned_threshold": threshold}
    for key in present:  # source accuracy does not depend on the regime: one value per seed
        src = {r["seed"]: r["source"] for r in rows if r["arm"] == key and r["source"] is not None}
        summary["arms"][key] = {"name": names[key], "seeds": len({r["seed"] for r in rows if r["arm"] == key}),
                                "learned": (sum(s >= threshold for s in src.values())
                                            if src and threshold is not None else None),
                                "source": mean_std(list(src.values())) if src else None}
    tests = []  # (regime, arm, p) of every primary comparison, for Holm
    gains = {}  # (regime, arm) -> {seed: its difference from plain LoRA, averaged over the regime's update seeds}
    for regime in regimes:
        rr = [r for r in rows if r["regime"] == regime]
        plain = {(r["update_seed"], r["seed"]): r for r in rr if r["arm"] == "plain"}
        per_arm = {}
        for key in present:
            rs = [r for r in rr if r["arm"] == key]
            if not rs:  # (the upper bound is trained on the first update only)
                continue
            s = {"transfer": mean_std([r["transfer"] for r in rs])}
            every, learned_only = {}, {}  # seed -> its differences, one per update seed
            for r in rs:
                p = plain.get((r["update_seed"], r["seed"]))
                if p is None or key == "plain":
                    continue
                every.setdefault(r["seed"], []).append(r["transfer"] - p["transfer"])
                if has_learned(r) and has_learned(p):
                    learned_only.setdefault(r["seed"], []).append(r["transfer"] - p["transfer"])
            for name, by_seed in (("itt", every), ("learned_subset", learned_only)):
                diffs = [sum(d) / len(d) for d in by_seed.values()]
                if len(diffs) > 1:
                    s[name] = paired_interval(diffs)
                if name == "itt":
                    gains[regime, key] = dict(zip(by_seed, diffs))
            if "itt" in s:
                tests.append((regime, key, s["itt"]["p"]))
            per_arm[key] = s
        summary["regimes"][regime] = {"arms": per_arm, "bound": bound_summary(rr, present)}
    for (regime, key, _), adj in zip(tests, holm([t[2] for t in tests])):
        summary["regimes"][regime]["arms"][key]["itt"]["p_holm"] = adj
    summary["comparisons"] = len(tests)
    contrast = {}
    for key in present:
        ffn, attn = gains.get(("ffn", key), {}), gains.get(("attn", key), {})
        c = [ffn[seed] - attn[seed] for seed in ffn if seed in attn]
        if len(c) > 1:
            contrast[key] = paired_interval(c)
    for key, adj in zip(contrast, holm([c["p"] for c in contrast.values()])):
        contrast[key]["p_holm"] = adj
    summary["regime_contrast"] = contrast
    return format_study(summary, names, present, regimes, source_label), summary


def bound_summary(rows: list[dict], present: list[str]) -> dict:
    """For one regime: per arm the mean FFN-output gradient norm G on toy-v1 and the mean loss gap |L_new - L_old|
    (a seed's gap averaged over the regime's update seeds), and Spearman's ρ(G, gap) over every arm's seeds."""
    gaps = {}  # (arm, seed) -> (G, [gap per update seed])
    for r in rows:
        if r.get("ffn_grad_norm") is not None:
            gap = abs(r["loss_new"] - r["loss_old"])
            gaps.setdefault((r["arm"], r["seed"]), (r["ffn_grad_norm"], []))[1].append(gap)
    points = {key: (g, sum(gs) / len(gs)) for key, (g, gs) in gaps.items()}  # (arm, seed) -> (G, mean gap)
    out = {"arms": {}}
    for key in present:
        pts = [pt for (a, _), pt in points.items() if a == key]
        if pts:
            out["arms"][key] = {"grad_norm": sum(p[0] for p in pts) / len(pts),
                                "loss_gap": sum(p[1] for p in pts) / len(pts)}
    if len(points) > 2:
        g, gap = zip(*points.values())
        out["spearman"], out["n"] = spearman(list(g), list(gap)), len(points)
    return out


def format_study(summary: dict, names: dict, present: list[str], regimes: list[str], source_label: str) -> str:
    def delta(c):
        if c is None:
            return ""
        mark = " *" if c.get("p_holm", 1) < 0.05 else ""
        return f"{c['mean']:+.2f} ± {c['ci95']:.2f} p {c.get('p_holm', c['p']):.2f}{mark}"

    w = max(len(names[k]) for k in present)
    with_learned = summary["learned_threshold"] is not None
    lines = [f"{'arm':<{w}}  " + (f"{'learned':>7}  " if with_learned else "") + f"{source_label:>15}"]
    for key in present:
        a = summary["arms"][key]
        src = f"{a['source'][0]:.2f} ± {a['source'][1]:.2f}" if a["source"] else "(trained on it)"
        learned = f"{a['learned']}/{a['seeds']}  " if a["learned"] is not None else "-  "
        lines.append(f"{names[key]:<{w}}  " + (f"{learned:>9}" if with_learned else "") + f"{src:>15}")
    cell = 34
    lines += ["",
              "transfer accuracy on the updates (mean ± std) and its paired difference to plain LoRA over every seed "
              "(95% t interval, sign-flip p Holm-adjusted; * p < 0.05)",
              f"{'arm':<{w}}  " + "  ".join(f"{regime + ' update':<{cell}}" for regime in regimes)]
    for key in present:
        cells = []
        for regime in regimes:
            s = summary["regimes"][regime]["arms"].get(key)
            cells.append(f"{s['transfer'][0]:.2f} ± {s['transfer'][1]:.2f}  {delta(s.get('itt')):<20}" if s else "-")
        lines.append(f"{names[key]:<{w}}  " + "  ".join(f"{c:<{cell}}" for c in cells))
    if summary["learned_threshold"] is not None:
        lines += ["", "secondary: the same difference over the seeds where both arms learned the task (source >= "
                  f"{summary['learned_threshold']}); unadjusted p",
                  f"{'arm':<{w}}  " + "  ".join(f"{regime + ' update':<{cell}}" for regime in regimes)]
    for key in present[1:] if summary["learned_threshold"] is not None else []:
        cells = []
        for regime in regimes:
            c = summary["regimes"][regime]["arms"].get(key, {}).get("learned_subset")
            cells.append(f"{delta(c)} (n {c['n']})" if c else "")
        lines.append(f"{names[key]:<{w}}  " + "  ".join(f"{c:<{cell}}" for c in cells))
    if summary["regime_contrast"]:
        lines += ["", "regime contrast: the gain over plain LoRA under the FFN-only update minus that under the "
                  "attention-only update, per seed (95% t interval, sign-flip p Holm-adjusted over the arms); the "
                  "paper's account predicts > 0 for the FFN interventions and < 0 for control A"]
        lines += [f"{names[key]:<{w}}  {delta(c)}" for key, c in summary["regime_contrast"].items()]
    if any(summary["regimes"][regime]["bound"]["arms"] for regime in regimes):
        lines += ["", "the paper's bound: G = ‖∂L/∂(FFN outputs)‖ on toy-v1 and the loss gap |L(update) − L(toy-v1)|, "
                  "test questions, module attached, means over seeds",
                  f"{'arm':<{w}}  {'G':>8}  " + "  ".join(f"{'gap ' + regime:>10}" for regime in regimes)]
        for key in present:
            b = [summary["regimes"][regime]["bound"]["arms"].get(key) for regime in regimes]
            if b[0]:
                gaps = "  ".join(f"{x['loss_gap']:>10.4f}" for x in b)
                lines.append(f"{names[key]:<{w}}  {b[0]['grad_norm']:>8.4f}  {gaps}")
        lines.append(f"{'Spearman ρ(G, gap), arms × seeds':<{w}}  {'':>8}  " + "  ".join(
            f"{summary['regimes'][regime]['bound'].get('spearman', float('nan')):>+10.2f}" for regime in regimes))
    lines.append("")
    for regime in regimes:
        lines.append(verdict(regime, summary["regimes"][regime], names))
    if summary["regime_contrast"]:
        beyond = [f"{names[k]} {c['mean']:+.2f}" for k, c in summary["regime_contrast"].items() if c["p_holm"] < 0.05]
        lines.append("regime contrast (ffn − attn): " + ("beyond noise: " + "; ".join(beyond) if beyond else
                     "no arm's gain depends on what the update moved beyond noise") + " (the paper's account predicts "
                     "> 0 for masking and dropping, < 0 for control A).")
    return "\n".join(lines)


def verdict(regime: str, s: dict, names: dict) -> str:
    """One sentence per regime: what differs from plain LoRA beyond noise, beside what the paper predicts."""
    beyond = [f"{names[k]} {c['itt']['mean']:+.2f}" for k, c in s["arms"].items()
              if c.get("itt", {}).get("p_holm", 1) < 0.05]
    rho = s["bound"].get("spearman")
    found = ("beyond noise: " + "; ".join(beyond)) if beyond else "no arm differs from plain LoRA beyond noise"
    plain = s["arms"].get("plain", {}).get("transfer", (float("nan"),))[0]
    bound = f"; ρ(G, gap) {rho:+.2f}" if rho is not None else ""
    predicted = f" ({PREDICTION[regime]})" if regime in PREDICTION else ""
    return f"{regime} update: plain transfers {plain:.2f}; {found}{bound}{predicted}."


def toy_out(args) -> Path:
    return Path(args.out or ("runs/toy-study-quick" if args.quick else "runs/toy-study"))


def run_toy_study(args) -> dict:
    """The embedded default: every arm of toy.ARMS (or --arms) for every seed, moved to every update of every regime,
    then the drift analysis of each update, the tables and the chart."""
    from transpeft import analyze_drift

    t_start = time.time()
    recipe, base_recipe, root = dict(toy.LORA_RECIPE), toy.RECIPE, None
    if args.quick:  # a smoke test of the whole path, for CI: tiny bases, a few steps; the numbers mean nothing
        base_recipe = {"v1": {**toy.RECIPE["v1"], "steps": 30}, "v2": {**toy.RECIPE["v2"], "steps": 10}}
        root = cache_dir() / "quick"  # beside, not over, the real bases
        recipe.update(steps=6)
    keys = [a["key"] for a in toy.ARMS]
    if args.arms and (unknown := set(args.arms) - set(keys) - {"all"}):
        raise ValueError(f"Unknown toy arm(s) {', '.join(sorted(unknown))}: choose from {', '.join(keys)}, or all.")
    default = [a["key"] for a in toy.ARMS if not a.get("on_request")]
    wanted = keys if "all" in (args.arms or []) else args.arms or default
    arms = [a for a in toy.ARMS if a["key"] in wanted]
    if arms[0]["key"] != "plain":
        raise ValueError("The toy study compares every arm with plain LoRA: --arms must include plain.")
    out = toy_out(args)
    if args.resume:
        raise ValueError("The toy study cannot be resumed: run it again with --overwrite.")
    started = (out / "args.json").exists() or (out / "results.json").exists()
    if started and not args.overwrite:
        state = "a finished study (results.json)" if (out / "results.json").exists() else "an unfinished study"
        raise ValueError(f"{out} already holds {state}: pass --overwrite to replace it, or another --out.")
    if args.overwrite:  # the study's own outputs only
        remove(out / "args.json", out / "results.json", out / "study.png", *out.glob("seed[0-9]*"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({**vars(args), "recipe": recipe}, indent=2, default=str))

    updates = []  # (regime, update seed, directory)
    for regime in args.regimes:
        for u in args.update_seeds:
            old, new = toy.build_bases(u, recipe=base_recipe, root=root, regime=regime)
            toy.task(toy.make_world(u))  # asserts that the task's answers hold on this update too
            updates.append((regime, u, new))
    train_examples, test = toy.task(toy.make_world(0))
    if args.quick:
        test = test[:12]
    tokenizer = load_tokenizer(old)
    dataset, _ = tokenize_dataset(train_examples, tokenizer, recipe["max_len"], prompt_fn=toy.train_prompt)
    scored, _ = tokenize_dataset(test, tokenizer, recipe["max_len"], prompt_fn=toy.train_prompt)  # for the losses
    ids, labels = collate(scored, tokenizer.pad_token_id)
    test_batch = (ids.to(args.device), next_token_targets(labels).to(args.device))

    rows = []
    for seed in range(args.seeds):
        for arm in arms:
            t0 = time.time()
            on = updates[:1] if arm.get("train_on") == "new" else updates  # the upper bound: on the first update only
            new_rows = toy_arm(arm, seed, old, on, dataset, test, test_batch, tokenizer,
                               out / f"seed{seed}" / arm["key"], recipe, args.device)
            rows += new_rows
            src = f"{new_rows[0]['source']:.2f}" if new_rows[0]["source"] is not None else "  - "
            transfer = " ".join(f"{r['regime']}-u{r['update_seed']} {r['transfer']:.2f}" for r in new_rows)
            print(f"seed {seed} | {arm['name']:<42} | source {src} | transfer {transfer} | {time.time() - t0:.0f}s")
    prompts = torch.tensor([tokenizer.encode(e["question"]) for e in test])  # every toy question is 8 words long
    drift = {Path(new).name: analyze_drift(load_model(old), load_model(new), prompts) for _, _, new in updates}
    table, summary = summarize_study(rows, arms)
    print("\n" + table + "\n\ndrift of each update, mean over layers (each block fed toy-v1's hidden states on the "
                         "test questions)")
    print(f"{'update':<20} " + " ".join(f"{t:>11}" for t in ("attn ΔW/W", "ffn ΔW/W", "attn 1-cos", "ffn 1-cos")))
    for name, layers in drift.items():
        keys = ("attn_weight", "ffn_weight", "attn_cos", "ffn_cos")
        means = [sum(layer[k] for layer in layers) / len(layers) for k in keys]
        print(f"{name:<20} " + " ".join(f"{m:>11.3f}" for m in means))
    results = {"recipe": recipe, "arms": arms, "seeds": args.seeds, "regimes": args.regimes,
               "update_seeds": args.update_seeds,
               "rows": rows, "summary": summary, "drift": drift, "minutes": (time.time() - t_start) / 60}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    toy.chart(summary, [a["key"] for a in arms if a["key"] != "plain"], args.regimes, out / "study.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'study.png'} ({results['minutes']:.1f} min)")
    return results


REAL_ARMS = {"plain": "direct transfer: plain PEFT trained on old", "transpeft": "Trans-PEFT trained on old",
             "refit": "upper bound: plain PEFT trained on new"}


def run_arms(args) -> dict:
    """python train.py --old A --new B --arms plain,transpeft,refit: the paper's comparison, one run per arm and seed
    under <out>/<arm>-seed<s> (each an ordinary run: --resume continues it, a finished one is reused), summarised as
    the toy study is: seeds pair the arms (the same PEFT initialisation and data order)."""
    if unknown := set(args.arms) - set(REAL_ARMS):
        raise ValueError(f"Unknown arm(s) {', '.join(sorted(unknown))} for real bases: choose from "
                         f"{', '.join(REAL_ARMS)}.")
    out = Path(args.out) if args.out else default_out(args, kind="-arms")
    rows = []
    for seed in range(args.seed, args.seed + (args.seeds or 1)):
        for key in args.arms:
            run = argparse.Namespace(**{**vars(args), "arms": None, "seed": seed, "out": str(out / f"{key}-seed{seed}"),
                                        "refit_new": False})
            if key != "transpeft":
                run.p_intra = run.p_cross = 0.0
            done = Path(run.out) / "results.json"
            r = read_json(done) if done.exists() and args.resume else run_experiment(run, train_on_new=key == "refit")
            result = r["refit_new"] if key == "refit" else r["transfer_new"]
            rows.append({"arm": key, "seed": seed, "regime": Path(str(args.new)).name, "update_seed": 0,
                         "source": r["source_old"]["accuracy"] if key != "refit" else None,
                         "transfer": result["accuracy"]})
    arms = [{"key": k, "name": REAL_ARMS[k]} for k in ["plain", "transpeft", "refit"] if k in args.arms]
    table, summary = summarize_study(rows, arms, source_label=f"source ({Path(str(args.old)).name})", learned=None)
    if is_main_process():
        print("\n" + table)
        (out / "arms.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return summary


def results_table(r: dict) -> str:
    rows = [("trained on old, on old (source)", r["old"], r["source_old"]),
            ("same module on new (direct transfer)", r["new"], r["transfer_new"]),
            ("trained on new, on new (upper bound)", r["new"], r["refit_new"])]
    rows = [row for row in rows if row[2]]
    width = max(len(str(base)) for _, base, _ in rows)
    lines = [f"\n{'setting':<38} {'base':<{width}}  GSM8K exact match ({rows[0][2]['scorer']} scorer)   lenient / "
             "official scorer"]
    lines += [f"{name:<38} {str(base):<{width}}  {res['accuracy']:7.2%}  ({res['correct']}/{res['total']}){'':16}"
              f"{res['accuracy_lenient']:7.2%} / {res['accuracy_official']:.2%}" for name, base, res in rows]
    return "\n".join(lines)


def interrupted(args, argv: list[str]) -> str:
    """The one line a Ctrl-C ends with: where the last checkpoint is, and the command that continues from it."""
    if args.old is None:
        return (f"interrupted: the toy study in {toy_out(args)} is incomplete; run the same command with --overwrite "
                "to start it again.")
    out = Path(args.out) if args.out else default_out(args)
    flags = [a for a in argv if a not in ("--resume", "--overwrite")]
    ckpt = next((c for c in (out / "refit-new" / "checkpoint.pt", out / "checkpoint.pt") if c.exists()), None)
    if ckpt is None:
        again = shlex.join(flags + ["--overwrite"])
        return f"interrupted before the first checkpoint in {out}; start again with: python train.py {again}"
    again = shlex.join(flags + ["--resume"])
    return f"interrupted: the last checkpoint is {ckpt}; continue with: python train.py {again}"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    init_distributed(args)
    try:
        if dist.is_initialized() and (args.old is None or (args.fsdp and args.resume)):
            raise ValueError("the toy study runs in one process, and --resume is not supported with --fsdp (no "
                             "checkpoints are written then): run without torchrun, or without --resume.")
        if args.old is None:
            run_toy_study(args)
        elif args.arms:
            run_arms(args)
        else:
            run_experiment(args)
    except StopRequested as e:
        if is_main_process():
            print(e)
    except KeyboardInterrupt:
        sys.exit(interrupted(args, argv))
    except (Diverged, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if dist.is_initialized():  # after a run every process reached: no collective may be in flight when the group goes
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
