"""
The study's statistics: paired differences over seeds (t intervals, the sign-flip test, Holm's adjustment,
Spearman's ρ), where their variance comes from, and how many seeds and update seeds a study needs for a given
interval (the power computation of docs/toy-study.md):

    python stats.py runs/toy-pilot/results.json --target 0.07     # variance components and designs of a study

A study's transfer differences have three sources of noise: the seed (a module's initialisation and data order,
shared by every update it is moved to), the seed × update interaction (how one module fares on one update), and
the test questions (256 in the toy; within each evaluation). Only the seeds are independent samples of a module,
so seeds are the study's n; update seeds shrink the second source at the price of an evaluation each.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


# Student's t quantile t(0.975, df): a 95% interval for a mean is mean ± T975[df] * SE (df = n - 1; a df between
# the listed ones takes the next smaller one, which widens the interval slightly).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201,
        12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060,
        30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    return T975[max(k for k in T975 if k <= df)]


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
    """Mean of paired differences, its std, SE, the half-width of its 95% t interval (n >= 2), the sign-flip p, and
    how many differences lie above and below 0."""
    m, sd = mean_std(diffs)
    se = sd / len(diffs) ** 0.5
    half = t975(len(diffs) - 1) * se
    return {"n": len(diffs), "mean": m, "std": sd, "se": se, "ci95": half, "excludes_0": abs(m) > half,
            "p": sign_flip_p(diffs), "above": sum(d > 0 for d in diffs), "below": sum(d < 0 for d in diffs)}


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




# -----------------------------------------------------------------------------------------------------------
# Where the variance comes from, and the design it asks for


def variance_components(d: list[list[float]]) -> dict:
    """The paired differences of one comparison, d[s][u] for seed s and update seed u (n seeds × U update seeds,
    both >= 2), split by the additive random-effects model

        d_su = μ + a_s + b_u + e_su,   Var a = σ²_seed, Var b = σ²_update, Var e = σ²_resid

    with the two-way ANOVA estimators (one value per cell): with row (seed) means m_s, column (update) means m_u and
    the grand mean m,
        MS_seed = U Σ_s (m_s − m)² / (n − 1),   MS_update = n Σ_u (m_u − m)² / (U − 1),
        MS_resid = Σ_su (d_su − m_s − m_u + m)² / ((n − 1)(U − 1)),
        σ²_resid = MS_resid,  σ²_seed = (MS_seed − MS_resid) / U,  σ²_update = (MS_update − MS_resid) / n
    (a negative estimate is reported as 0). σ²_resid holds the seed × update interaction and the test questions'
    noise within each evaluation. A study that averages each seed's differences over U update seeds and treats the
    seeds as its samples (summarize_study) has per-seed variance σ²_seed + σ²_resid / U; σ²_update is what the
    updates share, a bias that only more update seeds (not more seeds) shrink."""
    n, u = len(d), len(d[0])
    if n < 2 or u < 2 or any(len(row) != u for row in d):
        raise ValueError("variance components need at least 2 seeds × 2 update seeds, every seed on every update.")
    x = torch.tensor(d, dtype=torch.float64)
    m, m_s, m_u = x.mean(), x.mean(1), x.mean(0)
    ms_seed = u * ((m_s - m) ** 2).sum().item() / (n - 1)
    ms_update = n * ((m_u - m) ** 2).sum().item() / (u - 1)
    ms_resid = ((x - m_s[:, None] - m_u[None, :] + m) ** 2).sum().item() / ((n - 1) * (u - 1))
    return {"n": n, "updates": u, "mean": m.item(), "seed": max(0.0, (ms_seed - ms_resid) / u),
            "update": max(0.0, (ms_update - ms_resid) / n), "resid": ms_resid}


def half_width(components: dict, seeds: int, updates: int) -> float:
    """The expected half-width of the 95% t interval of a mean paired difference over `seeds` seeds, each averaged
    over `updates` update seeds: t(0.975, seeds − 1) · sqrt((σ²_seed + σ²_resid / updates) / seeds)."""
    return t975(seeds - 1) * math.sqrt((components["seed"] + components["resid"] / updates) / seeds)


def seeds_needed(components: dict, updates: int, target: float, most: int = 1000) -> int | None:
    """The fewest seeds whose expected half-width (half_width) is at most target; None beyond `most`."""
    return next((n for n in range(2, most + 1) if half_width(components, n, updates) <= target), None)


def question_variance(correct_a: list[bool], correct_b: list[bool]) -> float:
    """The test questions' share of one evaluation's noise: the variance of the mean of the per-question paired
    differences x_q = correct_a(q) − correct_b(q) over Q questions, var(x) / Q (the binomial noise that more test
    questions would shrink)."""
    x = torch.tensor(correct_a, dtype=torch.float64) - torch.tensor(correct_b, dtype=torch.float64)
    return x.var().item() / len(x)


# -----------------------------------------------------------------------------------------------------------
# The command: a study's components and the designs they ask for


def comparison_table(rows: list[dict], arm: str, against: str, regime: str, contrast: str | None = None) -> list:
    """d[s][u] = transfer(arm) − transfer(against) per seed and update seed under `regime` (every seed with every
    update seed); with contrast, minus the same under the regime `contrast` (the regime contrast, cell by cell)."""
    def table(reg):
        t = {(r["arm"], r["seed"], r["update_seed"]): r["transfer"] for r in rows if r["regime"] == reg}
        seeds = sorted({s for a, s, _ in t if a == arm})
        updates = sorted({u for a, _, u in t if a == arm})
        return [[t[arm, s, u] - t[against, s, u] for u in updates] for s in seeds]

    d = table(regime)
    if contrast:
        d = [[x - y for x, y in zip(a, b)] for a, b in zip(d, table(contrast))]
    return d


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Variance components of a toy study's paired differences, and the seeds "
                                "each comparison needs for a 95% half-width of --target (docs/toy-study.md).")
    p.add_argument("results", help="a toy study's results.json, run with at least 2 update seeds")
    p.add_argument("--against", default="plain", help="the arm every other one is compared with (default plain)")
    p.add_argument("--target", type=float, default=0.07, help="the 95%% half-width wanted (default 0.07)")
    p.add_argument("--updates", default="1,2,4,6", help="update seeds per regime of the designs shown")
    args = p.parse_args(argv)
    try:
        results = json.loads(Path(args.results).read_text())
        rows = results["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"{args.results} is not a toy study's results.json ({e})")
    designs = [int(u) for u in args.updates.split(",")]
    arms = [a["key"] for a in results["arms"] if a["key"] != args.against and a.get("train_on") != "new"]
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    comparisons = [(arm, regime, None) for arm in arms for regime in regimes]
    if {"ffn", "attn"} <= set(regimes):
        comparisons += [(arm, "ffn", "attn") for arm in arms]
    print(f"paired differences against {args.against}, per seed averaged over its update seeds (mean ± 95% t "
          "half-width, sign-flip p, unadjusted); their σ² components (seed, update, resid) and the seeds needed for "
          f"a 95% half-width <= {args.target} with U update seeds per regime")
    print(f"{'arm':<22} {'regime':<9} {'n':>3} {'difference':>15} {'p':>6} {'σ²seed':>8} {'σ²upd':>8} {'σ²resid':>8} " +
          " ".join(f"{'n(U=' + str(u) + ')':>7}" for u in designs))
    for arm, regime, other in comparisons:
        try:
            d = comparison_table(rows, arm, args.against, regime, other)
        except KeyError:  # an arm not run on every seed of the other
            continue
        c = paired_interval([sum(row) / len(row) for row in d]) if len(d) > 1 else None
        v = variance_components(d) if len(d) > 1 and len(d[0]) > 1 else None
        need = [seeds_needed(v, u, args.target) if v else None for u in designs]
        print(f"{arm:<22} {regime + ('−' + other if other else ''):<9} {len(d):>3} " +
              (f"{c['mean']:>+7.3f} ± {c['ci95']:.3f} {c['p']:>6.3f} " if c else f"{'':>22} ") +
              (f"{v['seed']:>8.4f} {v['update']:>8.4f} {v['resid']:>8.4f} " if v else f"{'(one update seed)':>26} ") +
              " ".join(f"{n if n else '-':>7}" for n in need))


if __name__ == "__main__":
    main()
