"""
LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv 2106.09685), written to be
read, and saved in the PEFT format so that an adapter trained here loads in peft, transformers and vLLM, and one
trained there loads here.

A frozen linear map W0 (out x in) gets a trainable low-rank update:

    h = W0 x + b + (alpha / r) * B A dropout(x)        A: (r x in), B: (out x r), r << min(in, out)

              x ──────────────► W0 (frozen) ─────────┐
              │                                      + ──► h
              └─► dropout ─► A ─► B ─► * alpha/r ────┘

A starts Kaiming-uniform (a = sqrt(5), nn.Linear's own init) and B at zero, so BA = 0 and the model is unchanged
at step 0; only A and B train. After training, BA can be folded into W0 (merge_lora) for inference at no extra cost.

PEFT format (peft's save_pretrained): `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules, ...)
and `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` ([r, in]) and
`.lora_B.weight` ([out, r]). Our module paths are Hugging Face's, so the keys are ours after that fixed prefix.

InternLM2: model.py splits the packed `wqkv` into q_proj / k_proj / v_proj, so LoRA here sits on the split
projections and is saved under Llama names (what InternLM's convert2llama.py produces, which peft and vLLM load on
the converted model). A peft adapter trained on InternLM2's native names (`attention.wqkv`, `attention.wo`,
`feed_forward.w1/w2/w3`) loads exactly: a LoRA on wqkv is three LoRAs that share A, with B's rows split like wqkv's.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from bases import (ALIASES, check_made_for, convert_internlm2, full_tensor, is_main_process, load_selected,
                        print_trainable, read_json, read_safetensors, read_torch_file)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # what peft puts before a module path in saved keys
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """y = base(x) + delta(x), delta(x) = (alpha / r) * B(A(dropout(x))), with `base` frozen. Submodule names follow
    peft (`base_layer`, `lora_A`, `lora_B`), so state-dict keys are peft's without the adapter name.

    A variant (DoRALinear below) is a subclass: every parameter it owns beside base_layer trains, is saved and loaded
    (lora_parameters); it overrides delta (what forward adds), merged_weight / unmerged_weight (what merging writes)
    and ADAPTER_CONFIG (the adapter_config.json fields that name it, by which load_lora picks it)."""

    ADAPTER_CONFIG = {"use_dora": False}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # float32 whatever the base's dtype: the optimizer's updates of A and B are too small for bf16.
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.base_layer.out_features)
        x = x.reshape(-1, x.shape[-1])  # (N, in)
        y = self.base_layer(x)  # (N, out)
        if self.merged:  # BA already lives in base_layer.weight
            if self.training and self.lora_A.weight.requires_grad:
                raise RuntimeError("This LoRA is merged into its base weight; call unmerge_lora(model) before training "
                                   "it.")
            return y.view(shape)
        return self.delta(x, out=y).view(shape)

    def delta(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The update this LoRA adds to the frozen layer's output, (alpha / r) B A dropout(x), for x (N, in): the one
        place it is computed, so a variant (DoRA, a gated LoRA) overrides this method. With `out` (the base layer's
        output, (N, out)) the update is added into it and the sum returned."""
        # Under autocast both branches run in the autocast dtype; without it, x is cast to A's float32 and back.
        # The scaling multiplies the r-wide branch, not the (N, out) output: cheap, and never an alpha= argument,
        # which torch.compile's matmul fusions have dropped silently (pytorch/pytorch#167313; here add(y, a @ B^T,
        # alpha=s) compiled to y + a @ B^T on torch 2.13). For a power-of-two scaling (alpha = 2r) it is exact.
        a = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))) * self.scaling  # (N, r)
        if out is None:
            return a @ self.lora_B.weight.t().to(a.dtype)
        # out += a B^T as one in-place addmm: the sum rides on the GEMM instead of costing passes over the (N, out)
        # output, forward and backward (benchmarks/NOTES.md). In place is safe: out is no view, and the base layer's
        # backward does not need its output.
        if out.dtype == a.dtype:  # float32, or both in the autocast dtype
            return out.addmm_(a, self.lora_B.weight.t().to(a.dtype))
        # dtypes that differ without autocast (a bf16 base and float32 LoRA, or the reverse): the sum in float32, as
        # peft does, then back to the base's dtype
        return torch.addmm(out.float(), a.float(), self.lora_B.weight.t().float()).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A in float32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The weight merging puts in W0's place (float32): W0 + (alpha / r) B A."""
        return self.base_layer.weight.float() + self.delta_weight()

    def unmerged_weight(self) -> torch.Tensor:
        """merged_weight's inverse, from the merged weight in base_layer (float32)."""
        return self.base_layer.weight.float() - self.delta_weight()


class DoRALinear(LoRALinear):
    """DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv 2402.09353) as peft defines
    it (use_dora): the adapted weight's direction from LoRA, its per-row length learned on its own,

        W = m ⊙ (W0 + s B A) / n,    n = ||W0 + s B A|| per output row (a constant in the backward pass),  s = alpha/r

    with m (`lora_magnitude_vector`, shape (out,)) starting at n, so that the layer starts as the base layer. What
    forward adds to the base output W0 x + b, for x' = dropout(x):

        delta(x) = (m / n - 1) ⊙ W0 x' + (m / n) ⊙ s B A x'     (without dropout, W0 x is the base output less b)"""

    ADAPTER_CONFIG = {"use_dora": True}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout)
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (out,) float32

    def weight_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """n = ||W0 + s B A|| per output row, float32, without gradient (weight: W0 + s B A if given)."""
        with torch.no_grad():
            weight = self.base_layer.weight.float() + self.delta_weight() if weight is None else weight
            return torch.linalg.norm(weight, dim=1)

    def delta(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        xd = self.dropout(x.to(self.lora_A.weight.dtype))  # (N, in)
        scale = self.lora_magnitude_vector / self.weight_norm()  # (out,) m / n
        lora = self.lora_A(xd) @ self.lora_B.weight.t().to(xd.dtype) * self.scaling  # (N, out)
        w0, bias = self.base_layer.weight, self.base_layer.bias
        if out is not None and not (self.training and isinstance(self.dropout, nn.Dropout)):
            base = out if bias is None else out - bias  # W0 x, from the base layer's output
        else:  # dropout draws a new x': W0 x' anew
            base = xd.to(w0.dtype) @ w0.t()
        d = (scale - 1) * base.float() + scale * lora.float()  # (N, out) float32
        return d if out is None else (out.float() + d).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """m ⊙ (W0 + s B A) / n; n is kept, for unmerged_weight."""
        weight = self.base_layer.weight.float() + self.delta_weight()
        self.merged_norm = self.weight_norm(weight)
        return (self.lora_magnitude_vector.detach() / self.merged_norm)[:, None] * weight

    def unmerged_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight.float() / (self.lora_magnitude_vector.detach() / self.merged_norm)[:, None]
        return weight - self.delta_weight()


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter a LoRA layer (of any variant) owns beside its frozen base layer, by name: these train, go to
    the optimizer, and are saved and loaded; nothing else."""
    return {f"{name}.{n}": p for name, m in lora_layers(model).items() for n, p in m.named_parameters()
            if not n.startswith("base_layer.")}


def variants() -> list[type[LoRALinear]]:
    """LoRALinear and every subclass of it defined anywhere (a fork's, in its own file, too), most derived last."""
    found, todo = [], [LoRALinear]
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo += cls.__subclasses__()
    return found


MAX_ALPHA = 10_000  # alpha / r scales B A x: beyond this the first steps overflow rather than learn


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             targets=("q_proj", "k_proj", "v_proj", "o_proj"), verbose: bool = True,
             variant: type[LoRALinear] = LoRALinear) -> nn.Module:
    """Wrap the target Linears of a loaded model in LoRALinear (or a variant: DoRALinear, a fork's subclass) and freeze
    everything else (in place; returns model).

    targets: names among PROJECTIONS or longer module-path suffixes ("layers.3.self_attn.q_proj"), or a regex
    string matching whole module names, as in peft's target_modules.
    """
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not (isinstance(r, int) and not isinstance(r, bool)) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}.")
    if not (number(alpha) and 0 < alpha <= MAX_ALPHA):
        raise ValueError(f"LoRA alpha must be in (0, {MAX_ALPHA}], got {alpha!r}.")
    if not (number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("This model already has LoRA layers: add or load LoRA on a freshly loaded model.")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in PROJECTIONS]
    if isinstance(targets, str) and targets not in PROJECTIONS:  # a regex over whole module names, as in peft
        chosen = [(n, m) for n, m in linears if re.fullmatch(targets, n)]
        if not chosen:
            raise ValueError(f"LoRA target pattern {targets!r} matches no projection of this model (e.g. "
                             f"{linears[0][0]}).")
    else:  # names: a module matches an entry it equals or ends with ("." + entry), as in peft
        targets = [targets] if isinstance(targets, str) else list(targets)
        if not targets:
            raise ValueError(f"No LoRA targets given: choose from {', '.join(PROJECTIONS)}.")
        chosen = []
        for t in targets:
            if t.split(".")[-1] not in PROJECTIONS:
                raise ValueError(f"Unknown LoRA target {t!r}: choose from {', '.join(PROJECTIONS)} (or a module path "
                                 "ending in one).")
            found = [(n, m) for n, m in linears if n == t or n.endswith("." + t)]
            if not found:
                raise ValueError(f"LoRA target {t!r} matches no projection of this model (e.g. {linears[0][0]}).")
            chosen += [nm for nm in found if nm not in chosen]

    name, smallest = min(chosen, key=lambda nm: min(nm[1].in_features, nm[1].out_features))
    if r > min(smallest.in_features, smallest.out_features):  # B A has rank at most that: the rest is memory
        raise ValueError(f"LoRA rank r={r} is more than the smaller side of {name} ({smallest.out_features} x "
                         f"{smallest.in_features}): choose r <= {min(smallest.in_features, smallest.out_features)}.")
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, variant(linear, r, alpha, dropout))
    trainable = lora_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad = name in trainable
    if verbose:
        print_trainable(model)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _target_modules(model: nn.Module, layers: dict[str, LoRALinear]) -> list[str]:
    # Short names ("q_proj") where every projection of that kind is wrapped; else the exact module paths.
    all_proj = [n for n, m in model.named_modules()
                if n.split(".")[-1] in PROJECTIONS and isinstance(m, (nn.Linear, LoRALinear))]
    out = []
    for kind in sorted({n.split(".")[-1] for n in layers}):
        wrapped = [n for n in layers if n.endswith("." + kind)]
        out += [kind] if len(wrapped) == sum(n.endswith("." + kind) for n in all_proj) else wrapped
    return out


def save_lora(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the PEFT format: adapter_config.json + adapter_model.safetensors (LoRA weights only, float32)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("This model has no LoRA layers to save: call add_lora or load_lora first.")
    first = next(iter(layers.values()))
    if any((m.r, m.alpha, type(m)) != (first.r, first.alpha, type(first)) for m in layers.values()):
        raise ValueError("save_lora writes one r, lora_alpha and variant for all layers; this model mixes several.")
    if "ADAPTER_CONFIG" not in vars(type(first)):  # it would load as its parent, silently another function
        raise ValueError(f"{type(first).__name__} defines no ADAPTER_CONFIG of its own: give it the adapter_config.json "
                         "fields that name it, so that load_lora can tell it from the class it extends.")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "revision": None, "inference_mode": True,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": _target_modules(model, layers),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, **type(first).ADAPTER_CONFIG,
    }
    # Under FSDP every process takes part in gathering the sharded parameters; process 0 alone writes.
    tensors = {PEFT_PREFIX + n: full_tensor(p.detach()).float().contiguous() for n, p in lora_parameters(model).items()}
    if not is_main_process():
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The architecture goes into the weights file's metadata (peft reads past it; an unknown config key makes it warn).
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt", "model_type": model.config.model_type})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))


# peft options that change the math; a LoRA using them would load here as a silently different function.
UNSUPPORTED = {"use_rslora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}


def variant_for(config: dict, where: str) -> type[LoRALinear]:
    """The LoRA variant an adapter_config names: of the classes that define an ADAPTER_CONFIG of their own, the most
    derived one whose fields all match it (a field the file lacks counts as the plain LoRA's value)."""
    plain = LoRALinear.ADAPTER_CONFIG
    matching = [v for v in variants() if "ADAPTER_CONFIG" in vars(v)
                and all(config.get(k, plain.get(k)) == value for k, value in v.ADAPTER_CONFIG.items())]
    if not matching:
        fields = {k: config[k] for v in variants() for k in v.ADAPTER_CONFIG if k in config}
        raise ValueError(f"{where} asks for a LoRA variant ({fields}) that transpeft does not implement.")
    return matching[-1]
INTERNLM2_NAMES = {"wqkv": ["q_proj", "k_proj", "v_proj"], "wo": ["o_proj"], "w1": ["gate_proj"], "w3": ["up_proj"],
                   "w2": ["down_proj"]}


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike, allow_other_architecture: bool = False) -> nn.Module:
    """Add the LoRA layers an adapter's config names (PEFT format, from here or from peft) and load its weights.
    An adapter trained on another model_type than model's is refused unless allow_other_architecture."""
    path = Path(adapter_dir)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: pass the directory of a PEFT LoRA adapter.")
    cfg = read_json(path / CONFIG_NAME)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{path / CONFIG_NAME} describes a {found} adapter, not a LoRA (peft_type LORA).")
    if not isinstance(cfg.get("r", 8), int) or not cfg.get("target_modules"):
        raise ValueError(f"{path / CONFIG_NAME} needs an integer r and target_modules: it is not a complete LoRA "
                         "config.")
    for key, plain in UNSUPPORTED.items():
        if cfg.get(key, plain) not in (plain, None, {}, False):
            raise ValueError(f"{path} uses peft's {key}={cfg[key]!r}, which transpeft's LoRA does not implement.")
    metadata = {}
    if (path / WEIGHTS_NAME).exists():
        sd, metadata = read_safetensors(path / WEIGHTS_NAME, with_metadata=True)
    elif (path / "adapter_model.bin").exists():
        sd = read_torch_file(path / "adapter_model.bin")
    else:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (or adapter_model.bin).")
    made_for = metadata.get("model_type") or _model_type_of(cfg.get("base_model_name_or_path"))
    if made_for is None and is_main_process():
        print(f"note: the architecture {path} was trained on could not be checked (its base "
              f"{cfg.get('base_model_name_or_path')!r} has no config.json here or in the hub cache)")
    check_made_for(model, made_for, str(path), allow_other_architecture)
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}

    targets = cfg["target_modules"]
    internlm2_names = (".attention.wqkv.", ".feed_forward.", ".attention.wo.")
    if model.config.model_type == "internlm2" and any(n in k for k in sd for n in internlm2_names):
        sd, targets = _from_internlm2_names(sd, model.config, targets)
    try:
        add_lora(model, r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
                 targets=targets, verbose=False, variant=variant_for(cfg, str(path / CONFIG_NAME)))
    except ValueError as e:
        raise ValueError(f"{path / CONFIG_NAME}: {e}") from None
    load_selected(model, sd, lora_parameters(model).__contains__, str(path / WEIGHTS_NAME),
                  hint="the adapter was made for a base of another architecture or size")
    return model


def _model_type_of(base: str | None) -> str | None:
    """The model_type of the base an adapter names (peft's base_model_name_or_path): a local checkpoint directory, or
    a hub id (or alias) whose config.json is in the local hub cache; None where it cannot be read."""
    if not base:
        return None
    config = Path(base) / "config.json"
    if not config.is_file():
        from huggingface_hub import try_to_load_from_cache

        repo = ALIASES.get(base.lower(), base)
        try:
            cached = (try_to_load_from_cache(repo, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
                      if repo.count("/") == 1 else None)
        except Exception:  # a malformed id: nothing to read
            cached = None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return read_json(config).get("model_type")
    except (ValueError, AttributeError):
        return None


def _from_internlm2_names(sd: dict, model_config, targets):
    """Rewrite a LoRA on InternLM2's native modules for the split q/k/v model: W_qkv + B A has the rows of
    [q; k; v] (packed per kv head), so the q/k/v LoRAs share A and take B's rows split as wqkv's are."""
    out = {}
    for key, t in sd.items():
        if ".attention.wqkv.lora_A." in key:
            for proj in INTERNLM2_NAMES["wqkv"]:
                out[key.replace("attention.wqkv", f"self_attn.{proj}")] = t
        elif ".attention.wqkv.lora_B." in key:  # reuse the weight splitter: B's rows are packed like wqkv.weight's
            split = convert_internlm2({key.replace(".lora_B.weight", ".weight"): t}, model_config)
            out.update({k.replace(".weight", ".lora_B.weight"): v for k, v in split.items()})
        else:
            out.update(convert_internlm2({key: t}, model_config))
    if not isinstance(targets, str):
        targets = [new for t in targets for new in INTERNLM2_NAMES.get(t.split(".")[-1], [t])]
    return out, targets


@torch.no_grad()
def merge_lora(model: nn.Module, in_base_dtype: bool = False) -> nn.Module:
    """Fold every LoRA into its base weight: W0 <- merged_weight() (W0 + (alpha/r) B A for LoRA; a variant's own),
    computed in float32, then cast to W0's dtype.

    in_base_dtype: the released evaluation's arithmetic instead, for plain LoRA (its bundled peft 0.9.0, whose LoRA
    layers take the base weight's dtype): A and B cast to W0's dtype, B A formed and scaled in it, added to W0 in it.
    For a bf16 base that rounds B A, its scaled copy and the sum, each to bf16. (A variant merges in float32.)

    Explicit and idempotent: a merged layer is skipped, and forward stops adding BA. Nothing merges as a side effect
    of train() or eval(). In bf16, W0 + BA is rounded: unmerge_lora subtracts BA again, which restores W0 exactly
    only for float32 bases; for a bf16 base, reload the base rather than unmerge if exact weights matter.
    """
    for m in lora_layers(model).values():
        if not m.merged:
            w = m.base_layer.weight
            if in_base_dtype and type(m) is LoRALinear:
                w.add_((m.lora_B.weight.to(w.dtype) @ m.lora_A.weight.to(w.dtype)) * m.scaling)
            else:
                w.copy_(m.merged_weight().to(w.dtype))
            m.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """The inverse of merge_lora: W0 <- W0 - (alpha/r) B A for every merged layer (float32 arithmetic)."""
    for m in lora_layers(model).values():
        if m.merged:
            w = m.base_layer.weight
            w.copy_(m.unmerged_weight().to(w.dtype))
            m.merged = False
    return model
