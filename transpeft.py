"""
Trans-PEFT (Gu et al., "Adapt Once, Thrive with Updates: Transferable Parameter-Efficient Fine-Tuning on Evolving
Base Models", ACL 2025, arXiv 2506.06844): train a PEFT module on an OLD base model so that it keeps working when
plugged, unchanged, into the base model's update (Qwen2 -> Qwen2.5).

Glossary (the paper's names, this code's flags and classes):
    intra-layer knowledge masking   p_intra   MaskedMLP               element-wise 0/1 mask on the SwiGLU product
    cross-layer knowledge dropping  p_cross   DroppingDecoderLayer    stochastic depth of the FFN sub-block; nothing
                                                                      "crosses" layers, one draw per layer
    the drops' random generator               model.transpeft_rng     reseeded per optimizer step: reseed_drops
    switching both on / off                   apply_transpeft / remove_transpeft
    control A (not the paper's)     p_attn    MaskedInputLinear       the same mask on attention's base branch

Why it works (the paper's account): a model update rewrites the *knowledge* stored in the FFN layers much more than
the *task patterns* carried by attention. A PEFT module trained normally leans on the old FFN knowledge and breaks
when it changes. Trans-PEFT takes FFN knowledge away at random during training, so the module learns to do its job
without relying on any particular piece of it. Two interventions, both active in training only:

1. Intra-layer knowledge masking, rate p_intra. In every FFN the SwiGLU product (the input of down_proj) is
   multiplied by a fresh 0/1 mask, drawn independently for every element (sample, token, channel):

       FFN(x) = W_down ( silu(W_gate x) * (W_up x)  ⊙  m ),      m ~ Bernoulli(1 - p_intra)

   With LoRA on the FFN, W_gate, W_up, W_down are the LoRA-adjusted maps W + ΔW: the paper's
   σ(X(W1+ΔW1)) ⊙ m · (W2+ΔW2). (The LoRA-wrapped projections are simply called here, so this holds by itself.)

2. Cross-layer knowledge dropping, rate p_cross. In every decoder layer, with probability p_cross, the whole FFN
   sub-block (post-attention norm, MLP, residual add) is skipped and the residual stream passes through unchanged:

       h = x + Attn(norm(x));   y = h                     with probability p_cross
                                y = h + FFN(norm(h))      otherwise

   One draw per layer per forward pass, shared by the whole batch. Attention is never dropped.

Neither intervention rescales by 1/(1 - p), unlike dropout: the official code (models/modeling_qwen2.py) multiplies
by the bare mask and skips the bare sub-block. That is the point: dropout keeps the expected activation so that the
network at test time sees what it saw in training; here the PEFT module should learn to work with *less* knowledge
than the base provides, and at test time (on the new base) it gets the full, changed, FFN.

A series or parallel FFN adapter (adapter.py) hangs on the `mlp` module, so a dropped layer skips it too: the
residual stream passes through exactly unchanged, as the equation says. (The official code's adapter path, which
its released scripts do not use, still applies the FFN adapter on a dropped layer.)

Random draws use torch's RNG: the masks the global generator of the activations' device (seeded by
torch.manual_seed), the layer drops a CPU torch.Generator of their own, `transpeft_rng` (the model and each of its
layers hold the same one), seeded when Trans-PEFT is switched on, so that processes seeded alike drop the same layers
whatever else each one draws. A training loop reseeds it from (seed, step) before every forward pass
(reseed_drops): every micro-batch of a step, in every data-parallel process, drops the same layers, as the official
run's identically seeded ranks do, and a resumed run repeats the drops of the uninterrupted one.

Beside the method: control A (apply_attention_masking), the same masking moved from the FFN to attention, for
experiments that ask whether a gain is specific to FFN knowledge; and ffn_gradient, the two sides of the paper's
bound (the loss and its gradient norm with respect to the FFN outputs), which the toy study measures per arm.

The file also holds a drift analysis, `python transpeft.py analyze --old qwen2-0.5b --new qwen2.5-0.5b`: how much
an update changes attention vs FFN, by this project's measures (weights, and outputs on the same inputs) and by the
official code's instrument (per-channel output norms of every projection, tracked as training_utils.py does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ARCH_FIELDS, MLP, DecoderLayer

# -----------------------------------------------------------------------------------------------------------
# The two interventions


class MaskedMLP(MLP):
    """SwiGLU whose product is masked element-wise in training: down((silu(gate x) * up x) ⊙ m)."""

    p_intra: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, I): the FFN's knowledge channels
        if self.training and self.p_intra > 0:
            keep = torch.rand_like(h).gt_(self.p_intra)  # 1 or 0: an independent Bernoulli(1 - p) draw per element
            # no 1/(1 - p): the official code does not rescale. In place: the product's backward needs its two
            # factors, not h, so no (B, T, I) tensor is allocated for the masked copy.
            h.mul_(keep)
        return self.down_proj(h)


class DroppingDecoderLayer(DecoderLayer):
    """A decoder layer whose FFN sub-block is skipped, in training, with probability p_cross."""

    p_cross: float = 0.0
    transpeft_rng: torch.Generator | None = None  # the model's, shared by all its layers

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        if self.training and self.p_cross > 0 and self.draw_drop():
            return x  # FFN dropped: norm, MLP (and its adapter) and residual add all skipped, no rescaling
        return x + self.mlp(self.post_attention_layernorm(x))

    @torch.compiler.disable  # a Python decision: a compiled layer (train.py --compile) runs it outside its graphs
    def draw_drop(self) -> bool:
        return torch.rand((), generator=self.transpeft_rng).item() < self.p_cross


def per_layer(rate: float | Sequence[float], n_layers: int, name: str) -> list[float]:
    """One rate per layer, from a single float or a sequence of n_layers floats, each in [0, 1)."""
    rates = [float(rate)] * n_layers if isinstance(rate, (int, float)) else [float(r) for r in rate]
    if len(rates) != n_layers:
        raise ValueError(f"{name} has {len(rates)} values but the model has {n_layers} layers: give one rate, or one "
                         "per layer.")
    for i, r in enumerate(rates):
        if not 0 <= r < 1 or math.isnan(r):
            where = f" (layer {i})" if not isinstance(rate, (int, float)) else ""
            raise ValueError(f"{name} must be in [0, 1), got {r}{where}: it is the probability of taking knowledge "
                             "away.")
    return rates


def apply_transpeft(model: nn.Module, p_intra: float | Sequence[float] = 0.0, p_cross: float | Sequence[float] = 0.1,
                    seed: int | None = None) -> nn.Module:
    """Switch Trans-PEFT on (in place; works with LoRA, adapters or nothing attached). Effective only in train().

    p_intra, p_cross: one rate for all layers, or one per layer. seed: of the layer-dropping generator; by default
    drawn from torch's global RNG, so `torch.manual_seed(s)` before this call makes the drops reproducible. A training
    loop that calls reseed_drops before each step (train.py's does) replaces it with a seed per step.
    Switch off with remove_transpeft(model); calling apply_transpeft again replaces the rates.
    """
    layers = model.model.layers
    intra, cross = per_layer(p_intra, len(layers), "p_intra"), per_layer(p_cross, len(layers), "p_cross")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    model.transpeft_rng = torch.Generator().manual_seed(seed)
    for layer, pi, pc in zip(layers, intra, cross):
        # Swapping the class keeps every parameter, buffer, hook and name; only forward changes.
        layer.__class__, layer.p_cross, layer.transpeft_rng = DroppingDecoderLayer, pc, model.transpeft_rng
        layer.mlp.__class__, layer.mlp.p_intra = MaskedMLP, pi
    model.transpeft_rates = {"p_intra": intra, "p_cross": cross}
    return model


def drop_seed(seed: int, step: int) -> int:
    """The drop generator's seed for optimizer step `step` of a run seeded `seed`: seed * P + step * Q with the primes
    P = 1,000,003 and Q = 1,009. A value shared by (s1, t1) and (s2, t2) needs (s1 - s2) P = (t2 - t1) Q, so Q divides
    s1 - s2: every step of a run gets its own seed, and runs whose seeds differ by less than Q never share one."""
    return seed * 1_000_003 + step * 1_009


def reseed_drops(model: nn.Module, seed: int, step: int) -> None:
    """Make the layer drops a function of (seed, step): every micro-batch of an optimizer step, in every process,
    draws the same pattern (the released run's 4 processes, all seeded alike, drop the same layers for the whole global
    batch of a step), and a resumed run repeats the drops of the uninterrupted one. Nothing happens without
    Trans-PEFT."""
    if getattr(model, "transpeft_rng", None) is not None:
        model.transpeft_rng.manual_seed(drop_seed(seed, step))


def remove_transpeft(model: nn.Module) -> nn.Module:
    """Switch Trans-PEFT off: back to the plain layers of model.py."""
    for layer in model.model.layers:
        if isinstance(layer, DroppingDecoderLayer):
            layer.__class__, layer.mlp.__class__ = DecoderLayer, MLP
            del layer.p_cross, layer.transpeft_rng, layer.mlp.p_intra
    model.transpeft_rng = model.transpeft_rates = None
    return model


# -----------------------------------------------------------------------------------------------------------
# A control: the same masking, on attention instead of the FFN


class MaskedInputLinear(nn.Linear):
    """A projection whose input is masked element-wise in training: W (x ⊙ m), m ~ Bernoulli(1 - p_attn), no
    rescaling, as MaskedMLP masks down_proj's input."""

    p_attn: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p_attn > 0:
            x = x * torch.rand_like(x).gt_(self.p_attn)  # not in place: a LoRA beside this layer reads the same x
        return super().forward(x)


def apply_attention_masking(model: nn.Module, p: float) -> nn.Module:
    """Control A, not part of Trans-PEFT: knowledge masking moved from the FFN to attention. In every layer the input
    of o_proj (all heads' outputs, attention's counterpart of the SwiGLU product) is masked at rate p, in the *base*
    branch only: W_o (x ⊙ m) + (alpha/r) B A x when a LoRA sits on o_proj. FFN masking takes nothing from a LoRA on
    attention, so neither may the control: they differ only in where base knowledge is taken away. Built as the
    interventions are, by swapping the base projection's class; works before or after a LoRA is attached."""
    (p,) = per_layer(p, 1, "p_attn")
    for layer in model.model.layers:
        o = layer.self_attn.o_proj
        base = getattr(o, "base_layer", o)  # under a LoRA wrapper: its frozen base layer
        base.__class__, base.p_attn = MaskedInputLinear, p
    return model


def remove_attention_masking(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, MaskedInputLinear):
            module.__class__ = nn.Linear
            del module.p_attn
    return model


# -----------------------------------------------------------------------------------------------------------
# The analysis: what does an update change, attention or FFN?

ATTN, FFN = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def _weight(module: nn.Module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight  # the base weight, also under a LoRA wrapper


@torch.no_grad()
def analyze_drift(old: nn.Module, new: nn.Module, batches: torch.Tensor | Sequence[torch.Tensor]) -> list[dict]:
    """Per layer, how much the update changed attention and FFN, as weights and as outputs on input batches
    (token ids, (B, T) each; one tensor is one batch).

    This project's three measures:
      weight:  ‖W_new − W_old‖_F / ‖W_old‖_F over the block's projections together (q,k,v,o or gate,up,down).
      Outputs on the same inputs: each block of both models is fed the hidden states the OLD model computes (so
      earlier layers' changes do not leak into a later layer's number); per batch, then averaged over batches:
        cos:   1 − cosine similarity of the old and new block outputs, averaged over tokens;
        norm:  ‖n_new − n_old‖ / ‖n_old‖, n = the block output's per-channel L2 norm over the batch's tokens.
    And the official code's instrument (tracked_norm_drift): per projection, each model on its own activations.
    """
    for field in ARCH_FIELDS:
        a, b = getattr(old.config, field), getattr(new.config, field)
        if a != b:
            raise ValueError(f"The two models differ in {field} ({a} vs {b}): the drift analysis compares two versions "
                             "of one architecture and size.")
    batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    rows = [{"layer": i} for i in range(len(old.model.layers))]
    for i, (lo, ln) in enumerate(zip(old.model.layers, new.model.layers)):
        for block, part, projs in (("attn", "self_attn", ATTN), ("ffn", "mlp", FFN)):
            mo, mn = getattr(lo, part), getattr(ln, part)
            diff = sum((_weight(getattr(mn, p)).float() - _weight(getattr(mo, p)).float()).pow(2).sum() for p in projs)
            ref = sum(_weight(getattr(mo, p)).float().pow(2).sum() for p in projs)
            rows[i][f"{block}_weight"] = (diff / ref).sqrt().item()
            rows[i][f"{block}_cos"] = rows[i][f"{block}_norm"] = 0.0

    captured = {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = (args, output)
        return hook

    for input_ids in batches:
        handles = [getattr(layer, part).register_forward_hook(keep((i, part)))
                   for i, layer in enumerate(old.model.layers) for part in ("self_attn", "mlp")]
        try:
            old(input_ids)
        finally:
            for h in handles:
                h.remove()
        for i, ln in enumerate(new.model.layers):
            for block, part in (("attn", "self_attn"), ("ffn", "mlp")):
                args, out_old = captured[(i, part)]
                out_new = getattr(ln, part)(*args).float()  # the new block on the old block's inputs
                out_old = out_old.float()
                cos = (1 - F.cosine_similarity(out_new, out_old, dim=-1)).mean().item()
                n_old, n_new = out_old.flatten(0, 1).norm(dim=0), out_new.flatten(0, 1).norm(dim=0)  # (C,)
                rows[i][f"{block}_cos"] += cos / len(batches)
                rows[i][f"{block}_norm"] += ((n_new - n_old).norm() / n_old.norm()).item() / len(batches)
    for row, tracked in zip(rows, tracked_norm_drift(old, new, batches)):
        row.update(tracked)
    return rows


@torch.no_grad()
def track_output_norms(model: nn.Module, batches: Sequence[torch.Tensor],
                       momentum: float = 0.9) -> dict[str, torch.Tensor]:
    """The official activation instrument (training_utils.py LinearOutputNormTracker), one process: a forward hook on
    every nn.Linear records, for each batch b, the L2 norm of each output channel c over the batch's tokens,
    n_b[c] = ‖Y_b[:, c]‖_2, and keeps an exponential moving average started at zero: s <- 0.9 s + 0.1 n_b.
    Returns s per module name; the model runs on its own activations. Unlike the official hook, the norms are taken
    in float32 (it takes them in the activations' dtype) and not averaged over processes."""
    tracked: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            norms = output.reshape(-1, output.shape[-1]).float().norm(dim=0)  # (C,): over every token of the batch
            tracked[name] = tracked.get(name, torch.zeros_like(norms)) * momentum + norms * (1 - momentum)
        return hook

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(keep(n)) for n, m in linears]
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return tracked


@torch.no_grad()
def tracked_norm_drift(old: nn.Module, new: nn.Module, batches: Sequence[torch.Tensor]) -> list[dict]:
    """Per layer, the relative change ‖s_new − s_old‖ / ‖s_old‖ of the official tracker's per-channel output norms
    (track_output_norms, each model on its own activations), averaged over the projections of attention (q,k,v,o)
    and of the FFN (gate, up, down)."""
    s_old, s_new = track_output_norms(old, batches), track_output_norms(new, batches)
    rows = []
    for i in range(len(old.model.layers)):
        row = {}
        for block, part, projs in (("attn", "self_attn", ATTN), ("ffn", "mlp", FFN)):
            names = [f"model.layers.{i}.{part}.{p}" for p in projs]
            shifts = [((s_new[n] - s_old[n]).norm() / s_old[n].norm()).item() for n in names]
            row[f"{block}_tracked"] = sum(shifts) / len(shifts)
        rows.append(row)
    return rows


def ffn_gradient(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """The two quantities of the paper's account on one batch, in eval mode (no masking, no dropping, no dropout):

        L = the mean cross-entropy over the positions with a target (-100: none)
        G = ‖∂L/∂(y_1, ..., y_n)‖_2, y_l the output of layer l's FFN sub-block (all tokens, all layers together)

    To first order an update that moves the FFN outputs by δ changes the loss by <∂L/∂y, δ>, so
    |L_new − L_old| <= G ‖δ‖ + o(‖δ‖): the paper's bound, and Trans-PEFT's claim is that it lowers G.
    Returns (L, G) as floats."""
    deltas = []

    def perturb(module, args, output):  # y_l + δ_l with δ_l = 0: ∂L/∂δ_l is ∂L/∂y_l through every later layer
        delta = torch.zeros_like(output, requires_grad=True)
        deltas.append(delta)
        return output + delta

    handles = [layer.mlp.register_forward_hook(perturb) for layer in model.model.layers]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = model(input_ids, targets=targets) / (targets != -100).sum()
            grads = torch.autograd.grad(loss, deltas)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return loss.item(), torch.sqrt(sum(g.float().pow(2).sum() for g in grads)).item()


COLUMNS = [("attn_weight", "attn ΔW/W"), ("ffn_weight", "ffn ΔW/W"), ("attn_cos", "attn 1-cos"),
           ("ffn_cos", "ffn 1-cos"), ("attn_norm", "attn Δnorm"), ("ffn_norm", "ffn Δnorm"),
           ("attn_tracked", "attn Δtrack"), ("ffn_tracked", "ffn Δtrack")]


def format_table(rows: list[dict]) -> str:
    lines = ["layer | " + " | ".join(f"{title:>10}" for _, title in COLUMNS)]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(f"{r['layer']:>5} | " + " | ".join(f"{r[k]:>10.4g}" for k, _ in COLUMNS))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k, _ in COLUMNS}
    lines.append(" mean | " + " | ".join(f"{mean[k]:>10.4g}" for k, _ in COLUMNS))
    return "\n".join(lines)


def save_plot(rows: list[dict], path: str, title: str) -> bool:
    """A PNG of attention vs FFN drift by layer; False (nothing written) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = [r["layer"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    labels = ("relative weight change", "1 − cos(output)", "per-channel norm shift")
    for ax, metric, label in zip(axes, ("weight", "cos", "norm"), labels):
        ax.plot(layers, [r[f"attn_{metric}"] for r in rows], "o-", label="attention")
        ax.plot(layers, [r[f"ffn_{metric}"] for r in rows], "s-", label="FFN")
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.set_title(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@torch.no_grad()
def drop_costs(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> dict:
    """What cross-layer dropping costs, layer by layer: the next-token loss (mean over the tokens with a target) of
    the model as it is, and with one layer's FFN sub-block skipped (the residual stream passing through, as p_cross
    does). One forward pass per layer. A layer whose drop raises the loss far above the others makes the training
    loss spike on the steps that drop it: a reader choosing per-layer rates will want this.
    Returns {"base": loss, "dropped": [loss with layer i dropped, ...]}."""
    n = (targets != -100).sum().item()

    def skip(module, args, output):  # h + 0: the FFN sub-block's residual add leaves h unchanged
        return torch.zeros_like(output)

    model.eval()
    base, dropped = model(ids, targets=targets).item() / n, []
    for layer in model.model.layers:
        handle = layer.mlp.register_forward_hook(skip)
        try:
            dropped.append(model(ids, targets=targets).item() / n)
        finally:
            handle.remove()
    return {"base": base, "dropped": dropped}


# A few GSM8K-style lines (written for this file) so that the analysis runs without any dataset.
DEFAULT_TEXT = [
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 35 of them. How many are left?",
    "Tom walks 3 kilometres to school and back every day. How far does he walk in a 5-day week?",
    "The capital of France is Paris, and the river that runs through it is the Seine.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Water boils at 100 degrees Celsius at sea level, and freezes at 0 degrees.",
    "A train leaves at 9:15 and arrives at 11:40. How long is the journey in minutes?",
]


def read_lines(path) -> list[str]:
    """The non-empty lines of a text file, or the built-in lines when path is None."""
    from pathlib import Path

    if path is None:
        return DEFAULT_TEXT
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"--text {path} cannot be read ({e.strerror}).") from None
    if not lines:
        raise ValueError(f"{path} has no text to feed the model.")
    return lines


def drop_cost_command(args) -> None:
    import json
    import sys
    from pathlib import Path

    from data import collate, next_token_targets
    from model import load_model, load_tokenizer

    try:
        lines = read_lines(args.text)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        model, tok = load_model(args.model, dtype, args.device), load_tokenizer(args.model)
        sequences = [ids for ids in (tok.encode(line)[: args.max_tokens] for line in lines) if len(ids) > 1]
        if not sequences:
            raise ValueError("Every input line is a single token: give longer lines.")
        # one right-padded batch: padding sits after every real token, and its targets carry no loss
        ids, labels = collate([{"input_ids": s, "labels": s} for s in sequences], tok.pad_token_id)
        costs = drop_costs(model, ids.to(args.device), next_token_targets(labels).to(args.device))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.model}: next-token loss {costs['base']:.3f} nats ({len(sequences)} inputs); with one layer's FFN "
          "dropped:")
    print("layer |   loss | increase")
    for i, value in enumerate(costs["dropped"]):
        print(f"{i:>5} | {value:6.3f} | {value - costs['base']:+8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, **costs}, indent=2))
    print(f"wrote {out}")


def main(argv=None) -> None:
    import argparse
    import json
    import sys
    from pathlib import Path

    from model import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description="Analyses for Trans-PEFT: how an update changes attention vs FFN, by "
                                                 "layer "
                                                 "(analyze), and what dropping each layer's FFN costs (drop-cost).")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="compare an old base model and its update")
    a.add_argument("--old", required=True, help="alias, local directory or hub id of the old base")
    a.add_argument("--new", required=True, help="alias, local directory or hub id of the updated base")
    a.add_argument("--text", help="a text file to feed both models (default: a few built-in lines)")
    a.add_argument("--max-tokens", type=int, default=256, help="tokens per input line")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--out", default="runs/analysis", help="directory for analysis.json and drift.png")
    d = sub.add_parser("drop-cost",
                       help="the loss of a model with each layer's FFN dropped in turn (one forward pass per layer)")
    d.add_argument("--model", required=True, help="alias, local directory or hub id")
    d.add_argument("--text", help="a text file, one input per line (default: a few built-in lines)")
    d.add_argument("--max-tokens", type=int, default=256, help="tokens per input line")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--out", default="runs/drop-cost.json", help="where to write the per-layer losses (JSON)")
    args = parser.parse_args(argv)
    if args.max_tokens <= 0:
        parser.error("--max-tokens must be a positive number of tokens")
    if args.command == "drop-cost":
        return drop_cost_command(args)
    try:
        lines = read_lines(args.text)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        old, new = load_model(args.old, dtype, args.device), load_model(args.new, dtype, args.device)
        tok = load_tokenizer(args.old)
        encoded = [tok.encode(line)[: args.max_tokens] for line in lines]
        rows = analyze_drift(old, new, [torch.tensor([ids], device=args.device) for ids in encoded])  # a batch per line
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

    print(f"drift from {args.old} to {args.new} ({len(lines)} inputs, {sum(map(len, encoded))} tokens)")
    print(format_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps({"old": args.old, "new": args.new, "layers": rows}, indent=2))
    plotted = save_plot(rows, str(out / "drift.png"), f"{args.old} → {args.new}")
    plot = f" and {out / 'drift.png'}" if plotted else " (install matplotlib for drift.png)"
    print(f"wrote {out / 'analysis.json'}{plot}")


if __name__ == "__main__":
    main()
