"""
Bottleneck adapters (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, arXiv 1902.00751;
parallel placement: He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022).

A small two-layer network with a residual connection, inserted into every decoder layer:

    Adapter(h) = h + up(act(down(h)))        down: C -> b, up: b -> C, b << C (bottleneck), biases on

`up` (weight and bias) and `down`'s bias start at zero, so every adapter is the identity and the model is unchanged at
step 0; `down`'s weight starts N(0, 0.02). The official adapter is built through transformers' from_pretrained,
whose _init_weights draws both matrices N(0, 0.02) and zeroes both biases: the same but for `up`, so it is not the
identity at step 0 (docs/differences.md).
Two adapters per layer, on the attention and the FFN sub-block:

    series (default; the official placement):   x = x + Adapter(Attn(norm(x)))     then the same for the FFN
    parallel:                                    x = x + Attn(u) + up(act(down(u))),  u = norm(x)

They are attached with forward hooks on `self_attn` and `mlp`, so no module of the base model is renamed (LoRA
keys and checkpoint keys stay Hugging Face's) and the adapter's parameters live at `model.layers.N.attn_adapter.*`
and `model.layers.N.ffn_adapter.*`. Because the FFN adapter hangs on the `mlp` module, a sub-block that is not run
(Trans-PEFT's cross-layer dropping skips the whole FFN sub-block) also skips its adapter.

Saved as `bottleneck_adapter.safetensors` + `bottleneck_adapter.json` (peft has no such adapter type for these
models, so this project's own small format, not peft's `adapter_config.json`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bases import (check_made_for, full_tensor, is_main_process, load_selected, print_trainable, read_json,
                        read_safetensors)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
PLACEMENTS = ("series", "parallel")
CONFIG_NAME, WEIGHTS_NAME = "bottleneck_adapter.json", "bottleneck_adapter.safetensors"


class Adapter(nn.Module):
    """h + up(act(down(h))); `branch` is the part without the residual, used by the parallel placement."""

    def __init__(self, hidden: int, bottleneck: int, act: str = "relu", device=None):
        super().__init__()
        self.act = act
        # float32 parameters whatever the base's dtype, as for LoRA: optimizer updates are too small for bf16.
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=torch.float32)
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=torch.float32)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        out = self.up(ACTIVATIONS[self.act](self.down(h.to(self.down.weight.dtype))))
        return out.to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


def is_adapter_parameter(name: str) -> bool:
    """The one predicate for adapters: these parameters train, go to the optimizer and are saved; nothing else."""
    return ".attn_adapter." in name or ".ffn_adapter." in name


def _series_hook(adapter: Adapter):
    return lambda module, args, output: adapter(output)  # sub-block output -> Adapter, before the residual add


def _parallel_hook(adapter: Adapter):
    return lambda module, args, output: output + adapter.branch(args[0])  # args[0]: the sub-block's (normed) input


def add_adapter(model: nn.Module, bottleneck: int = 8, act: str = "relu", placement: str = "series",
                verbose: bool = True) -> nn.Module:
    """Insert an attention and an FFN adapter in every decoder layer and freeze everything else (in place)."""
    if not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(f"Adapter bottleneck must be a positive integer, got {bottleneck!r}.")
    if act not in ACTIVATIONS:
        raise ValueError(f"Unknown adapter activation {act!r}: choose from {', '.join(ACTIVATIONS)}.")
    if placement not in PLACEMENTS:
        raise ValueError(f"Unknown adapter placement {placement!r}: choose from {', '.join(PLACEMENTS)}.")
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError("This model already has bottleneck adapters: add or load them on a freshly loaded model.")
    C = model.config.hidden_size
    device = model.lm_head.weight.device
    hook = _series_hook if placement == "series" else _parallel_hook
    model.adapter_hooks = []
    for layer in model.model.layers:
        layer.attn_adapter = Adapter(C, bottleneck, act, device)
        layer.ffn_adapter = Adapter(C, bottleneck, act, device)
        model.adapter_hooks.append(layer.self_attn.register_forward_hook(hook(layer.attn_adapter)))
        model.adapter_hooks.append(layer.mlp.register_forward_hook(hook(layer.ffn_adapter)))
    model.adapter_config = {"bottleneck": bottleneck, "act": act, "placement": placement, "hidden_size": C,
                            "num_hidden_layers": len(model.model.layers)}
    for name, p in model.named_parameters():
        p.requires_grad = is_adapter_parameter(name)
    if verbose:
        print_trainable(model)
    return model


def remove_adapter(model: nn.Module) -> nn.Module:
    """Detach the adapters: the hooks are removed and the adapter modules deleted, leaving the base model."""
    for h in getattr(model, "adapter_hooks", []):
        h.remove()
    for layer in model.model.layers:
        for name in ("attn_adapter", "ffn_adapter"):
            if hasattr(layer, name):
                delattr(layer, name)
    model.adapter_hooks, model.adapter_config = [], None
    return model


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    from safetensors.torch import save_file

    if getattr(model, "adapter_config", None) is None:
        raise ValueError("This model has no bottleneck adapters to save: call add_adapter or load_adapter first.")
    # Under FSDP every process takes part in gathering the sharded parameters; process 0 alone writes.
    tensors = {n: full_tensor(p.detach()).float().contiguous() for n,
               p in model.named_parameters() if is_adapter_parameter(n)}
    if not is_main_process():
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    config = {"adapter_type": "bottleneck", **model.adapter_config, "model_type": model.config.model_type,
              "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None)}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))


CONFIG_KEYS = ("bottleneck", "act", "placement", "hidden_size", "num_hidden_layers")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, allow_other_architecture: bool = False) -> nn.Module:
    """Add the adapters a directory written by save_adapter describes, and load their weights. Adapters trained on
    another model_type than model's are refused unless allow_other_architecture."""
    path = Path(adapter_dir)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: pass a directory written by save_adapter.")
    cfg = read_json(path / CONFIG_NAME)
    missing = [k for k in CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{path / CONFIG_NAME} lacks {', '.join(missing)}: it is not a bottleneck adapter's config.")
    if cfg["hidden_size"] != model.config.hidden_size or cfg["num_hidden_layers"] != model.config.num_hidden_layers:
        raise ValueError(f"{path} was trained on a base with hidden size {cfg['hidden_size']} and "
                         f"{cfg['num_hidden_layers']} layers; "
                         f"this model has {model.config.hidden_size} and {model.config.num_hidden_layers}.")
    check_made_for(model, cfg.get("model_type"), str(path), allow_other_architecture)
    add_adapter(model, cfg["bottleneck"], cfg["act"], cfg["placement"], verbose=False)
    load_selected(model, read_safetensors(path / WEIGHTS_NAME), is_adapter_parameter, str(path / WEIGHTS_NAME),
                  hint="the adapter was made for a base of another size")
    return model
