"""
The transfer experiment: train a PEFT module on the OLD base, then measure it on the old base (source accuracy) and,
unchanged, on the NEW base (direct transfer); optionally train the same PEFT on the new base (the upper bound). One
run directory per experiment (rundir.py), decided before the data is read and again under its lock.

    train on old (loop.train, the interventions on)  ->  adapter/  ->  evaluate on old  ->  evaluate on new
    [--refit-new: train a plain module on new  ->  refit-new/adapter/  ->  evaluate on new]  ->  results.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

import adapter as adapter_lib
import lora as lora_lib
from bases import (check_checkpoint, check_same_architecture, is_main_process, load_config, load_model,
                        load_tokenizer, print_trainable, read_json)
from data import fingerprint, load_examples, training_set
from eval import check_new_tokens, eval_sources, evaluate, load_for_eval, results_table
from loop import TrainSettings, interventions, shard, train
from model import Transformer
from rundir import (acquire_lock, begin_run, check_data, check_run_dir, decided_by_rank0, default_out, release_lock,
                    save_peft)
from tasks import TASKS, load_eval_sets
from transpeft import INTERVENTIONS, per_layer


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


def train_and_save(base: str, dataset, args, run_dir: Path, pad_id: int, desc: str, intervene: bool):
    """Load base, attach a fresh PEFT module, (with intervene) switch the interventions on at the flags' rates, train,
    save it."""
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


def run_experiment(args, train_on_new: bool = False, reuse: bool = False, defaults: dict | None = None) -> dict:
    """Train on --old, evaluate there (source) and, unchanged, on --new (transfer), on every --eval-data task; with
    --refit-new, or alone with train_on_new (the refit arm of --arms), a plain module trained on --new and evaluated
    there (the upper bound). results.json holds one entry per task: {"source_old", "transfer_new", "refit_new"}.
    reuse (the study's arms): with --resume, a finished run with this command's flags and data is read, not redone.
    defaults: every flag's default (train.flag_defaults), with which a run begun before a flag existed resumes."""
    out = Path(args.out) if args.out else default_out(args)

    def decide(data_sha256: str | None = None, locked: bool = False) -> bool:  # whether out holds this command's
        finished = check_run_dir(out, args, reuse, locked, defaults)  # finished run; refuses the rest
        if data_sha256 is not None:
            check_data(out, args, data_sha256)
        return finished

    decided_by_rank0(decide)  # refusals first, before the data is read
    check_settings(args)
    old_tok, new_tok = load_tokenizer(args.old), load_tokenizer(args.new)
    examples = load_examples(args.train_data, "train", args.max_samples)
    train_set = None if train_on_new else training_set(examples, old_tok, args.max_len, args.train_data)
    eval_sets = load_eval_sets(eval_sources(args.eval_data), args.eval_limit)
    if (n := len(examples if train_set is None else train_set)) < args.batch_size:
        raise ValueError(f"{n} training examples do not fill one batch of {args.batch_size}: give a smaller "
                         "--batch-size or more data.")
    args.data_sha256 = fingerprint(examples, *eval_sets.values())
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
