"""
The transfer experiment: train a PEFT module on the OLD base, then measure it on the old base (source accuracy) and,
unchanged, on the NEW base (direct transfer); optionally train the same PEFT on the new base (the upper bound).

    python train.py                                            # the embedded toy study (study.py): CPU, minutes
    python train.py --old qwen2 --new qwen2.5                  # the paper's Qwen2-7B -> Qwen2.5-7B run (GPU, hub)
    python train.py --old qwen2 --new qwen2.5 --arms plain,transpeft,refit   # the paper's comparison, one run each

The defaults are the released recipe (github gccnlp/Trans-PEFT, scripts/trans-peft-qwen.sh), except where
docs/differences.md lists a difference and the flag that restores the released choice (--as-released sets them).

The loop, top to bottom: seed -> data -> model -> PEFT -> Trans-PEFT -> AdamW over the trainable parameters ->
for each step {lr = get_lr(step); micro-batches: loss, backward; clip; step; zero_grad} -> checkpoint (PEFT
weights, optimizer, step, RNG states) atomically. The loop takes a TrainSettings, not the command line's flags.

Files in the run directory (--out): args.json, train_log.jsonl (one line per step), checkpoint.pt (to --resume),
adapter/ (PEFT format for LoRA), eval-*.jsonl (per example), results.json.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads ends in one line, not a traceback of the imports
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting"))

import argparse
import gc
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as recompute  # activation recomputation (--grad-checkpointing)
from tqdm import tqdm

import adapter as adapter_lib
import lora as lora_lib
from checkpoint import (check_checkpoint, check_device, check_same_architecture, is_main_process, load_config,
                        load_model, load_tokenizer, print_trainable, read_json)
from data import IGNORE_INDEX, collate, fingerprint, load_examples, next_token_targets, training_set
from eval import check_new_tokens, eval_sources, evaluate, load_for_eval, results_table
from model import Transformer
from scoring import SCORERS
from rundir import (SHARDED, acquire_lock, begin_run, check_data, check_run_dir, checkpoint_state, decided_by_rank0,
                    default_out, interrupted, release_lock, restore_checkpoint, restore_sharded, save_atomic, save_peft,
                    save_sharded)
from tasks import TASKS, load_eval_sets
from toy import REGIMES
from transpeft import INTERVENTIONS, per_layer, reseed_drops


class StopRequested(Exception):
    """--stop-after was reached: a checkpoint is written, --resume continues."""


class Diverged(Exception):
    """The loss or gradient stopped being finite."""


MAX_SEED = 2**32 - 1  # torch takes seeds below 2^64; the drops' seed * 1,000,003 + step * 1,009 stays far below it


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Trans-PEFT's transfer experiment: train a PEFT module on --old, evaluate "
                                            "it on --old and --new. No flags: the embedded toy study.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--old", help="the base to train on (alias, directory or hub id); none = the embedded toy study")
    p.add_argument("--new", help="its update, where the trained module is evaluated unchanged")
    p.add_argument("--peft", choices=["lora", "dora", "adapter"], default="lora",
                   help="lora; dora (peft's use_dora: LoRA's direction, a learned length per row); adapter")
    for unit in INTERVENTIONS:  # --p-intra, --p-cross, --p-attn and a fork's own (transpeft.Intervention)
        p.add_argument("--" + unit.name.replace("_", "-"), default=unit.default, help=unit.help)
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=128)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated projection names")
    p.add_argument("--adapter-bottleneck", type=int, default=8)
    p.add_argument("--adapter-placement", choices=["series", "parallel"], default="series")
    p.add_argument("--train-data", default="metamath", help="metamath, gsm8k, or a local .jsonl/.json/.parquet")
    p.add_argument("--eval-data", help="comma-separated evaluation sets: gsm8k, math (the hub's test problems), or "
                   "local .jsonl/.json/.parquet files of either (default gsm8k; --as-released: gsm8k,math)")
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
    p.add_argument("--arms", help="the study's arms (study.all_arms), comma-separated, each one run per seed, then the "
                   "paired comparison; with --old/--new e.g. plain,transpeft,refit; for the toy study a subset or all "
                   "(default: all but the ones run on request)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N examples only")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="default per task, as released: " +
                   ", ".join(f"{name} {task.max_new_tokens}" for name, task in TASKS.items()))
    p.add_argument("--scorer", choices=SCORERS, default="official",
                   help="official: the released evaluation's rules; lenient: ours (see scoring.py)")
    released = p.add_argument_group("this code's choices vs the released run's (docs/differences.md)")
    released.add_argument("--peft-dtype", choices=["float32", "bfloat16"],
                          help="of the trained weights and their AdamW state (default float32; released: bfloat16)")
    released.add_argument("--loss-mean", choices=["batch", "micro-batch"],
                          help="batch (default): the summed loss / the global batch's supervised tokens; "
                          "micro-batch (released): each micro-batch's token mean, averaged")
    released.add_argument("--eval-merged", action=argparse.BooleanOptionalAction,
                          help="evaluate the LoRA merged into the bf16 base as released (default: kept apart)")
    released.add_argument("--as-released", action="store_true", help="every released choice above, and --eval-data "
                          "gsm8k,math as released (flags given explicitly still win)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--stop-after", type=int, help="stop after this step with a checkpoint, to --resume later")
    p.add_argument("--device", help="default: cuda where there is one, else cpu; the toy study: cpu")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the base with FSDP2 (else DDP)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each layer's activations in backward: less memory, one more forward pass")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer for training (the first step compiles), and the decoding "
                   "step of single-process evaluations (its first batch compiles; on CUDA replayed as a CUDA graph)")
    toy_flags = p.add_argument_group("the toy study (no --old/--new); its recipe is study.TOY_LORA")
    toy_flags.add_argument("--seeds", type=int, help="paired seeds per arm (toy study: seeds 0..N-1, default 2; with "
                           "--arms: from --seed, default 1)")
    toy_flags.add_argument("--update-seeds", default="0", help="updates of toy-v1 per regime (0 = toy-v2), commas")
    toy_flags.add_argument("--regimes", default="full,ffn,attn", help="which weights the updates train (toy.REGIMES): "
                           "full = all, ffn = FFN only, attn = attention only")
    toy_flags.add_argument("--quick", action="store_true",
                           help="a seconds-long smoke run (tiny bases, few steps): numbers meaningless")
    args = p.parse_args(argv)
    for name in ("batch_size", "micro_batch_size", "max_len", "max_new_tokens", "save_every", "eval_batch_size",
                 "max_samples", "max_steps", "eval_limit", "stop_after", "epochs"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < math.inf:
            p.error(f"--{name.replace('_', '-')} must be positive")
    # Every float flag bounded where it is parsed: 0, a negative value, inf or nan would train silently wrong (a zero
    # learning rate or clip leaves the module as initialised, a negative clip ascends the gradient) or fail late.
    for name, ok, rule in (("lr", lambda v: 0 < v < 10, "in (0, 10)"),
                           ("grad_clip", lambda v: 0 < v < math.inf, "positive and finite"),
                           ("lora_alpha", lambda v: 0 < v <= lora_lib.MAX_ALPHA, f"in (0, {lora_lib.MAX_ALPHA}]"),
                           ("weight_decay", lambda v: 0 <= v < math.inf, "zero or positive, and finite"),
                           ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
                           ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)")):
        if not ok(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        p.error("--fsdp shards the model across the processes of a torchrun launch (torchrun --nproc_per_node N "
                "train.py ...); a single process has nothing to shard across")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and args.old is not None else "cpu"
    try:
        check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    for unit in INTERVENTIONS:
        flag = "--" + unit.name.replace("_", "-")
        try:
            rate = parse_rate(getattr(args, unit.name))  # (a schedule's form and rates are checked there)
        except ValueError as e:
            p.error(f"{flag} takes a float, comma-separated floats (one per layer), or linear:<first>:<last>: {e}")
        rates = rate if isinstance(rate, list) else [] if isinstance(rate, str) else [rate]
        if not all(0 <= r < 1 for r in rates):
            p.error(f"{flag} must be in [0, 1): it is the probability of taking knowledge away")
        setattr(args, unit.name, rate)
    if (args.old is None) != (args.new is None):
        p.error("give both --old and --new, or neither (the toy study)")
    for name, ours, official in (("peft_dtype", "float32", "bfloat16"), ("loss_mean", "batch", "micro-batch"),
                                 ("eval_merged", False, True), ("eval_data", "gsm8k", "gsm8k,math")):
        if getattr(args, name) is None:
            setattr(args, name, official if args.as_released else ours)
    if args.eval_merged and args.peft == "adapter":
        p.error("--eval-merged (and --as-released) merge a LoRA into its base; a bottleneck adapter cannot be merged")
    try:
        args.update_seeds = [int(u) for u in str(args.update_seeds).split(",")]
    except ValueError:
        p.error("--update-seeds takes comma-separated integers")
    if (args.seeds is not None and args.seeds <= 0) or any(u < 0 for u in args.update_seeds):
        p.error("--seeds must be positive and --update-seeds non-negative")
    if not (0 <= args.seed and args.seed + (args.seeds or 1) - 1 <= MAX_SEED):
        p.error(f"--seed must be in [0, {MAX_SEED}] (with --seeds N, seed + N - 1 too), got {args.seed}")
    if args.old is None and args.seeds is None:
        args.seeds = 2
    args.regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if unknown := set(args.regimes) - set(REGIMES):
        p.error(f"--regimes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(REGIMES)}")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    if args.arms is not None and not args.arms:
        p.error("--arms needs at least one arm")
    return args


def flag_defaults() -> dict:
    """Every flag's value in a command that gives none (but the two bases): what a run that began before a flag
    existed had in effect."""
    return vars(parse_args(["--old", "-", "--new", "-", "--device", "cpu"]))


def parse_rate(text) -> float | list[float] | str:
    """One rate, one per layer (commas), or a depth schedule kept as typed ("linear:0:0.2"; transpeft.per_layer
    resolves it where the depth is known)."""
    if str(text).startswith("linear:"):
        per_layer(str(text), 2, "the schedule")  # its form is checked now; its rates per layer later
        return str(text)
    values = [float(v) for v in str(text).split(",")]
    return values[0] if len(values) == 1 else values


@dataclass
class TrainSettings:
    """What the training loop uses: the flags of the same names (from_args), or the toy study's recipe."""

    lr: float
    batch_size: int  # examples per optimizer step, over every process
    micro_batch_size: int  # examples per forward pass of one process
    max_steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_mean: str = "batch"  # "batch" or "micro-batch" (the released run's), see train()
    seed: int = 0  # of the data order and the layer drops
    save_every: int = 200  # a checkpoint every N steps (and at the end)
    stop_after: int | None = None
    resume: bool = False
    fsdp: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainSettings":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def get_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """The learning rate of optimizer step `step` (from 0), as transformers' get_cosine_schedule_with_warmup gives it
    to the HF Trainer of the official run: linear warmup from 0 (lr0 * step / warmup, so the first step has lr 0),
    then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def add_peft(model, args, verbose: bool = True) -> None:
    if args.peft in ("lora", "dora"):
        lora_lib.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()], verbose=False,
                          variant=lora_lib.DoRALinear if args.peft == "dora" else lora_lib.LoRALinear)
    else:
        adapter_lib.add_adapter(model, bottleneck=args.adapter_bottleneck, placement=args.adapter_placement,
                                verbose=False)
    if verbose:
        print_trainable(model)


def check_settings(args) -> None:
    """Refuse, before anything is written or computed, what would fail later: bases a PEFT module cannot move between,
    either base's weights or tokenizer (check_checkpoint), rates or PEFT settings the model cannot take."""
    cfg = load_config(args.old)
    check_same_architecture(cfg, load_config(args.new), args.old, args.new)
    check_checkpoint(args.old)
    check_checkpoint(args.new)  # (a hub id: the new base is fetched now)
    for base in (args.old, args.new):
        check_new_tokens(args.max_new_tokens, load_config(base))
    for unit in INTERVENTIONS:  # one rate per layer, or a schedule, now that the depth is known
        per_layer(getattr(args, unit.name), cfg.num_hidden_layers, "--" + unit.name.replace("_", "-"))
    with torch.device("meta"):
        add_peft(Transformer(cfg), args, verbose=False)


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
def interventions(model, seed: int = 0, grad_checkpointing: bool = False, compile: bool = False, **rates):
    """Everything a training run switches on, in the one order that works, undone in reverse on the way out: every
    intervention of transpeft.INTERVENTIONS given a rate above 0 (rates: p_intra=..., p_cross=..., p_attn=..., a fork's
    own; the drops' generator seeded with `seed`, then reseeded per step by train()), then the layer wrappers (a
    wrapper binds the forward of the class the layer has when wrapped, so it must come after the class swaps).
    Afterwards the model has model.py's plain layers again, as evaluation expects. With every rate 0 nothing is
    switched on: the plain model trains."""
    units = {unit.name: unit for unit in INTERVENTIONS}
    if unknown := set(rates) - set(units):
        raise ValueError(f"No intervention named {', '.join(sorted(unknown))}: transpeft.INTERVENTIONS has "
                         f"{', '.join(units)}.")
    on = [unit for unit in INTERVENTIONS
          if any(per_layer(rates.get(unit.name, 0.0), len(model.model.layers), unit.name))]
    for unit in on:
        unit.switch_on(model, rates[unit.name], seed)
    wrap_layers(model, grad_checkpointing, compile)
    try:
        yield model
    finally:
        unwrap_layers(model)
        for unit in reversed(on):
            unit.switch_off(model)


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

    return recompute(forward, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), replay()), **kwargs)


def world() -> tuple[int, int]:  # (rank, processes): (0, 1) unless launched by torchrun with several
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


def train(model, dataset: list[dict], args: TrainSettings, run_dir: Path, pad_id: int,
          desc: str = "train") -> list[dict]:
    """The training loop. Returns the per-step log (also appended to run_dir/train_log.jsonl).

    With N processes (torchrun), every process builds the same global batch (the order is a function of the seed),
    takes every N-th example of it, and scales its loss by N: DDP and FSDP average gradients over processes, so the
    update equals the one-process update on the whole batch (with --loss-mean micro-batch, only where the
    micro-batches hold the same examples, as in the released run).
    """
    rank, n_proc = world()
    fsdp = n_proc > 1 and args.fsdp
    if n_proc > 1 and args.batch_size % n_proc:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {n_proc} processes.")
    device = model.lm_head.weight.device
    engine = model  # what the forward pass goes through
    if fsdp:
        shard(model)  # in place; the optimizer must see the sharded parameters
    elif n_proc > 1:
        # A PEFT weight inside a skipped block (a LoRA on gate/up/down in a dropped FFN, an FFN adapter) gets no
        # gradient in that step: DDP must be told to expect unused parameters, for every intervention that can.
        on = getattr(model, "intervention_rates", None) or {}
        unused = any(unit.unused and any(on.get(unit.name, [])) for unit in INTERVENTIONS)
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
    ckpt_path, log_path = run_dir / (SHARDED if fsdp else "checkpoint.pt"), run_dir / "train_log.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    start = 0
    if args.resume and ckpt_path.exists():
        start = (restore_sharded if fsdp else restore_checkpoint)(model, optimizer, ckpt_path, total)
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
                           "or --lora-alpha (--overwrite), or check the data.")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        entry = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_s": n_tokens / (time.time() - t0)}
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        done = step + 1
        if done % args.save_every == 0 or done == total or done == args.stop_after:
            if fsdp:  # every process writes its shards
                save_sharded(model, optimizer, done, ckpt_path)
            elif rank == 0:
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


def train_and_save(base: str, dataset, args, run_dir: Path, pad_id: int, desc: str, intervene: bool):
    """Load base, attach a fresh PEFT module, (with intervene) switch Trans-PEFT and control A on, train, save it."""
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(args.seed)
    model = load_model(base, dtype=dtype, device=args.device)
    add_peft(model, args)
    if args.peft_dtype == "bfloat16":  # the released run's: peft casts a new LoRA to its bf16 base's dtype
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)  # and AdamW keeps its state in the parameters' dtype
    rates = {unit.name: getattr(args, unit.name) for unit in INTERVENTIONS} if intervene else {}
    with interventions(model, **rates, seed=args.seed, grad_checkpointing=args.grad_checkpointing,
                       compile=args.compile):
        log = train(model, dataset, TrainSettings.from_args(args), run_dir, pad_id, desc)
    save_peft(model, run_dir / "adapter", base)
    if dist.is_initialized():
        dist.barrier()  # the adapter is on disk before any process reads it
    return model, log


def model_for_eval(base: str, adapter_dir: Path, args):
    """base with the saved adapter (merged in bf16 with --eval-merged; eval.load_for_eval), sharded under --fsdp."""
    model = load_for_eval(base, adapter_dir, args.device, args.eval_merged)
    if dist.is_initialized() and args.fsdp:
        shard(model)
    return model


def run_experiment(args, train_on_new: bool = False, reuse: bool = False) -> dict:
    """Train on --old, evaluate there (source) and, unchanged, on --new (transfer), on every --eval-data task; with
    --refit-new, or alone with train_on_new (the refit arm of --arms), a plain module trained on --new and evaluated
    there (the upper bound). results.json holds one entry per task: {"source_old", "transfer_new", "refit_new"}.
    reuse (the study's arms): with --resume, a finished run with this command's flags and data is read, not redone."""
    out = Path(args.out) if args.out else default_out(args)

    def decide(data_sha256: str | None = None, locked: bool = False) -> bool:  # whether out holds this command's
        finished = check_run_dir(out, args, reuse, locked, flag_defaults())  # finished run; refuses the rest
        if data_sha256 is not None:
            check_data(out, args, data_sha256)
        return finished

    decided_by_rank0(decide)  # refusals first, before the data is read
    check_settings(args)
    old_tok, new_tok = load_tokenizer(args.old), load_tokenizer(args.new)
    examples = load_examples(args.train_data, "train", args.max_samples)
    train_set = None if train_on_new else training_set(examples, old_tok, args.max_len, args.train_data)
    eval_sets = load_eval_sets(eval_sources(args.eval_data), args.eval_limit)
    if len(examples if train_set is None else train_set) < args.batch_size:
        raise ValueError(f"{len(examples if train_set is None else train_set)} training examples do not fill one "
                         f"batch of {args.batch_size}: give a smaller --batch-size or more data.")
    args.data_sha256 = fingerprint(examples, *eval_sets.values())
    if decided_by_rank0(lambda: decide(args.data_sha256)):
        return read_json(out / "results.json")
    lock = decided_by_rank0(lambda: acquire_lock(out, args))
    try:  # decided again under the lock: another run may have begun or finished here while this one read its data
        if decided_by_rank0(lambda: decide(args.data_sha256, locked=True)):
            return read_json(out / "results.json")
        decided_by_rank0(lambda: begin_run(out, args))
        return experiment(args, out, examples, train_set, eval_sets, old_tok, new_tok, train_on_new)
    finally:
        release_lock(lock)


def experiment(args, out: Path, examples, train_set, eval_sets: dict, old_tok, new_tok, train_on_new: bool) -> dict:
    """run_experiment's work, once everything is checked and the run directory is this process's."""
    if is_main_process() and train_set is not None:
        sizes = ", ".join(f"{len(problems)} {task}" for task, problems in eval_sets.items())
        print(f"run directory: {out}  ({len(train_set)} training examples; evaluation: {sizes})")
    t0 = time.time()
    results = {"old": args.old, "new": args.new, "peft": args.peft,
               **{unit.name: getattr(args, unit.name) for unit in INTERVENTIONS},
               "peft_dtype": args.peft_dtype, "loss_mean": args.loss_mean,
               "eval_merged": args.eval_merged, "tasks": list(eval_sets)}
    results.update({task: {"source_old": None, "transfer_new": None, "refit_new": None} for task in eval_sets})

    def evaluate_all(model, tokenizer, setting: str, where: Path, name: str) -> None:
        for task, problems in eval_sets.items():
            results[task][setting] = evaluate(
                model, tokenizer, problems, args.max_new_tokens or TASKS[task].max_new_tokens, args.eval_batch_size,
                where / f"eval-{name}-{task}.jsonl", desc=f"{task} on {name}",
                compile=args.compile and not dist.is_initialized(), scorer=args.scorer, task=task)

    if not train_on_new:
        model, log = train_and_save(args.old, train_set, args, out, old_tok.pad_token_id, "train on old",
                                    intervene=True)
        results["final_train_loss"] = log[-1]["loss"] if log else None
        if args.eval_merged:  # the released evaluation: the saved adapter merged into a freshly loaded bf16 base
            del model
            model = model_for_eval(args.old, out / "adapter", args)
        evaluate_all(model, old_tok, "source_old", out, "old")
        del model
        moved = model_for_eval(args.new, out / "adapter", args)
        evaluate_all(moved, new_tok, "transfer_new", out, "new")
        del moved

    if args.refit_new or train_on_new:  # the upper bound: a plain PEFT module trained on the new base itself
        refit_set = training_set(examples, new_tok, args.max_len, args.train_data)
        refit, _ = train_and_save(args.new, refit_set, args, out / "refit-new", new_tok.pad_token_id, "train on new",
                                  intervene=False)
        if args.eval_merged:
            del refit
            refit = model_for_eval(args.new, out / "refit-new" / "adapter", args)
        evaluate_all(refit, new_tok, "refit_new", out / "refit-new", "new")
    results["minutes"] = (time.time() - t0) / 60
    if is_main_process():
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(results_table(results))
    return results


def main(argv=None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is KeyboardInterrupt again
    import study  # the one import upwards: a study is many runs of this file's experiment

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    init_distributed(args)
    try:
        if dist.is_initialized() and args.old is None:
            raise ValueError("the toy study runs in one process: run it without torchrun.")
        if args.old is None:
            study.run_toy_study(args)
        elif args.arms:
            study.run_arms(args)
        else:
            run_experiment(args)
    except StopRequested as e:
        if is_main_process():
            print(e)
    except KeyboardInterrupt:
        sys.exit(interrupted(args, argv, study.toy_out(args)) if is_main_process() else 1)
    except (Diverged, ValueError, OSError) as e:
        sys.exit(f"error: {e}" if is_main_process() else 1)  # under torchrun: said once, by process 0
    finally:  # every way out, errors too: a gloo group freed only at interpreter exit can abort it ("terminate called
        if dist.is_initialized():  # without an active exception"): free FSDP's cycles, then the group, now
            if sys.exc_info()[0] is None:  # a run every process finished: none may still be in a collective
                dist.barrier()
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
