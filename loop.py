"""
The training loop: a PEFT module trained on a base model, one optimizer step at a time, with the interventions that
a run switches on around it (interventions) and the options of large bases (activation recomputation, compiled
layers, DDP and FSDP2 under torchrun).

The loop, top to bottom: seed -> data order -> AdamW over the trainable parameters -> for each step {lr =
get_lr(step); the drops reseeded (transpeft.reseed_drops); micro-batches: loss, backward; clip; step; zero_grad} ->
checkpoint (PEFT weights, optimizer, step, RNG states) atomically. It takes a TrainSettings, not the command line's
flags, so that the transfer experiment (experiment.py) and the study (study.py) call it alike.
"""

from __future__ import annotations

import argparse
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

from data import IGNORE_INDEX, collate, next_token_targets
from rundir import SHARDED, checkpoint_state, restore_checkpoint, restore_sharded, save_atomic, save_sharded
from transpeft import INTERVENTIONS, per_layer, reseed_drops


class StopRequested(Exception):
    """--stop-after was reached: a checkpoint is written, --resume continues."""


class Diverged(Exception):
    """The loss or gradient stopped being finite."""


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
    layers = {unit.name: per_layer(rates.get(unit.name, 0.0), len(model.model.layers), unit.name)
              for unit in INTERVENTIONS}
    on = [unit for unit in INTERVENTIONS if any(layers[unit.name])]
    for unit in on:
        unit.switch_on(model, layers[unit.name], seed)
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
