"""
The command: its flags, and what a run of it does. The transfer experiment (experiment.py): train a PEFT module on the
OLD base, then measure it on the old base (source accuracy) and, unchanged, on the NEW base (direct transfer);
optionally train the same PEFT on the new base (the upper bound). With no bases, the toy study (study.py).

    python train.py                                            # the embedded toy study (study.py): CPU, minutes
    python train.py --old qwen2 --new qwen2.5                  # the paper's Qwen2-7B -> Qwen2.5-7B run (GPU, hub)
    python train.py --old qwen2 --new qwen2.5 --arms plain,transpeft,refit   # the paper's comparison, one run each

The defaults are the released recipe (github gccnlp/Trans-PEFT, scripts/trans-peft-qwen.sh), except where
docs/differences.md lists a difference and the flag that restores the released choice (--as-released sets them).

The training loop is loop.py; each flag reaches it through loop.TrainSettings.

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
import math
import os

import torch
import torch.distributed as dist

import study  # the toy study and --arms; study.py uses experiment.py and loop.py, never this file
from bases import check_device, is_main_process
from experiment import run_experiment
from lora import MAX_ALPHA
from loop import Diverged, StopRequested, init_distributed
from rundir import interrupted
from scoring import SCORERS
from tasks import TASKS
from toy import DEPTH, MAX_DEPTH, REGIMES
from transpeft import INTERVENTIONS, per_layer


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
    p.add_argument("--seed", type=int, help="default 42; the toy study: its first seed, default 0")
    p.add_argument("--out", help="run directory (default: runs/<old>-<new>-<peft>-cross<p>-intra<p>-seed<s>)")
    p.add_argument("--refit-new", action="store_true", help="also train a plain PEFT module on --new (the upper bound)")
    p.add_argument("--arms", help="the study's arms (arms.all_arms), comma-separated, each one run per seed, then the "
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
    toy_flags = p.add_argument_group("the toy study (no --old/--new); its recipe is study.toy_recipe(--peft)")
    toy_flags.add_argument("--seeds", type=int, help="paired seeds per arm, from --seed (toy study: default 2, from "
                           "seed 0; with --arms: default 1)")
    toy_flags.add_argument("--jobs", type=int, help="toy study: arm-seeds trained side by side, one process and one "
                           "thread each (the same rows as one at a time; default: one per core, at most 8)")
    toy_flags.add_argument("--update-seeds", default="0", help="updates of toy-v1 per regime (0 = toy-v2), commas")
    toy_flags.add_argument("--regimes", default="full,ffn,attn", help="which weights the updates train (toy.REGIMES): "
                           "full = all, ffn = FFN only, attn = attention only")
    toy_flags.add_argument("--layers", type=int, default=DEPTH, help=f"toy study: the toy world's depth (default "
                           f"{DEPTH}; its bases are cached under their own names, toy8-v1 at 8 layers)")
    toy_flags.add_argument("--recipe", help="toy study: settings of its LoRA recipe to change, key=value with commas "
                           "(e.g. lr=2e-3,steps=1000; the keys of study.toy_recipe(--peft), and weight_decay)")
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
                           ("lora_alpha", lambda v: 0 < v <= MAX_ALPHA, f"in (0, {MAX_ALPHA}]"),
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
    if args.seed is None:
        args.seed = 42 if args.old is not None else 0
    if args.jobs is not None and args.old is not None:
        p.error("--jobs trains the toy study's arm-seeds side by side; with --old/--new use torchrun for processes")
    if args.jobs is None:
        args.jobs = study.default_jobs() if args.old is None else 1
    if args.old is not None and (args.recipe or args.layers != DEPTH):
        p.error("--layers and --recipe set the toy study's world and recipe; with --old/--new give --lr, "
                "--max-steps, ... instead")
    if not 1 <= args.layers <= MAX_DEPTH:
        p.error(f"--layers must be in [1, {MAX_DEPTH}], got {args.layers}")
    try:
        args.recipe = study.recipe_changes(args.recipe, study.toy_recipe(args.peft))
    except ValueError as e:
        p.error(str(e))
    if args.jobs < 1:
        p.error("--jobs must be positive")
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


def main(argv=None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is KeyboardInterrupt again
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    init_distributed(args)
    try:
        if dist.is_initialized() and args.old is None:
            raise ValueError("the toy study runs in one process: run it without torchrun.")
        if args.old is None:
            study.run_toy_study(args)
        elif args.arms:
            study.run_arms(args, flag_defaults())
        else:
            run_experiment(args, defaults=flag_defaults())
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
