"""
Trans-PEFT (Gu et al., "Adapt Once, Thrive with Updates: Transferable Parameter-Efficient Fine-Tuning on Evolving
Base Models", ACL 2025, arXiv 2506.06844): train a PEFT module on an OLD base model so that it keeps working when
plugged, unchanged, into the base model's update (Qwen2 -> Qwen2.5).

Glossary (the paper's names, this code's flags and classes):
    intra-layer knowledge masking   --p-intra   MaskedMLP               element-wise 0/1 mask on the SwiGLU product
    cross-layer knowledge dropping  --p-cross   DroppingDecoderLayer    the FFN sub-block skipped, one draw per layer
    the drops' random generator                 model.transpeft_rng     reseeded per optimizer step: reseed_drops
    switching both on / off                     apply_transpeft / remove_transpeft
    control A (not the paper's)     --p-attn    MaskedInputLinear       the same mask on attention's base branch
    each of the three as one unit               Intervention            INTERVENTIONS: what the flags, the study's
                                                                        arms and DDP's set-up are derived from

Why it works (the paper's account): a model update rewrites the *knowledge* stored in the FFN layers much more than
the *task patterns* carried by attention. A PEFT module trained normally leans on the old FFN knowledge and breaks
when it changes. Trans-PEFT takes FFN knowledge away at random during training, so the module learns to do its job
without relying on any particular piece of it. Two interventions, both active in training only:

1. Intra-layer knowledge masking, rate p_intra (MaskedMLP). In every FFN the SwiGLU product (the input of down_proj)
   is multiplied by a fresh 0/1 mask, drawn independently for every element (sample, token, channel):

       FFN(x) = W_down ( silu(W_gate x) * (W_up x)  ⊙  m ),      m ~ Bernoulli(1 - p_intra)

   With LoRA on the FFN, W_gate, W_up, W_down are the LoRA-adjusted maps W + ΔW: the paper's
   σ(X(W1+ΔW1)) ⊙ m · (W2+ΔW2). (The LoRA-wrapped projections are simply called here, so this holds by itself.)

2. Cross-layer knowledge dropping, rate p_cross (DroppingDecoderLayer). In every decoder layer, with probability
   p_cross, the whole FFN sub-block (post-attention norm, MLP, residual add) is skipped and the residual stream passes
   through unchanged; attention is never dropped. It is stochastic depth of the FFN sub-block: nothing "crosses"
   layers, the name is the paper's.

       h = x + Attn(norm(x));   y = h                     with probability p_cross
                                y = h + FFN(norm(h))      otherwise

   One draw per layer per optimizer step, shared by the whole batch: the draws come from a generator of their own,
   `transpeft_rng` (the model and each of its layers hold the same one), which the training loop reseeds from
   (seed, step) before every micro-batch (the rule: reseed_drops). So every micro-batch of a step, in every
   data-parallel process, drops the same layers, as the released run's identically seeded processes do, and a resumed run repeats
   the drops of the uninterrupted one. (Without the reseed, as in a bare forward loop, each forward pass draws anew.)

Neither intervention rescales by 1/(1 - p), unlike dropout: the official code (models/modeling_qwen2.py) multiplies
by the bare mask and skips the bare sub-block. That is the point: dropout keeps the expected activation so that the
network at test time sees what it saw in training; here the PEFT module should learn to work with *less* knowledge
than the base provides, and at test time (on the new base) it gets the full, changed, FFN. The masks come from
torch's global RNG (seeded by torch.manual_seed), like dropout's.

A series or parallel FFN adapter (adapter.py) hangs on the `mlp` module, so a dropped layer skips it too: the
residual stream passes through exactly unchanged, as the equation says. (The official code's adapter path, which
its released scripts do not use, still applies the FFN adapter on a dropped layer.)

Beside the method, two instruments of the study (study.py): control A (apply_attention_masking, not the paper's), the
same masking moved from the FFN to attention, which asks whether a gain is specific to FFN knowledge; and
ffn_gradient, the two sides of the paper's bound (the loss and its gradient norm with respect to the FFN outputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MLP, DecoderLayer

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
    """A decoder layer whose FFN sub-block is skipped, in training, with probability p_cross (one draw per layer
    from transpeft_rng)."""

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


def per_layer(rate: float | Sequence[float] | str, n_layers: int, name: str) -> list[float]:
    """One rate per layer, each in [0, 1), from a single float, a sequence of n_layers floats, or a depth schedule
    "linear:a:b" (a at the first layer to b at the last, evenly; resolved here, where the depth is known, so that a
    run's args.json keeps what was typed)."""
    if isinstance(rate, str) and rate.startswith("linear:"):
        try:
            a, b = (float(v) for v in rate.split(":")[1:])
        except ValueError:
            raise ValueError(f"{name} {rate!r}: a schedule is linear:<first layer's rate>:<last layer's rate>, e.g. "
                             "linear:0:0.2.") from None
        rates = [a + (b - a) * i / max(1, n_layers - 1) for i in range(n_layers)]
    else:
        rates = [float(rate)] * n_layers if isinstance(rate, (int, float, str)) else [float(r) for r in rate]
    if len(rates) != n_layers:
        raise ValueError(f"{name} has {len(rates)} values but the model has {n_layers} layers: give one rate, or one "
                         "per layer.")
    for i, r in enumerate(rates):
        if not 0 <= r < 1 or math.isnan(r):
            one = isinstance(rate, (int, float)) or (isinstance(rate, str) and not rate.startswith("linear:"))
            where = "" if one else f" (layer {i})"
            raise ValueError(f"{name} must be in [0, 1), got {r}{where}: it is the probability of taking knowledge "
                             "away.")
    return rates


def apply_transpeft(model: nn.Module, p_intra: float | Sequence[float] = 0.0, p_cross: float | Sequence[float] = 0.0,
                    seed: int | None = None) -> nn.Module:
    """Switch Trans-PEFT on (in place; works with LoRA, adapters or nothing attached). Effective only in train().

    p_intra, p_cross: one rate for all layers, or one per layer; 0 (nothing taken away) unless given, as everywhere
    in this code (the released recipe: p_intra 0, p_cross 0.1). seed: of the layer-dropping generator; by default
    drawn from torch's global RNG, so `torch.manual_seed(s)` before this call makes the drops reproducible. A training
    loop reseeds it per step: see reseed_drops.
    Switch off with remove_transpeft(model); calling apply_transpeft again replaces the rates.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    MASKING.switch_on(model, p_intra, seed)
    DROPPING.switch_on(model, p_cross, seed)
    return model


def drop_seed(seed: int, step: int) -> int:
    """The drop generator's seed for optimizer step `step` of a run seeded `seed`: seed * P + step * Q with the primes
    P = 1,000,003 and Q = 1,009. A value shared by (s1, t1) and (s2, t2) needs (s1 - s2) P = (t2 - t1) Q, so Q divides
    s1 - s2: every step of a run gets its own seed, and runs whose seeds differ by less than Q never share one."""
    return seed * 1_000_003 + step * 1_009


def reseed_drops(model: nn.Module, seed: int, step: int) -> None:
    """The one rule of the drops' seeding: call this before EVERY forward pass of a training step (each micro-batch,
    in each process) with that optimizer step's index, as train.py does. Then the drops are a function of (seed, step):
    every micro-batch of a step, in every process, draws the same pattern (the released run's 4 processes, all seeded
    alike, drop the same layers for the whole global batch of a step), and a resumed run repeats the drops of the
    uninterrupted one. Called once per step instead, the second micro-batch would draw a pattern of its own. Nothing
    happens without Trans-PEFT."""
    if getattr(model, "transpeft_rng", None) is not None:
        model.transpeft_rng.manual_seed(drop_seed(seed, step))


def remove_transpeft(model: nn.Module) -> nn.Module:
    """Switch Trans-PEFT off: back to the plain layers of model.py."""
    DROPPING.switch_off(model)
    MASKING.switch_off(model)
    return model


def _mask_ffns(model: nn.Module, rates: list[float], seed: int) -> None:
    for layer, rate in zip(model.model.layers, rates):
        # Swapping the class keeps every parameter, buffer, hook and name; only forward changes.
        layer.mlp.__class__, layer.mlp.p_intra = MaskedMLP, rate


def _unmask_ffns(model: nn.Module) -> None:
    for layer in model.model.layers:
        if isinstance(layer.mlp, MaskedMLP):
            layer.mlp.__class__ = MLP
            del layer.mlp.p_intra


def step_generator(model: nn.Module, seed: int) -> torch.Generator:
    """model.transpeft_rng, created seeded with `seed` where it is absent: the one generator of every per-step draw
    (the drops, a fork's own), shared by all layers and reseeded per step (reseed_drops)."""
    if getattr(model, "transpeft_rng", None) is None:
        model.transpeft_rng = torch.Generator().manual_seed(seed)
    return model.transpeft_rng


def _drop_ffns(model: nn.Module, rates: list[float], seed: int) -> None:
    step_generator(model, seed)
    for layer, rate in zip(model.model.layers, rates):
        layer.__class__, layer.p_cross, layer.transpeft_rng = DroppingDecoderLayer, rate, model.transpeft_rng


def _undrop_ffns(model: nn.Module) -> None:
    for layer in model.model.layers:
        if isinstance(layer, DroppingDecoderLayer):
            layer.__class__ = DecoderLayer
            del layer.p_cross, layer.transpeft_rng
    model.transpeft_rng = None


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


def apply_attention_masking(model: nn.Module, p: float | Sequence[float] | str) -> nn.Module:
    """Control A, not part of Trans-PEFT: knowledge masking moved from the FFN to attention. In every layer the input
    of o_proj (all heads' outputs, attention's counterpart of the SwiGLU product) is masked at rate p, in the *base*
    branch only: W_o (x ⊙ m) + (alpha/r) B A x when a LoRA sits on o_proj. FFN masking takes nothing from a LoRA on
    attention, so neither may the control: they differ only in where base knowledge is taken away. Built as the
    interventions are, by swapping the base projection's class; works before or after a LoRA is attached."""
    ATTENTION_MASKING.switch_on(model, p, seed=0)
    return model


def remove_attention_masking(model: nn.Module) -> nn.Module:
    ATTENTION_MASKING.switch_off(model)
    return model


def _mask_attention(model: nn.Module, rates: list[float], seed: int) -> None:
    for layer, rate in zip(model.model.layers, rates):
        o = layer.self_attn.o_proj
        base = getattr(o, "base_layer", o)  # under a LoRA wrapper: its frozen base layer
        base.__class__, base.p_attn = MaskedInputLinear, rate


def _unmask_attention(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, MaskedInputLinear):
            module.__class__ = nn.Linear
            del module.p_attn


# -----------------------------------------------------------------------------------------------------------
# The interventions as units: what the command line, the training loop, the study and the run directory derive
# from. A fork adds one by appending an Intervention to INTERVENTIONS (docs/extending.md).

STUDY_RATE = 0.1  # the study arms' rate, every intervention's: the released recipe's p_cross, so arms compare


@dataclass(frozen=True)
class Intervention:
    """One way of taking knowledge away in training, and everything the rest of the code needs to know about it.

    name      its rate's name: "p_intra" is the flag --p-intra and the key of args.json and results.json
    tag       its part of a run directory's default name (..-attn0.1-..)
    help      the flag's help
    apply     apply(model, rates, seed) switches it on, one rate per layer; seed: of model.transpeft_rng, for draws
              that follow the per-step reseed (reseed_drops)
    remove    remove(model) switches it off
    default   the flag's default: one rate, one per layer ("0.1,0.2,..."), or a schedule ("linear:0:0.2")
    unused    it can leave a trainable weight without a gradient in a step (a LoRA inside a skipped block):
              DDP's find_unused_parameters follows
    per_step  its draws come from model.transpeft_rng, reseeded per step (the same for every micro-batch and
              process); else from torch's global RNG, like dropout's
    arms      the study arms it offers (arms.all_arms): dicts of key, name ("{rate}" in it: the arm's rate), the
              rates they set, on_request; `--arms <key>@<rate>` runs one at another rate"""

    name: str
    tag: str
    help: str
    apply: Callable[[nn.Module, list[float], int], None]
    remove: Callable[[nn.Module], None]
    default: str = "0.0"
    unused: bool = False
    per_step: bool = False
    arms: tuple[dict, ...] = ()

    def switch_on(self, model: nn.Module, rate: float | Sequence[float] | str, seed: int | None = None) -> None:
        """apply at `rate` resolved per layer (per_layer), and note the rates on the model (model.intervention_rates),
        where train() reads what DDP must be told. seed None: drawn from torch's global RNG (per_step units)."""
        rates = per_layer(rate, len(model.model.layers), self.name)
        if seed is None and self.per_step:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.apply(model, rates, seed)
        model.intervention_rates = {**(getattr(model, "intervention_rates", None) or {}), self.name: rates}

    def switch_off(self, model: nn.Module) -> None:
        self.remove(model)
        (getattr(model, "intervention_rates", None) or {}).pop(self.name, None)


MASKING = Intervention(
    "p_intra", "intra", "knowledge-masking rate: one float, one per layer (commas), or linear:<first>:<last>",
    _mask_ffns, _unmask_ffns,
    arms=(dict(key="mask", name="Trans-PEFT masking (p_intra {rate})", p_intra=STUDY_RATE, on_request=True),))
DROPPING = Intervention(
    "p_cross", "cross", "knowledge-dropping rate: one float, one per layer (commas), or linear:<first>:<last>",
    _drop_ffns, _undrop_ffns, default="0.1", unused=True, per_step=True,
    arms=(dict(key="drop", name="Trans-PEFT dropping (p_cross {rate})", p_cross=STUDY_RATE),
          dict(key="both", name="Trans-PEFT masking + dropping", p_intra=STUDY_RATE, p_cross=STUDY_RATE)))
ATTENTION_MASKING = Intervention(
    "p_attn", "attn", "control A, not the paper's: the same masking on attention's input to o_proj (base branch)",
    _mask_attention, _unmask_attention,
    arms=(dict(key="attn_mask", name="control A: masking attention ({rate})", p_attn=STUDY_RATE),))
INTERVENTIONS = [MASKING, DROPPING, ATTENTION_MASKING]  # the paper's two first: they name every run directory


# -----------------------------------------------------------------------------------------------------------
# The paper's bound, measured


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

    # prepend: before a bottleneck adapter's hook on the same FFN (adapter.py), so that y_l is the FFN's own output,
    # the one an update moves, and the adapter part of the path after it
    handles = [layer.mlp.register_forward_hook(perturb, prepend=True) for layer in model.model.layers]
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
    # The sum of squares in one thread: a parallel sum's order of additions, and so its last bits, would depend on
    # how many threads run (a study's arms side by side run one thread each; its rows must not depend on that).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        squares = sum(g.double().pow(2).sum() for g in grads)
    finally:
        torch.set_num_threads(threads)
    return loss.item(), torch.sqrt(squares).item()
