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

What `python train.py` prints at the end: the transfer table and one sentence per regime; everything else (source
accuracy, the learned-seeds comparison, the regime contrast, the bound, each update's drift) goes to report.txt
beside results.json, and the chart to study.png (where matplotlib is installed).
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

import lora as lora_lib
import toy
from analysis import analyze_drift, pyplot
from bases import cache_dir, is_main_process, load_model, load_tokenizer, read_json
from data import IGNORE_INDEX, collate, next_token_targets, tokenize_dataset
from eval import evaluate
from rundir import acquire_lock, default_out, release_lock, remove, run_outputs
from experiment import run_experiment
from loop import TrainSettings, interventions, train
from stats import holm, mean_std, paired_interval, spearman
from transpeft import INTERVENTIONS, ffn_gradient

# -----------------------------------------------------------------------------------------------------------
# The arms: one schema for the toy and for real bases

def all_arms() -> list[dict]:
    """Every arm: plain, the flags' rates, each intervention's own (a fork's too), control B, the upper bound. An arm
    sets rates (every other one 0), train_on="new" or rates_from_flags; on_request ones run only when named (or with
    --arms all), so that the toy's default fits 10 minutes. "{peft}", "{rate}" in a name: LoRA/DoRA/adapter, a rate."""
    flags = dict(key="transpeft", name="Trans-PEFT trained on old (the flags' rates)", rates_from_flags=True)
    return [dict(key="plain", name="plain {peft}"), {**flags, "on_request": True},
            *(arm for unit in INTERVENTIONS for arm in unit.arms),
            dict(key="lora_dropout", name="control B: LoRA dropout {rate}", lora_dropout=0.3),
            dict(key="refit", name="upper bound: {peft} trained on the update", train_on="new", on_request=True)]


# The toy's LoRA recipe. Chosen on pilot seeds 100-111, which no reported study uses, for plain LoRA to learn the
# task (source accuracy >= 0.9) on every seed: it did on 12 of 12 with this recipe (source >= 0.96), on 9 of 12 with
# 300 steps, and on seeds 100-105 on 2 of 6 at lr 1e-2 for 200 steps and 4 of 6 at lr 5e-3 for 200 steps. Learning
# to copy the question's quantity comes late and suddenly; too high a rate or too few steps miss it.
TOY_LORA = dict(r=8, alpha=16, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                lr=5e-3, steps=500, warmup_ratio=0.1, batch_size=16, max_len=128, max_new_tokens=24)


def rate_keys(arm: dict) -> list[str]:  # the rates an arm sets: interventions' (p_intra, ...) and lora_dropout
    return [k for k in (*(unit.name for unit in INTERVENTIONS), "lora_dropout") if k in arm]


def select_arms(wanted: list[str] | None, peft: str = "LoRA") -> list[dict]:
    """The arms named, in all_arms order, names filled in. None: every arm not run on request; "all": every arm with
    settings of its own (not "transpeft", which at the default flags is "drop"). "<key>@<rate>" (drop@0.05,
    both@0.2, lora_dropout@0.5) is that arm with every rate it sets at <rate>: a dose, placed after its arm;
    "<key>@<rate>/<rate>" gives an arm that sets two rates one each, in rate_keys order (both@0.2/0.1: p_intra 0.2,
    p_cross 0.1)."""
    arms = {a["key"]: a for a in all_arms()}
    doses = [w for w in wanted or [] if "@" in w]
    for key, _, text in (d.partition("@") for d in doses):
        values = text.split("/")
        if not (key in arms and rate_keys(arms[key]) and len(values) in (1, len(rate_keys(arms[key])))
                and all(v.replace(".", "", 1).isdigit() and float(v) < 1 for v in values)):
            raise ValueError(f"--arms {key}@{text}: a dose is <arm>@<rate> (or one rate per rate the arm sets, "
                             "separated by /), each rate in [0, 1), of an arm that sets a rate: "
                             f"{', '.join(k for k, a in arms.items() if rate_keys(a))}.")
    if wanted and (unknown := set(wanted) - set(arms) - {"all"} - set(doses)):
        raise ValueError(f"Unknown arm(s) {', '.join(sorted(unknown))}: choose from {', '.join(arms)}, or all, or "
                         "<arm>@<rate>.")

    def dose(base, spec):  # every rate the arm sets, at the spec's (one, or one each)
        values = [float(v) for v in spec.split("@")[1].split("/")]
        keys = rate_keys(base)
        return {**base, "key": spec, "on_request": True, **dict(zip(keys, values * len(keys) if len(values) == 1
                                                                    else values))}

    def chosen(a):
        if not wanted:
            return not a.get("on_request")
        return a["key"] in wanted or ("all" in wanted and not a.get("rates_from_flags"))

    def named(a):  # "{rate}": the arm's rate(s); a dose of an arm whose name has none gets it appended
        rates = list(dict.fromkeys(a[k] for k in rate_keys(a)))  # one rate where they are equal
        name = a["name"] + (" ({rate})" if "@" in a["key"] and "{rate}" not in a["name"] else "")
        return {**a, "name": name.format(peft=peft, rate="/".join(map(str, rates)))}

    return [named(a) for key, base in arms.items()
            for a in (base, *(dose(base, d) for d in doses if d.partition("@")[0] == key)) if chosen(a)]


def arm_settings(arm: dict, flags: argparse.Namespace | None = None) -> dict:
    """The interventions an arm trains with: its own (every other rate 0); rates_from_flags: those of the flags."""
    names = [unit.name for unit in INTERVENTIONS]
    own = {k: getattr(flags, k) for k in names} if arm.get("rates_from_flags") else {}
    return {**dict.fromkeys(names, 0.0), **own, **{k: arm[k] for k in rate_keys(arm)}}


# -----------------------------------------------------------------------------------------------------------
# One arm of the toy study


def toy_lora(arm: dict, settings: dict, seed: int, base: str, dataset, tokenizer, run_dir: Path, recipe: dict,
             device="cpu"):
    """One arm's LoRA for one seed, trained on base and saved to run_dir/adapter; returns (model, log).

    Pairing: every arm of a seed starts from the same LoRA initialisation (torch.manual_seed(seed) right before
    add_lora) and sees the same data order (train() draws it from the seed); the Trans-PEFT drops from a generator
    seeded with the seed. Only the arm's own intervention differs."""
    s = TrainSettings(lr=recipe["lr"], batch_size=recipe["batch_size"], micro_batch_size=recipe["batch_size"],
                      max_steps=recipe["steps"], warmup_ratio=recipe["warmup_ratio"], seed=seed, save_every=10**9)
    torch.manual_seed(seed)
    model = load_model(base, device=device)
    lora_lib.add_lora(model, r=recipe["r"], alpha=recipe["alpha"],
                      dropout=settings.get("lora_dropout", recipe["dropout"]), targets=list(recipe["targets"]),
                      verbose=False)
    rates = {unit.name: settings[unit.name] for unit in INTERVENTIONS}
    with interventions(model, **rates, seed=seed):
        log = train(model, dataset, s, run_dir, tokenizer.pad_token_id,
                    desc=f"seed {seed} {arm['key']} on {Path(base).name}")
    lora_lib.save_lora(model, run_dir / "adapter", base_model_name_or_path=base)
    return model, log


def toy_arm(arm: dict, settings: dict, seed: int, old: str, updates: list[tuple], dataset, test, test_batch,
            tokenizer, run_dir: Path, recipe: dict, device="cpu") -> list[dict]:
    """Train one arm for one seed on toy-v1 and evaluate it there (source) and, unchanged, on every update (transfer),
    with both sides of the paper's bound (transpeft.ffn_gradient) on the test questions; one row per update.
    updates: (regime, update seed, directory). The upper bound (train_on="new") is trained on each of `updates`
    itself; the study passes it the first update only, as each costs a training."""
    ev = dict(max_new_tokens=recipe["max_new_tokens"], batch_size=len(test))
    ids, targets = test_batch
    if arm.get("train_on") == "new":
        rows = []
        for regime, u, path in updates:
            model, log = toy_lora(arm, settings, seed, path, dataset, tokenizer, run_dir / Path(path).name, recipe,
                                  device)
            acc = evaluate(model, tokenizer, test, out_jsonl=run_dir / Path(path).name / "eval.jsonl",
                           desc=f"eval on {Path(path).name}", **ev)
            rows.append({"arm": arm["key"], "seed": seed, "regime": regime, "update_seed": u,
                         "final_loss": log[-1]["loss"], "source": None, "transfer": acc["accuracy"]})
        return rows
    model, log = toy_lora(arm, settings, seed, old, dataset, tokenizer, run_dir, recipe, device)
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


# -----------------------------------------------------------------------------------------------------------
# Which modules learned the task


LEARNED = 0.9  # source accuracy from which an arm counts as having learned the task on toy-v1


# -----------------------------------------------------------------------------------------------------------
# Summary, tables and chart

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
    arms = arms or select_arms(["all"])
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


# Below this many seeds a 95% t interval of a difference of accuracies is mostly wider than the difference's range
# [-1, 1] (t(0.975, 1) = 12.7): a table shows how many seeds lie on each side of 0 instead.
MIN_SEEDS_FOR_INTERVAL = 5


def delta(c: dict | None, above: str = "> 0") -> str:
    """A paired difference as 'mean ± half-width p p-value', marked * where beyond noise (Holm-adjusted p < 0.05);
    with too few seeds for an interval (or one wider than 1), its mean and on how many seeds it is `above`."""
    if c is None:
        return ""
    if c["n"] < MIN_SEEDS_FOR_INTERVAL or c["ci95"] > 1:
        return f"{c['mean']:+.2f}, {above} on {c['above']} of {c['n']} seeds"
    mark = " *" if c.get("p_holm", 1) < 0.05 else ""
    return f"{c['mean']:+.2f} ± {c['ci95']:.2f} p {c.get('p_holm', c['p']):.2f}{mark}"


def transfer_table(summary: dict) -> list[str]:
    """The study's main table: per arm and regime, transfer accuracy and its paired difference to plain training."""
    names = {key: a["name"] for key, a in summary["arms"].items()}
    regimes, w, cell = list(summary["regimes"]), max(map(len, names.values())), 36
    lines = ["transfer accuracy on the updates (mean ± std) and its paired difference to plain LoRA over every seed "
             "(95% t interval, sign-flip p Holm-adjusted; * p < 0.05)",
             f"{'arm':<{w}}  " + "  ".join(f"{regime + ' update':<{cell}}" for regime in regimes)]
    for key, name in names.items():
        cells = []
        for regime in regimes:
            s = summary["regimes"][regime]["arms"].get(key)
            cells.append(f"{s['transfer'][0]:.2f} ± {s['transfer'][1]:.2f}  {delta(s.get('itt'), 'better'):<22}"
                         if s else "-")
        lines.append(f"{name:<{w}}  " + "  ".join(f"{c:<{cell}}" for c in cells))
    return lines


# What each toy update did, in words a newcomer needs no docs for (toy.REGIMES)
REGIME_TEXT = {"full": "every weight of toy-v1 moved, as real model versions are made",
               "ffn": "only the FFN weights moved: the update rewrote knowledge, the paper's premise",
               "attn": "only attention moved: the paper's premise reversed"}

PUBLISHED = Path(__file__).resolve().parent / "docs" / "toy-study-results.json"  # the study docs/toy-study.md reports


def published_study(path: Path = PUBLISHED) -> dict | None:
    """The published study's summary, computed from its rows as a run computes its own (so the numbers the docs
    quote, this file and a run's reference cannot drift apart); None where the file is absent."""
    if not path.exists():
        return None
    ref = read_json(path)
    _, summary = summarize_study(ref["rows"], select_arms(ref["arms"]))
    return {**summary, "seeds": len({r["seed"] for r in ref["rows"]}), "command": ref["command"]}


def headline(summary: dict, reference: dict | None = None) -> str:
    """What a study prints at its end: per regime, each arm's transfer and its difference to plain training, beside
    the published study's for the same arm (reference: published_study()), and one sentence."""
    names = {key: a["name"] for key, a in summary["arms"].items()}
    seeds = summary["arms"]["plain"]["seeds"]
    w = max(map(len, names.values()))
    this, pub = f"this run ({seeds} seeds)", f"published ({reference['seeds']} seeds)" if reference else ""
    lines = ["transfer: accuracy on the update of the module trained on the old base, unchanged; Δ: its difference "
             "to plain training, seed by seed (mean ± 95% t interval, Holm-adjusted p; * beyond noise; with under "
             f"{MIN_SEEDS_FOR_INTERVAL} seeds, on how many seeds the arm is better)" +
             (f". Published: docs/toy-study.md, `{reference['command']}`." if reference else ".")]
    for regime, s in summary["regimes"].items():
        ref = reference["regimes"].get(regime) if reference else None
        lines += ["", f"{regime} update" + (f": {REGIME_TEXT[regime]}" if regime in REGIME_TEXT else ""),
                  f"  {'arm':<{w}}  {this + ': transfer, Δ':<42}" + (f"  {pub}: transfer, Δ" if ref else "")]
        for key, name in names.items():
            cells = []
            for part in (s, ref):
                a = part["arms"].get(key) if part else None
                cells.append(f"{a['transfer'][0]:.2f}  {delta(a.get('itt'), 'better')}" if a else "-")
            lines.append(f"  {name:<{w}}  {cells[0]:<42}" + (f"  {cells[1]}" if ref else ""))
        lines.append("  " + (told(regime, s, ref, names) if ref else verdict(regime, s, names)))
    return "\n".join(lines)


def told(regime: str, s: dict, ref: dict, names: dict) -> str:
    """One sentence per regime beside the published study: its largest gain over plain training, whether beyond
    noise, what the paper predicts, and whether this run points the same way."""
    shared = [k for k in ref["arms"] if k in s["arms"] and "itt" in ref["arms"][k] and "itt" in s["arms"][k]]
    if not shared:
        return verdict(regime, s, names)
    best = max(shared, key=lambda k: ref["arms"][k]["itt"]["mean"])
    c = ref["arms"][best]["itt"]
    noise = "beyond noise" if c.get("p_holm", 1) < 0.05 else "within noise"
    same = sum((s["arms"][k]["itt"]["mean"] > 0) == (ref["arms"][k]["itt"]["mean"] > 0) for k in shared)
    return (f"Published: plain training keeps {ref['arms']['plain']['transfer'][0]:.2f}; the largest gain is "
            f"{names[best]}'s, {c['mean']:+.2f} ± {c['ci95']:.2f}, {noise}" +
            (f" ({PREDICTION[regime]})" if regime in PREDICTION else "") +
            f". This run points the same way for {same} of {len(shared)} arms.")


def format_study(summary: dict, names: dict, present: list[str], regimes: list[str], source_label: str) -> str:
    """Every table of the study (the report): source accuracy, transfer, the learned-seeds comparison, the regime
    contrast, the bound, and the sentences."""
    w = max(len(names[k]) for k in present)
    with_learned = summary["learned_threshold"] is not None
    lines = [f"{'arm':<{w}}  " + (f"{'learned':>7}  " if with_learned else "") + f"{source_label:>15}"]
    for key in present:
        a = summary["arms"][key]
        src = f"{a['source'][0]:.2f} ± {a['source'][1]:.2f}" if a["source"] else "(trained on it)"
        learned = f"{a['learned']}/{a['seeds']}  " if a["learned"] is not None else "-  "
        lines.append(f"{names[key]:<{w}}  " + (f"{learned:>9}" if with_learned else "") + f"{src:>15}")
    cell = 34
    lines += [""] + transfer_table(summary)
    if summary["learned_threshold"] is not None:
        lines += ["", "secondary: the same difference over the seeds where both arms learned the task (source >= "
                  f"{summary['learned_threshold']}); unadjusted p",
                  f"{'arm':<{w}}  " + "  ".join(f"{regime + ' update':<{cell}}" for regime in regimes)]
    for key in present[1:] if summary["learned_threshold"] is not None else []:
        cells = []
        for regime in regimes:
            c = summary["regimes"][regime]["arms"].get(key, {}).get("learned_subset")
            cells.append(f"{delta(c, 'better')} (n {c['n']})" if c else "")
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


def chart(summary: dict, path: Path) -> bool:
    """One panel per regime: each arm's paired transfer gain over plain training (every seed) as a bar, its 95% t
    interval as a whisker; blue where the Holm-adjusted sign-flip p < 0.05, grey elsewhere. False (nothing written)
    where matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    regimes = list(summary["regimes"])
    arms = [key for key in summary["arms"] if key != "plain"]
    names = [summary["arms"][key]["name"] for key in arms]
    fig, axes = plt.subplots(1, len(regimes), figsize=(3.2 * len(regimes) + 2.6, 0.45 * len(arms) + 1.4),
                             sharex=True, sharey=True, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        cells = [summary["regimes"][regime]["arms"].get(key, {}).get("itt") for key in arms]
        y = [i for i, c in enumerate(cells) if c]
        shown = [c for c in cells if c]
        colors = ["tab:blue" if c.get("p_holm", 1) < 0.05 else "0.7" for c in shown]
        ax.barh(y, [c["mean"] for c in shown], xerr=[c["ci95"] for c in shown], color=colors, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(f"{regime} update")
        ax.set_xlabel("transfer gain over plain")
    axes[0][0].set_yticks(range(len(arms)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle("transfer gain over plain training, every seed: mean and 95% t interval "
                 "(blue: Holm-adjusted sign-flip p < 0.05)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def dose_chart(summary: dict, arms: list[dict], path: Path) -> bool:
    """The dose response: one panel per regime, the transfer gain over plain training (mean, 95% t interval) against
    the rate, one line per arm family (an arm and its doses, `<arm>@<rate>`; x: the first rate the arm sets, so
    p_intra for masking + dropping). A family's default arm whose first rate one of its doses shares is drawn apart
    (a hollow marker). False (nothing written) where matplotlib is not installed or no arm has doses."""
    plt = pyplot()
    families: dict = {}  # base key -> [(rate, arm key, is a dose)]
    for a in arms:
        if rate_keys(a) and a["key"] != "plain":
            families.setdefault(a["key"].split("@")[0], []).append((a[rate_keys(a)[0]], a["key"], "@" in a["key"]))
    families = {k: sorted(v) for k, v in families.items() if any(dose for *_, dose in v)}
    if plt is None or not families:
        return False
    regimes = list(summary["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.6), sharey=True, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        cells = summary["regimes"][regime]["arms"]
        for i, (family, points) in enumerate(families.items()):
            doses = {rate for rate, _, dose in points if dose}
            line = [(r, cells[k]["itt"]) for r, k, dose in points if (dose or r not in doses) and "itt" in cells.get(k, {})]
            apart = [(r, cells[k]["itt"]) for r, k, dose in points if not dose and r in doses and "itt" in cells.get(k, {})]
            name = summary["arms"][points[0][1]]["name"].split(" (")[0]
            color = f"C{i}"
            if line:
                ax.errorbar([r for r, _ in line], [c["mean"] for _, c in line], yerr=[c["ci95"] for _, c in line],
                            marker="o", capsize=3, color=color, label=name)
            for r, c in apart:
                ax.errorbar([r], [c["mean"]], yerr=[c["ci95"]], marker="o", mfc="none", capsize=3, color=color)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{regime} update")
        ax.set_xlabel("rate (masking + dropping: p_intra)")
    axes[0][0].set_ylabel("transfer gain over plain")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("dose response: transfer gain over plain training, every seed (mean and 95% t interval)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def drift_table(drift: dict) -> str:
    """Per update, its drift averaged over layers (analysis.analyze_drift)."""
    columns = (("attn_weight", "attn ΔW/W"), ("ffn_weight", "ffn ΔW/W"), ("attn_cos", "attn 1-cos"),
               ("ffn_cos", "ffn 1-cos"))
    lines = ["drift of each update, mean over layers (each block fed toy-v1's hidden states on the test questions)",
             f"{'update':<20} " + " ".join(f"{title:>11}" for _, title in columns)]
    for name, layers in drift.items():
        means = [sum(layer[k] for layer in layers) / len(layers) for k, _ in columns]
        lines.append(f"{name:<20} " + " ".join(f"{m:>11.3f}" for m in means))
    return "\n".join(lines)


def finish(out: Path, results: dict, report: str, results_name: str = "results.json",
           reference: dict | None = None) -> None:
    """Write results, report and charts (study.png; dose.png where arms were run at several rates); print the headline
    (beside the reference's numbers: the published study) and, last, where everything is."""
    (out / results_name).write_text(json.dumps(results, indent=2))
    (out / "report.txt").write_text(report + "\n")
    charts = [name for name, drawn in (("study.png", chart(results["summary"], out / "study.png")),
                                       ("dose.png", dose_chart(results["summary"], results.get("arms", []),
                                                               out / "dose.png"))) if drawn]
    print("\n" + headline(results["summary"], reference))
    if pyplot() is None:
        print("(pip install matplotlib for the charts)")
    written = ", ".join(str(out / name) for name in [results_name, "report.txt", *charts])
    print(f"\nwrote {written}; every table is in {out / 'report.txt'}" +
          (f" ({results['minutes']:.1f} min)" if "minutes" in results else ""))


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


_WORKER: dict = {}  # a side-by-side worker's data, built once per process (toy_data)


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


def _run_job(job: tuple) -> list[dict]:
    arm, seed, old, updates, run_dir, recipe, device = job
    tokenizer, dataset, test, test_batch = _WORKER["data"]
    return toy_arm(arm, arm_settings(arm), seed, old, updates, dataset, test, test_batch, tokenizer, run_dir, recipe,
                   device)


def run_toy_study(args) -> dict:
    """The embedded default: every arm (or --arms) for every seed, trained on toy-v1 and moved to every update of
    every regime; then the drift analysis of each update, the tables and the chart.

    Each finished arm-seed leaves rows.json in its directory (seed<s>/<arm>/), so that --resume trains only the
    arm-seeds not yet finished (more seeds or arms than the first command named included) and a study too long for
    one sitting runs in several. --jobs N trains N arm-seeds side by side, one process with one thread each: on a
    2-core CPU the toy's matrices (128 wide) gain little from a second thread. One thread or two give the same rows
    (tests/test_toy.py)."""
    t_start = time.time()
    recipe, base_recipe, root = dict(TOY_LORA), toy.RECIPE, None
    if args.quick:  # a smoke test of the whole path, for CI: tiny bases, a few steps; the numbers mean nothing
        base_recipe = {"v1": {**toy.RECIPE["v1"], "steps": 30}, "v2": {**toy.RECIPE["v2"], "steps": 10}}
        root = cache_dir() / "quick"  # beside, not over, the real bases
        recipe.update(steps=6)
    arms = select_arms(args.arms)
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
                old, new = toy.build_bases(u, recipe=base_recipe, root=root, regime=regime)
                toy.task(toy.make_world(u))  # asserts that the task's answers hold on this update too
                updates.append((regime, u, new))
        tokenizer, _, test, _ = data = toy_data(old, recipe, args.quick, args.device)

        jobs, done = [], {}  # one job per arm-seed not finished yet
        for seed in range(args.seed, args.seed + args.seeds):
            for arm in arms:
                on = updates[:1] if arm.get("train_on") == "new" else updates  # the upper bound: the first update
                run_dir = out / f"seed{seed}" / arm["key"].replace("/", "-")  # both@0.2/0.1: both@0.2-0.1
                key = arm_key(arm, recipe, on)
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
            tmp.write_text(json.dumps({"key": arm_key(arm, recipe, job[3]), "rows": rows}, indent=1))
            os.replace(tmp, run_dir / "rows.json")
            done[seed, arm["key"]] = rows
            src = f"{rows[0]['source']:.2f}" if rows[0]["source"] is not None else "  - "
            transfer = " ".join(f"{r['regime']}-u{r['update_seed']} {r['transfer']:.2f}" for r in rows)
            tqdm.write(f"seed {seed} | {arm['name']:<42} | source {src} | transfer {transfer} | {seconds:.0f}s")

        if args.jobs > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP state forked mid-use
            with context.Pool(min(args.jobs, len(jobs)), _start_worker, (old, recipe, args.quick, args.device)) as pool, \
                    tqdm(total=len(jobs), desc=f"arm-seeds, {args.jobs} side by side", unit="arm-seed") as bar:
                t0 = time.time()
                for job, rows in zip(jobs, pool.imap(_run_job, jobs)):  # in order: the rows as one at a time
                    report(job, rows, time.time() - t0)
                    bar.update()
                    t0 = time.time()
        else:
            for job in jobs:
                t0 = time.time()
                arm, seed, old, on, run_dir, recipe, device = job
                rows = toy_arm(arm, arm_settings(arm), seed, old, on, data[1], test, data[3], tokenizer, run_dir,
                               recipe, device)
                report(job, rows, time.time() - t0)
        rows = [row for seed in range(args.seed, args.seed + args.seeds) for arm in arms
                for row in done[seed, arm["key"]]]
        prompts = torch.tensor([tokenizer.encode(e["question"]) for e in test])  # every toy question is 8 words long
        drift = {Path(new).name: analyze_drift(load_model(old), load_model(new), prompts) for _, _, new in updates}
        report_text, summary = summarize_study(rows, arms)
        results = {"recipe": recipe, "arms": arms, "seeds": list(range(args.seed, args.seed + args.seeds)),
                   "regimes": args.regimes, "update_seeds": args.update_seeds,
                   "rows": rows, "summary": summary, "drift": drift, "minutes": (time.time() - t_start) / 60}
        finish(out, results, report_text + "\n\n" + drift_table(drift), reference=published_study())
    finally:
        release_lock(lock)
    return results


def run_arms(args, defaults: dict | None = None) -> dict:
    """python train.py --old A --new B --arms plain,transpeft,refit: the paper's comparison, one run per arm and seed
    under <out>/<arm>-seed<s> (each an ordinary run: --resume continues it, a finished one is reused), summarised as
    the toy study is: seeds pair the arms (the same PEFT initialisation and data order)."""
    arms = select_arms(args.arms, peft={"lora": "LoRA", "dora": "DoRA"}.get(args.peft, "adapter"))
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
