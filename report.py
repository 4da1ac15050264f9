"""
What a study reports, from its rows (one per arm, seed, regime and update seed): the paired differences to plain
training per regime, the regime contrast, the paper's bound; the tables (report.txt), the lines a run ends with, the
charts (study.png, dose.png); and the published study (docs/toy-study-results.json), beside which a toy run prints its
own numbers and from which docs/toy-study.md's tables are computed. The terms are study.py's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import toy
from analysis import pyplot
from arms import all_arms, rate_keys, select_arms
from bases import read_json
from stats import holm, mean_std, paired_interval, spearman


# -----------------------------------------------------------------------------------------------------------
# Summary: paired differences per regime, the regime contrast, the bound

LEARNED = 0.9  # source accuracy from which an arm counts as having learned the task on toy-v1

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
    Spearman's rank correlation of the two over arms × seeds. Then, where arms ran at several rates, the dose
    response (dose_response)."""
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
        summary["regimes"][regime] = {"arms": per_arm, "bound": bound_summary(rr, present, threshold)}
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
    summary["dose"] = dose_response(rows, arms)
    return format_study(summary, names, present, regimes, source_label), summary


def bound_summary(rows: list[dict], present: list[str], learned: float | None = None) -> dict:
    """For one regime: per arm the mean FFN-output gradient norm G on toy-v1 and the mean loss gap |L_new - L_old|
    (a seed's gap averaged over the regime's update seeds), and Spearman's ρ(G, gap) over every arm's seeds; with
    `learned`, also over the arm-seeds whose source accuracy reached it (a module that never learned the task has a
    G and a gap that say little of the paper's account)."""
    gaps = {}  # (arm, seed) -> (G, [gap per update seed], source)
    for r in rows:
        if r.get("ffn_grad_norm") is not None:
            gap = abs(r["loss_new"] - r["loss_old"])
            gaps.setdefault((r["arm"], r["seed"]), (r["ffn_grad_norm"], [], r["source"]))[1].append(gap)
    points = {key: (g, sum(gs) / len(gs)) for key, (g, gs, _) in gaps.items()}  # (arm, seed) -> (G, mean gap)
    out = {"arms": {}}
    for key in present:
        pts = [pt for (a, _), pt in points.items() if a == key]
        if pts:
            out["arms"][key] = {"grad_norm": sum(p[0] for p in pts) / len(pts),
                                "loss_gap": sum(p[1] for p in pts) / len(pts)}
    if len(points) > 2:
        g, gap = zip(*points.values())
        out["spearman"], out["n"] = spearman(list(g), list(gap)), len(points)
    kept = [points[key] for key, (_, _, source) in gaps.items() if source >= learned] if learned is not None else []
    if len(kept) > 2:
        g, gap = zip(*kept)
        out["spearman_learned"], out["n_learned"] = spearman(list(g), list(gap)), len(kept)
    return out


# -----------------------------------------------------------------------------------------------------------
# The dose response: arm families run at several rates


def dose_families(arms: list[dict]) -> dict[str, list[tuple[float, str, bool]]]:
    """The arms run at several rates, by family (an arm and its doses `<arm>@<rate>`): family key -> [(the first rate
    the arm sets, so p_intra for masking + dropping; the arm's key; whether it is a dose)] in rate order. Only
    families with a dose."""
    families: dict = {}
    for a in arms:
        if rate_keys(a):
            families.setdefault(a["key"].split("@")[0], []).append((a[rate_keys(a)[0]], a["key"], "@" in a["key"]))
    return {k: sorted(v) for k, v in families.items() if any(dose for *_, dose in v)}


def dose_line(points: list[tuple[float, str, bool]]) -> list[tuple[float, str]]:
    """The (rate, arm) a family's dose response runs through: its doses, and its default arm where no dose shares its
    first rate (both, 0.1/0.1, is not on the line of both@0.1/0.05, both@0.2/0.1, ...)."""
    doses = {rate for rate, _, dose in points if dose}
    return [(rate, key) for rate, key, dose in points if dose or rate not in doses]


def family_name(key: str) -> str:
    """An arm family's name without its rate ("control B: LoRA dropout {rate}" -> "control B: LoRA dropout")."""
    template = next(a["name"] for a in all_arms() if a["key"] == key)
    return re.sub(r"\s*(\((\w+ )?\{rate\}\)|\{rate\})", "", template).format(peft="LoRA")


CONTROL_B = "lora_dropout"  # generic regularisation, the family every FFN intervention's dose response is held against


def dose_response(rows: list[dict], arms: list[dict]) -> dict:
    """Per arm family on at least two rates, with both the FFN-only and the attention-only update: how its regime
    contrast changes from its lowest rate to its highest. Per seed, each regime's update seeds averaged,
    s = [T(high) − T(low)](ffn update) − [T(high) − T(low)](attn update), which is the change of
    Δ(ffn) − Δ(attn) (plain training cancels). The paper's account (docs/toy-study.md, written before the dose study
    ran) expects s > 0 for the FFN interventions and not for control B, so each family's s minus control B's, seed by
    seed, too. 95% t intervals and unadjusted sign-flip p: a secondary description, no claim."""
    runs: dict = {}  # (arm, seed, regime) -> transfer per update seed
    for r in rows:
        runs.setdefault((r["arm"], r["seed"], r["regime"]), []).append(r["transfer"])
    t = {k: sum(v) / len(v) for k, v in runs.items()}
    changes = {}  # family -> (its points, low arm, high arm, {seed: s})
    for family, points in dose_families(arms).items():
        line = dose_line(points)
        (_, low), (_, high) = line[0], line[-1]
        seeds = sorted({s for (a, s, _) in t if a == low})
        s = {seed: t[high, seed, "ffn"] - t[low, seed, "ffn"] - (t[high, seed, "attn"] - t[low, seed, "attn"])
             for seed in seeds if all((a, seed, g) in t for a in (low, high) for g in ("ffn", "attn"))}
        if len(line) > 1 and len(s) > 1:
            changes[family] = (points, low, high, s)
    rates = {a["key"]: "/".join(str(a[k]) for k in rate_keys(a)) for a in arms}
    out = {}
    for family, (points, low, high, s) in changes.items():
        out[family] = {"arms": [key for _, key, _ in points], "low": low, "high": high,
                       "rates": [rates[low], rates[high]], "change": paired_interval(list(s.values()))}
        if family != CONTROL_B and CONTROL_B in changes:
            b = changes[CONTROL_B][3]
            both = [seed for seed in s if seed in b]
            if len(both) > 1:
                out[family]["minus_control_b"] = paired_interval([s[seed] - b[seed] for seed in both])
    return out


def dose_table(summary: dict) -> str:
    """The dose response as docs/toy-study.md shows it: per family and rate, the gain over plain per regime and the
    regime contrast (mean ± 95% half-width); then per family the change of the regime contrast from its lowest rate
    to its highest, and that minus control B's (mean ± 95% half-width, unadjusted sign-flip p, seeds)."""
    regimes = list(summary["regimes"])

    def cell(c):
        return f"{c['mean']:+.2f} ± {c['ci95']:.2f}" if c else ""

    lines = ["| arm | seeds | " + " | ".join(f"{r}: Δ vs plain" for r in regimes) + " | Δ(ffn) − Δ(attn) |",
             "|---" * (3 + len(regimes)) + "|"]
    for d in summary["dose"].values():
        for key in (k for k in d["arms"] if k in summary["arms"]):  # (an arm named but not run: no row)
            gains = [cell(summary["regimes"][r]["arms"].get(key, {}).get("itt")) for r in regimes]
            lines.append(f"| {summary['arms'][key]['name']} | {summary['arms'][key]['seeds']} | " + " | ".join(gains)
                         + f" | {cell(summary['regime_contrast'].get(key))} |")

    def test(c):
        return f"{cell(c)} (p {c['p']:.2f}, {c['n']} seeds)" if c else ""

    lines += ["", "| family | lowest → highest rate | change of Δ(ffn) − Δ(attn) | minus control B's change |",
              "|---|---|---|---|"]
    for family, d in summary["dose"].items():
        lines.append(f"| {family_name(family)} | {d['rates'][0]} → {d['rates'][1]} | {test(d['change'])} | "
                     f"{test(d.get('minus_control_b'))} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# Tables and sentences

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
        if any("spearman_learned" in summary["regimes"][regime]["bound"] for regime in regimes):
            lines.append(f"{'  over the arm-seeds that learned':<{w}}  {'':>8}  " + "  ".join(
                f"{summary['regimes'][regime]['bound'].get('spearman_learned', float('nan')):>+10.2f}"
                for regime in regimes))
    if summary["dose"]:
        lines += ["", "the dose response: gain over plain LoRA per rate (mean ± 95% t half-width) and the change of "
                  "the regime contrast from each family's lowest rate to its highest, alone and minus control B's (the "
                  "paper's account expects > 0 for the FFN interventions; unadjusted p)", dose_table(summary)]
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


# What each toy update did, in words a newcomer needs no docs for (toy.REGIMES)
REGIME_TEXT = {"full": "every weight of toy-v1 moved, as real model versions are made",
               "ffn": "only the FFN weights moved: the update rewrote knowledge, the paper's premise",
               "attn": "only attention moved: the paper's premise reversed"}


def headline(summary: dict, reference: dict | None = None) -> str:
    """What a study prints at its end: per regime, each arm's transfer and its difference to plain training, beside
    the published study's for the same arm (reference: published_study()), and one sentence."""
    names = {key: a["name"] for key, a in summary["arms"].items()}
    seeds = max(a["seeds"] for a in summary["arms"].values())  # (real bases' --arms need not name plain)
    w = max(map(len, names.values()))
    this = f"this run ({seeds} seed{'s' if seeds > 1 else ''})"
    pub = f"published ({reference['seeds']} seeds)" if reference else ""
    lines = ["transfer: accuracy on the update of the module trained on the old base, unchanged; Δ: its difference "
             "to plain training, seed by seed (mean ± 95% t interval, Holm-adjusted p; * beyond noise; with under "
             f"{MIN_SEEDS_FOR_INTERVAL} seeds, on how many seeds the arm is better)" +
             (". Published: the study of docs/toy-study.md (docs/toy-study-results.json)." if reference else ".")]
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
    """One sentence per regime beside the published study: how plain training transfers, its largest gain over
    plain, whether beyond noise, what the paper predicts, and whether this run's differences have the same signs."""
    shared = [k for k in ref["arms"] if k in s["arms"] and "itt" in ref["arms"][k] and "itt" in s["arms"][k]]
    if not shared:
        return verdict(regime, s, names)
    best = max(shared, key=lambda k: ref["arms"][k]["itt"]["mean"])
    c = ref["arms"][best]["itt"]
    noise = "beyond noise" if c.get("p_holm", 1) < 0.05 else "within noise"
    same = sum((s["arms"][k]["itt"]["mean"] > 0) == (ref["arms"][k]["itt"]["mean"] > 0) for k in shared)
    return (f"Published: plain LoRA answers {ref['arms']['plain']['transfer'][0]:.2f} of the test questions after this "
            f"update; the best arm, {names[best]}, {c['mean']:+.2f} ± {c['ci95']:.2f}, is {noise}" +
            (f" ({PREDICTION[regime]})" if regime in PREDICTION else "") +
            f". This run: the same sign as published for {same} of {len(shared)} arms.")


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


# -----------------------------------------------------------------------------------------------------------
# The published study

PUBLISHED = Path(__file__).resolve().parent / "docs" / "toy-study-results.json"  # the study docs/toy-study.md reports


def published_study(path: Path = PUBLISHED) -> dict | None:
    """The published study's summary, computed from its rows as a run computes its own (so the numbers the docs
    quote, this file and a run's reference cannot drift apart); None where the file is absent."""
    if not path.exists():
        return None
    ref = read_json(path)
    _, summary = summarize_study(ref["rows"], select_arms(ref["arms"]))
    counts = sorted({a["seeds"] for a in summary["arms"].values()})
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"  # arms may have run on more seeds
    return {**summary, "seeds": seeds, "commands": ref["commands"]}


def publish(out: str | Path, commands: list[str], path: Path = PUBLISHED) -> None:
    """Write the published study's file: every finished arm-seed's rows in the study directory `out` (its
    seed<s>/<arm>/rows.json, from every command that ran there, --resume included) and those commands."""
    order = {regime: i for i, regime in enumerate(toy.REGIMES)}
    records = [read_json(f) for f in Path(out).glob("seed[0-9]*/*/rows.json")]
    arms = [a["key"] for a in select_arms(sorted({r["key"]["arm"]["key"] for r in records}))]  # doses by rate
    keep = ("arm", "seed", "regime", "update_seed", "source", "transfer", "ffn_grad_norm", "loss_old", "loss_new")
    rows = sorted(({k: row[k] for k in keep} for r in records for row in r["rows"]),
                  key=lambda r: (r["seed"], arms.index(r["arm"]), order[r["regime"]], r["update_seed"]))
    lines = ",\n".join(json.dumps(row) for row in rows)  # one row per line: a later study's diff shows its rows
    path.write_text(f'{{"commands": {json.dumps(commands, indent=1)},\n"arms": {json.dumps(arms)},\n'
                    f'"rows": [\n{lines}\n]}}\n')


def markdown_table(summary: dict) -> str:
    """The study's main table as docs/toy-study.md shows it: per arm, seeds, learned, source, and per regime transfer
    (mean ± std) and the paired difference to plain (mean ± 95% half-width, Holm-adjusted p; bold where < 0.05)."""
    regimes = list(summary["regimes"])
    lines = ["| arm | seeds | learned | source | " + " | ".join(f"{r} update: transfer | Δ vs plain" for r in regimes)
             + " |", "|---" * (4 + 2 * len(regimes)) + "|"]
    for key, a in summary["arms"].items():
        cells = [a["name"], str(a["seeds"]), f"{a['learned']}/{a['seeds']}" if a["learned"] is not None else "-",
                 f"{a['source'][0]:.2f} ± {a['source'][1]:.2f}" if a["source"] else "(trained on it)"]
        for regime in regimes:
            s = summary["regimes"][regime]["arms"].get(key)
            c = s.get("itt") if s else None
            d = f"{c['mean']:+.2f} ± {c['ci95']:.2f} (p {c['p_holm']:.2f})" if c else ""
            cells += [f"{s['transfer'][0]:.2f} ± {s['transfer'][1]:.2f}" if s else "-",
                      f"**{d}**" if c and c["p_holm"] < 0.05 else d]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def predicted_contrast(key: str) -> str:
    """What the paper's account predicts for an arm's regime contrast: > 0 where it takes FFN knowledge away, < 0
    where it masks attention (control A), nothing for generic regularisation (control B) or plain training."""
    arm = next((a for a in select_arms([key])), {})
    if arm.get("p_intra") or arm.get("p_cross"):
        return "> 0"
    return "< 0" if arm.get("p_attn") else "no prediction"


def markdown_contrast(summary: dict) -> str:
    """The regime contrast against plain as docs/toy-study.md shows it: per arm, seeds, Δ(ffn) − Δ(attn) (mean ± 95%
    half-width, Holm-adjusted p) and what the paper's account predicts."""
    lines = ["| arm | seeds | Δ(ffn) − Δ(attn) | the paper's account predicts |", "|---|---|---|---|"]
    lines += [f"| {summary['arms'][key]['name']} | {c['n']} | {c['mean']:+.2f} ± {c['ci95']:.2f} (p {c['p_holm']:.2f}) "
              f"| {predicted_contrast(key)} |" for key, c in summary["regime_contrast"].items()]
    return "\n".join(lines)


def markdown_bound(summary: dict) -> str:
    """The paper's bound as docs/toy-study.md shows it: per arm G and the loss gap per regime, and ρ(G, gap)."""
    regimes = list(summary["regimes"])
    bounds = [summary["regimes"][r]["bound"] for r in regimes]
    lines = ["| arm | G on toy-v1 | " + " | ".join(f"loss gap, {r}" for r in regimes) + " |",
             "|---" * (2 + len(regimes)) + "|"]
    for key, a in summary["arms"].items():
        if key in bounds[0]["arms"]:
            lines.append(f"| {a['name']} | {bounds[0]['arms'][key]['grad_norm']:.4f} | " +
                         " | ".join(f"{b['arms'][key]['loss_gap']:.3f}" for b in bounds) + " |")
    lines.append(f"| ρ(G, gap), all arms × seeds (n {bounds[0]['n']}) | | " +
                 " | ".join(f"{b['spearman']:+.2f}" for b in bounds) + " |")
    if "spearman_learned" in bounds[0]:
        lines.append(f"| ρ(G, gap), the arm-seeds that learned the task (n {bounds[0]['n_learned']}) | | " +
                     " | ".join(f"{b.get('spearman_learned', float('nan')):+.2f}" for b in bounds) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# Charts, and what a run writes


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
    families = dose_families(arms)
    if plt is None or not families:
        return False
    regimes = list(summary["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.6), sharey=True, squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        cells = summary["regimes"][regime]["arms"]
        for i, (family, points) in enumerate(families.items()):
            on_line = dose_line(points)
            line = [(r, cells[k]["itt"]) for r, k in on_line if "itt" in cells.get(k, {})]
            apart = [(r, cells[k]["itt"]) for r, k, _ in points if (r, k) not in on_line and "itt" in cells.get(k, {})]
            name = family_name(family)
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
