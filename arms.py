"""
The study's arms: one way each of training the PEFT module, compared seed by seed with plain training. One schema
for the toy study and for real bases (train.py --arms): an arm is a dict of its key, its name, the rates it sets
(every intervention's, transpeft.INTERVENTIONS, and lora_dropout; every rate it does not set is 0), and optionally
train_on="new" (the upper bound), rates_from_flags (the command line's rates), adaptive (each rate spread over the
layers as their FFNs moved: adaptive_rates) and on_request (run only when named). `<arm>@<rate>` is an arm at another
rate: a dose.
"""

from __future__ import annotations

import argparse

from transpeft import INTERVENTIONS


def all_arms() -> list[dict]:
    """Every arm: plain, the flags' rates, each intervention's own (a fork's too), control B, the upper bound. An arm
    sets rates (every other one 0), train_on="new" or rates_from_flags; on_request ones run only when named (or with
    --arms all), so that the toy's default fits 10 minutes. "{peft}", "{rate}" in a name: LoRA/DoRA/adapter, a rate."""
    flags = dict(key="transpeft", name="Trans-PEFT trained on old (the flags' rates)", rates_from_flags=True)
    return [dict(key="plain", name="plain {peft}"), {**flags, "on_request": True},
            *(arm for unit in INTERVENTIONS for arm in unit.arms),
            dict(key="adaptive", name="adaptive masking + dropping, per layer (mean {rate})", p_intra=0.2,
                 p_cross=0.1, adaptive=True, on_request=True),
            dict(key="lora_dropout", name="control B: LoRA dropout {rate}", lora_dropout=0.3),
            dict(key="refit", name="upper bound: {peft} trained on the update", train_on="new", on_request=True)]


def rate_keys(arm: dict) -> list[str]:  # the rates an arm sets: interventions' (p_intra, ...) and lora_dropout
    return [k for k in (*(unit.name for unit in INTERVENTIONS), "lora_dropout") if k in arm]


PEFT_NAMES = {"lora": "LoRA", "dora": "DoRA", "adapter": "adapter"}  # train.py --peft, as an arm's name says it


def select_arms(wanted: list[str] | None, peft: str = "lora") -> list[dict]:
    """The arms named, in all_arms order, names filled in, for a PEFT kind (--peft). None: every arm not run on
    request; "all": every arm with settings of its own (not "transpeft", which at the default flags is "drop").
    "<key>@<rate>" (drop@0.05, both@0.2, lora_dropout@0.5) is that arm with every rate it sets at <rate>: a dose,
    placed after its arm; "<key>@<rate>/<rate>" gives an arm that sets two rates one each, in rate_keys order
    (both@0.2/0.1: p_intra 0.2, p_cross 0.1). Control B raises LoRA's dropout: with a bottleneck adapter, which has
    none, it is left out, and refused if named."""
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
    if peft == "adapter":
        if any(w.partition("@")[0] == "lora_dropout" for w in wanted or []):
            raise ValueError("--arms lora_dropout (control B) raises LoRA's dropout, and a bottleneck adapter has "
                             "none: leave it out with --peft adapter.")
        arms = {key: a for key, a in arms.items() if "lora_dropout" not in a}

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
        return {**a, "name": name.format(peft=PEFT_NAMES[peft], rate="/".join(map(str, rates)))}

    return [named(a) for key, base in arms.items()
            for a in (base, *(dose(base, d) for d in doses if d.partition("@")[0] == key)) if chosen(a)]


def adaptive_rates(rate: float, moved: list[float], most: float = 0.9) -> list[float]:
    """The paper's open question (rates "adjusted to the degree of variation in each layer"): per layer l, the rate in
    proportion to how much that layer's FFN moved in an update, p_l = p · m_l / mean(m), so that the rates average p,
    as a uniform arm at p does (each capped at `most`; where the cap binds, the average is below p)."""
    mean = sum(moved) / len(moved)
    if not mean > 0:
        raise ValueError("adaptive rates need an update that moved the FFN: every layer's drift is 0.")
    return [min(most, rate * m / mean) for m in moved]


def arm_settings(arm: dict, flags: argparse.Namespace | None = None) -> dict:
    """The interventions an arm trains with: its own (every other rate 0); rates_from_flags: those of the flags."""
    names = [unit.name for unit in INTERVENTIONS]
    own = {k: getattr(flags, k) for k in names} if arm.get("rates_from_flags") else {}
    return {**dict.fromkeys(names, 0.0), **own, **{k: arm[k] for k in rate_keys(arm)}}
