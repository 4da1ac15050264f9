"""
The study: does Trans-PEFT make a PEFT module survive an update better than plain training, and for the reason the
paper gives? Arms x seeds x bases, paired; the same code for the toy world (python train.py, no flags) and for real
bases (python train.py --old A --new B --arms plain,transpeft,refit).

Terms, in the order a reader meets them:
    arm          one way of training the module (all_arms): plain, the interventions, the controls, the upper bound.
                 Every arm is compared with plain training of the same seed.
    seed         pairs the arms: every arm of a seed starts from the same module initialisation and sees the same data
                 order; only the arm's own intervention differs. The seeds are the independent samples.
    source       accuracy of the trained module on the base it was trained on (toy-v1, or --old).
    transfer     accuracy of the same module, unchanged, on the update (toy-v2..., or --new).
    regime       (toy) which weights an update may change: all (full), the FFN only, attention only (toy.REGIMES).
                 The paper's account predicts gains where the FFN moves, none where only attention does.
    control A    masking at the same rate on attention's input to o_proj instead of the FFN (transpeft.py): is a gain
                 specific to taking FFN knowledge away? control B: stronger LoRA dropout, a generic regulariser.
    paired difference   per seed, transfer(arm) - transfer(plain); its mean with a 95% t interval (mean ± t SE).
    intention to treat  every seed counts, also one whose module never learned the task: failing to learn is part of
                 an intervention's effect. (Secondary, in the report: only seeds where both arms learned it.)
    sign-flip p  the exact permutation test of "mean difference 0": under it each seed's difference is as likely to
                 have either sign. Holm: the p-values of all comparisons adjusted together, so that "beyond noise"
                 (adjusted p < 0.05) keeps a 5% chance of any false alarm among them.
    regime contrast  per arm and seed, gain under the FFN-only update minus gain under the attention-only update: the
                 paper's account predicts > 0 for Trans-PEFT and < 0 for control A.
    the bound    G = ||dL/d(FFN outputs)|| on the old base (transpeft.ffn_gradient) against the loss gap the update
                 causes: the paper's first-order account, with Spearman's rank correlation over arms x seeds.

The arms are arms.py's; what a study prints and writes (tables, sentences, charts, the published study beside a toy
run's own numbers) is report.py's; its statistics and the power computation are stats.py's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import adapter as adapter_lib
import lora as lora_lib
import toy
from analysis import analyze_drift, weight_drift
from arms import adaptive_rates, arm_settings, rate_keys, select_arms
from bases import cache_dir, is_main_process, load_model, load_tokenizer, read_json
from data import IGNORE_INDEX, collate, next_token_targets, tokenize_dataset
from eval import attach_peft, evaluate
from experiment import run_experiment
from loop import TrainSettings, interventions, train
from report import drift_table, finish, published_study, summarize_study
from rundir import acquire_lock, default_out, release_lock, remove, run_outputs, save_peft
from transpeft import INTERVENTIONS, ffn_gradient

# The toy's LoRA recipe. Chosen on pilot seeds 100-111, which no reported study uses, for plain LoRA to learn the
# task (source accuracy >= 0.9) on every seed: it did on 12 of 12 with this recipe (source >= 0.96), on 9 of 12 with
# 300 steps, and on seeds 100-105 on 2 of 6 at lr 1e-2 for 200 steps and 4 of 6 at lr 5e-3 for 200 steps. Learning
# to copy the question's quantity comes late and suddenly; too high a rate or too few steps miss it.
TOY_LORA = dict(r=8, alpha=16, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                lr=5e-3, steps=500, warmup_ratio=0.1, batch_size=16, max_len=128, max_new_tokens=24)
# The toy's bottleneck Adapter (--peft adapter): the official placement and size (series, bottleneck 8, ReLU; see
# adapter.py) at LoRA's rate and steps. No setting tried so far learns the task (docs/toy-study.md, "Other PEFT
# kinds": it never copies the question's entity). DoRA takes LoRA's recipe unchanged.
TOY_ADAPTER = dict(peft="adapter", bottleneck=8, **{k: TOY_LORA[k] for k in ("lr", "steps", "warmup_ratio",
                                                                            "batch_size", "max_len", "max_new_tokens")})
# Settings a --recipe may add, at the value the recipes above have without them (kept out of them so that the
# default recipe, and the studies --resume continues, stay as they were).
RECIPE_EXTRAS = dict(weight_decay=0.0)  # AdamW's decoupled decay of the module's weights


def toy_recipe(peft: str = "lora") -> dict:
    """The toy's recipe for a PEFT kind (train.py --peft): LoRA's, DoRA on LoRA's, or the Adapter's."""
    return {"lora": TOY_LORA, "dora": {**TOY_LORA, "peft": "dora"}, "adapter": TOY_ADAPTER}[peft]


def recipe_changes(text: str | None, recipe: dict = TOY_LORA) -> dict:
    """`--recipe lr=2e-3,steps=1000`: the settings of the toy's recipe a command changes (a recipe search runs the
    project's own command), each checked: counts positive integers, lr and alpha positive, dropout and warmup_ratio in
    [0, 1), weight_decay at least 0."""
    changes, settings = {}, {**recipe, **RECIPE_EXTRAS}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        kind = type(settings.get(key))
        if kind not in (int, float):
            raise ValueError(f"--recipe {item}: a setting is key=value, the key one of "
                             f"{', '.join(k for k, v in settings.items() if type(v) in (int, float))}.")
        try:
            number = kind(value) if kind is float else int(value)
        except ValueError:
            raise ValueError(f"--recipe {item}: {key} takes {'an integer' if kind is int else 'a number'}.") from None
        if key in ("dropout", "warmup_ratio"):
            ok, bound = 0 <= number < 1, "in [0, 1)"
        elif key == "weight_decay":
            ok, bound = 0 <= number < float("inf"), "at least 0 and finite"
        else:
            ok, bound = 0 < number < float("inf"), "positive and finite"
        if not ok:
            raise ValueError(f"--recipe {item}: {key} must be {bound}.")
        changes[key] = number
    return changes


# -----------------------------------------------------------------------------------------------------------
# One arm of the toy study


def toy_module(arm: dict, settings: dict, seed: int, base: str, dataset, tokenizer, run_dir: Path, recipe: dict,
               device="cpu"):
    """One arm's PEFT module (the recipe's kind: LoRA, DoRA or Adapter) for one seed, trained on base and saved to
    run_dir/adapter; returns (model, log).

    Pairing: every arm of a seed starts from the same module initialisation (torch.manual_seed(seed) right before it
    is added) and sees the same data order (train() draws it from the seed); the Trans-PEFT drops from a generator
    seeded with the seed. Only the arm's own intervention differs."""
    s = TrainSettings(lr=recipe["lr"], batch_size=recipe["batch_size"], micro_batch_size=recipe["batch_size"],
                      max_steps=recipe["steps"], warmup_ratio=recipe["warmup_ratio"], seed=seed, save_every=10**9,
                      weight_decay=recipe.get("weight_decay", RECIPE_EXTRAS["weight_decay"]))
    torch.manual_seed(seed)
    model = load_model(base, device=device)
    if recipe.get("peft") == "adapter":
        adapter_lib.add_adapter(model, bottleneck=recipe["bottleneck"], verbose=False)
    else:
        variant = lora_lib.DoRALinear if recipe.get("peft") == "dora" else lora_lib.LoRALinear
        lora_lib.add_lora(model, r=recipe["r"], alpha=recipe["alpha"],
                          dropout=settings.get("lora_dropout", recipe["dropout"]), targets=list(recipe["targets"]),
                          verbose=False, variant=variant)
    rates = {unit.name: settings[unit.name] for unit in INTERVENTIONS}
    with interventions(model, **rates, seed=seed):
        log = train(model, dataset, s, run_dir, tokenizer.pad_token_id,
                    desc=f"seed {seed} {arm['key']} on {Path(base).name}")
    save_peft(model, run_dir / "adapter", base)
    return model, log


def toy_arm(arm: dict, settings: dict, seed: int, old: str, updates: list[tuple], dataset, test, test_batch,
            tokenizer, run_dir: Path, recipe: dict, device="cpu") -> list[dict]:
    """Train one arm for one seed on toy-v1 and evaluate it there (source) and, unchanged, on every update (transfer),
    with both sides of the paper's bound (transpeft.ffn_gradient) on the test questions; one row per update.
    updates: (regime, update seed, directory). The upper bound (train_on="new") is trained on each of `updates`
    itself; the study passes it the first update only, as each costs a training."""
    ev = dict(max_new_tokens=recipe["max_new_tokens"], batch_size=len(test))
    ids, targets = test_batch
    old_name = Path(old).name
    if arm.get("train_on") == "new":
        rows = []
        for regime, u, path in updates:
            model, log = toy_module(arm, settings, seed, path, dataset, tokenizer, run_dir / Path(path).name, recipe,
                                    device)
            acc = evaluate(model, tokenizer, test, out_jsonl=run_dir / Path(path).name / "eval.jsonl",
                           desc=f"eval on {Path(path).name}", **ev)
            rows.append({"arm": arm["key"], "seed": seed, "regime": regime, "update_seed": u,
                         "final_loss": log[-1]["loss"], "source": None, "transfer": acc["accuracy"]})
        return rows
    model, log = toy_module(arm, settings, seed, old, dataset, tokenizer, run_dir, recipe, device)
    own = evaluate(model, tokenizer, test, out_jsonl=run_dir / f"eval-{old_name}.jsonl", desc=f"eval on {old_name}",
                   **ev)
    loss_old, grad = ffn_gradient(model, ids, targets)
    rows = []
    for regime, u, path in updates:
        moved = attach_peft(load_model(path, device=device), run_dir / "adapter")
        name = Path(path).name
        on_new = evaluate(moved, tokenizer, test, out_jsonl=run_dir / f"eval-{name}.jsonl", desc=f"eval on {name}",
                          **ev)
        with torch.no_grad():
            loss_new = (moved(ids, targets=targets) / (targets != IGNORE_INDEX).sum()).item()
        rows.append({"arm": arm["key"], "seed": seed, "regime": regime, "update_seed": u, "final_loss": log[-1]["loss"],
                     "source": own["accuracy"], "transfer": on_new["accuracy"], "ffn_grad_norm": grad,
                     "loss_old": loss_old, "loss_new": loss_new})
    return rows


# -----------------------------------------------------------------------------------------------------------
# The toy study (python train.py, no flags) and the study on real bases (--old, --new, --arms)


def toy_out(args) -> Path:
    return Path(args.out or ("runs/toy-study-quick" if args.quick else "runs/toy-study"))


def toy_data(old: str, recipe: dict, quick: bool, device: str = "cpu") -> tuple:
    """The toy task, tokenized: (tokenizer, training set, test questions, the test questions as one batch of ids and
    next-token targets, for the losses of the bound)."""
    train_examples, test = toy.task(toy.make_world(0))
    if quick:
        test = test[:12]
    tokenizer = load_tokenizer(old)
    dataset, _ = tokenize_dataset(train_examples, tokenizer, recipe["max_len"], prompt_fn=toy.train_prompt)
    scored, _ = tokenize_dataset(test, tokenizer, recipe["max_len"], prompt_fn=toy.train_prompt)  # for the losses
    ids, labels = collate(scored, tokenizer.pad_token_id)
    return tokenizer, dataset, test, (ids.to(device), next_token_targets(labels).to(device))


def arm_key(arm: dict, recipe: dict, updates: list[tuple]) -> dict:
    """What one arm-seed's rows depend on, beside its seed: a finished arm-seed is reused by --resume only where
    this is unchanged (the arm's settings, the LoRA recipe, and every update with the recipe it was built by)."""
    bases = [read_json(Path(path) / "toy_recipe.json") for _, _, path in updates]
    key = {"arm": {k: v for k, v in arm.items() if k != "name"}, "recipe": recipe,
           "updates": [[regime, u, Path(path).name] for regime, u, path in updates], "bases": bases}
    return json.loads(json.dumps(key))  # as read back from rows.json (tuples as lists)


# The update whose FFN drift per layer sets the adaptive arm's rates (arms.adaptive_rates): one of toy-v1's full
# updates that no study evaluates, so that the arm does not see the update it is tested on.
ADAPTIVE_UPDATE = 99


def adaptive_arm(arm: dict, old: str, base_recipe: dict, root: Path | None, layers: int) -> dict:
    """The adaptive arm with its rates per layer: each rate spread over the layers as their FFN weights moved
    (‖ΔW‖/‖W‖ of gate, up and down together, analysis.weight_drift) from toy-v1 to its update ADAPTIVE_UPDATE.
    Weights, not outputs, so that no test question enters the rates."""
    _, held_out = toy.build_bases(ADAPTIVE_UPDATE, recipe=base_recipe, root=root, regime="full", layers=layers)
    moved = [layer["ffn_weight"] for layer in weight_drift(load_model(old), load_model(held_out))]
    return {**arm, **{k: adaptive_rates(arm[k], moved) for k in rate_keys(arm)}, "moved_by": Path(held_out).name}


_WORKER: dict = {}  # the toy data an arm-seed job reads (toy_data), built once per process


def default_jobs() -> int:
    """The toy study's arm-seeds side by side: one per core this process may use, at most 8 (each a process of its
    own, ~0.3 GB). Measured on a 2-core CPU: 1.36x the arm-seeds per hour of one at a time on both cores
    (benchmarks/README.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def _start_worker(old: str, recipe: dict, quick: bool, device: str) -> None:
    torch.set_num_threads(1)  # one core each: the arms run side by side, not one arm on every core
    sys.stderr = open(os.devnull, "w")  # the workers' progress bars would interleave; the parent prints each arm-seed
    _WORKER["data"] = toy_data(old, recipe, quick, device)


def _run_job(job: tuple) -> tuple[list[dict], float]:
    """One arm-seed (a side-by-side worker's job, or this process's): its rows and its seconds."""
    t0 = time.time()
    arm, seed, old, updates, run_dir, recipe, device = job
    tokenizer, dataset, test, test_batch = _WORKER["data"]
    rows = toy_arm(arm, arm_settings(arm), seed, old, updates, dataset, test, test_batch, tokenizer, run_dir, recipe,
                   device)
    return rows, time.time() - t0


def run_toy_study(args) -> dict:
    """The embedded default: every arm (or --arms) for every seed, trained on toy-v1 and moved to every update of
    every regime; then the drift analysis of each update, the tables and the chart.

    Each finished arm-seed leaves rows.json in its directory (seed<s>/<arm>/), so that --resume trains only the
    arm-seeds not yet finished (more seeds or arms than the first command named included) and a study too long for
    one sitting runs in several. --jobs N trains N arm-seeds side by side, one process with one thread each: on a
    2-core CPU the toy's matrices (128 wide) gain little from a second thread. One thread or two give the same rows
    (tests/test_toy.py)."""
    t_start = time.time()
    recipe, base_recipe, root = dict(toy_recipe(args.peft)), toy.RECIPE, None
    if args.quick:  # a smoke test of the whole path, for CI: tiny bases, a few steps; the numbers mean nothing
        base_recipe = {"v1": {**toy.RECIPE["v1"], "steps": 30}, "v2": {**toy.RECIPE["v2"], "steps": 10}}
        root = cache_dir() / "quick"  # beside, not over, the real bases
        recipe.update(steps=6)
    recipe.update(args.recipe)  # --recipe: a search's settings
    arms = select_arms(args.arms, args.peft)
    if arms[0]["key"] != "plain":
        raise ValueError("The toy study compares every arm with plain LoRA: --arms must include plain.")
    out = toy_out(args)
    started = (out / "args.json").exists() or (out / "results.json").exists()
    if args.resume and not started:
        raise ValueError(f"--resume: {out} holds no toy study to continue; run without --resume to start one.")
    if started and not (args.overwrite or args.resume):
        state = "a finished study (results.json)" if (out / "results.json").exists() else "an unfinished study"
        raise ValueError(f"{out} already holds {state}: pass --resume to continue it (finished arm-seeds are kept; "
                         "more --seeds or --arms are added), --overwrite to replace it, or another --out.")
    lock = acquire_lock(out, args)
    try:
        if args.overwrite:  # the study's own outputs only
            remove(out / "args.json", out / "results.json", out / "report.txt", out / "study.png", out / "dose.png",
                   *out.glob("seed[0-9]*"))
        (out / "args.json").write_text(json.dumps({**vars(args), "recipe": recipe}, indent=2, default=str))

        updates = []  # (regime, update seed, directory)
        for regime in args.regimes:
            for u in args.update_seeds:
                old, new = toy.build_bases(u, recipe=base_recipe, root=root, regime=regime, layers=args.layers)
                toy.task(toy.make_world(u))  # asserts that the task's answers hold on this update too
                updates.append((regime, u, new))
        tokenizer, _, test, _ = data = toy_data(old, recipe, args.quick, args.device)
        if ADAPTIVE_UPDATE in args.update_seeds and any(a.get("adaptive") for a in arms):
            raise ValueError(f"--update-seeds {ADAPTIVE_UPDATE} is the update that sets the adaptive arm's rates: "
                             "it cannot also be evaluated.")
        trained = {a["key"]: adaptive_arm(a, old, base_recipe, root, args.layers) if a.get("adaptive") else a
                   for a in arms}  # the arms as trained: the adaptive one's rates per layer
        for arm in (a for a in trained.values() if a.get("adaptive")):
            rates = "; ".join(f"{k} " + " ".join(f"{r:.3f}" for r in arm[k]) for k in rate_keys(arm))
            print(f"{arm['name']}: per layer {rates} (from {arm['moved_by']})")

        jobs, done, keys = [], {}, {}  # one job per arm-seed not finished yet
        for seed in range(args.seed, args.seed + args.seeds):
            for arm in (trained[a["key"]] for a in arms):
                on = updates[:1] if arm.get("train_on") == "new" else updates  # the upper bound: the first update
                run_dir = out / f"seed{seed}" / arm["key"].replace("/", "-")  # both@0.2/0.1: both@0.2-0.1
                keys[seed, arm["key"]] = key = arm_key(arm, recipe, on)
                finished = read_json(run_dir / "rows.json") if (run_dir / "rows.json").exists() else None
                if args.resume and finished and finished["key"] == key:
                    done[seed, arm["key"]] = finished["rows"]
                else:
                    remove(run_dir)
                    jobs.append((arm, seed, old, on, run_dir, recipe, args.device))
        if done:
            print(f"--resume: {len(done)} arm-seeds finished before, {len(jobs)} to train")

        def report(job, rows, seconds):
            arm, seed, run_dir = job[0], job[1], job[4]
            tmp = run_dir / "rows.json.tmp"  # written whole, then renamed: a killed study leaves no half file
            tmp.write_text(json.dumps({"key": keys[seed, arm["key"]], "rows": rows}, indent=1))
            os.replace(tmp, run_dir / "rows.json")
            done[seed, arm["key"]] = rows
            src = f"{rows[0]['source']:.2f}" if rows[0]["source"] is not None else "  - "
            transfer = " ".join(f"{r['regime']}-u{r['update_seed']} {r['transfer']:.2f}" for r in rows)
            tqdm.write(f"seed {seed} | {arm['name']:<42} | source {src} | transfer {transfer} | {seconds:.0f}s")

        if args.jobs > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP state forked mid-use
            start = (old, recipe, args.quick, args.device)
            with context.Pool(min(args.jobs, len(jobs)), _start_worker, start) as pool, \
                    tqdm(total=len(jobs), desc=f"arm-seeds, {args.jobs} side by side", unit="arm-seed") as bar:
                for job, (rows, seconds) in zip(jobs, pool.imap(_run_job, jobs)):  # in order: as one at a time
                    report(job, rows, seconds)
                    bar.update()
        else:  # one at a time, in this process: the same job as a worker's, on this process's data
            _WORKER["data"] = data
            for job in jobs:
                report(job, *_run_job(job))
        rows = [row for seed in range(args.seed, args.seed + args.seeds) for arm in arms
                for row in done[seed, arm["key"]]]
        prompts = torch.tensor([tokenizer.encode(e["question"]) for e in test])  # every toy question is 8 words long
        drift = {Path(new).name: analyze_drift(load_model(old), load_model(new), prompts) for _, _, new in updates}
        report_text, summary = summarize_study(rows, arms, source_label=f"source ({Path(old).name})")
        results = {"recipe": recipe, "arms": arms, "seeds": list(range(args.seed, args.seed + args.seeds)),
                   "regimes": args.regimes, "update_seeds": args.update_seeds,
                   "rows": rows, "summary": summary, "drift": drift, "minutes": (time.time() - t_start) / 60}
        # the world, module and recipe the published study ran
        published = args.layers == toy.DEPTH and args.peft == "lora" and not args.recipe
        finish(out, results, report_text + "\n\n" + drift_table(drift), reference=published_study() if published
               else None)
    finally:
        release_lock(lock)
    return results


def run_arms(args, defaults: dict | None = None) -> dict:
    """python train.py --old A --new B --arms plain,transpeft,refit: the paper's comparison, one run per arm and seed
    under <out>/<arm>-seed<s> (each an ordinary run: --resume continues it, a finished one is reused), summarised as
    the toy study is: seeds pair the arms (the same PEFT initialisation and data order)."""
    arms = select_arms(args.arms, args.peft)
    if any(a.get("adaptive") for a in arms):
        raise ValueError("The adaptive arm takes its per-layer rates from an update of the toy world; on real bases "
                         "give --p-intra/--p-cross one rate per layer (commas) with the transpeft arm instead.")
    out = Path(args.out) if args.out else default_out(args, kind="-arms")
    rows = []
    for seed in range(args.seed, args.seed + (args.seeds or 1)):
        for arm in arms:
            arm_out = out / f"{arm['key']}-seed{seed}"  # --resume continues the arms begun; one not begun starts
            run = argparse.Namespace(**{**vars(args), "arms": None, "seed": seed, "out": str(arm_out),
                                        "resume": args.resume and bool(run_outputs(arm_out)), "refit_new": False,
                                        **arm_settings(arm, args)})
            refit = arm.get("train_on") == "new"
            r = run_experiment(run, train_on_new=refit, reuse=True, defaults=defaults)  # --resume: a finished one read
            for task in r["tasks"]:  # each task a "regime" of the summary: its own comparison
                res = r[task]
                rows.append({"arm": arm["key"], "seed": seed, "regime": f"{Path(str(args.new)).name} {task}",
                             "update_seed": 0, "source": None if refit else res["source_old"]["accuracy"],
                             "transfer": (res["refit_new"] if refit else res["transfer_new"])["accuracy"]})
    report, summary = summarize_study(rows, arms, source_label=f"source ({Path(str(args.old)).name})", learned=None)
    if is_main_process():
        finish(out, {"rows": rows, "summary": summary}, report, results_name="arms.json")
    return summary
