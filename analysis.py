"""
Analyses for Trans-PEFT's premise, with their command line:

    python analysis.py analyze --old qwen2-0.5b --new qwen2.5-0.5b   # what did the update change, attention or FFN?
    python analysis.py drop-cost --model qwen2-0.5b                  # what does dropping each layer's FFN cost?

analyze: per layer, how much an update changed attention and the FFN, by this project's measures (relative weight
change; 1 - cos and per-channel norm shift of each block's outputs, both models fed the old model's hidden states)
and by the official code's instrument (per-channel output norms of every projection, tracked as its
training_utils.py LinearOutputNormTracker does, each model on its own activations). Writes analysis.json and, where
matplotlib is installed, drift.png.

drop-cost: the next-token loss of a model with one layer's FFN sub-block skipped at a time (what p_cross does to
that layer), to choose per-layer rates.
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads ends in one line, not a traceback of the imports
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting"))

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bases import (check_checkpoint, check_same_architecture, check_tokenizer_fits, load_config, load_model,
                        load_tokenizer)
from data import collate, next_token_targets
from eval import check_writable

# -----------------------------------------------------------------------------------------------------------
# Drift: what does an update change, attention or FFN?

ATTN, FFN = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def _weight(module: nn.Module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight  # the base weight, also under a LoRA wrapper


@torch.no_grad()
def weight_drift(old: nn.Module, new: nn.Module) -> list[dict]:
    """Per layer, ‖W_new − W_old‖_F / ‖W_old‖_F over each block's projections together: {"attn_weight", "ffn_weight"}
    (q,k,v,o; gate,up,down). Weights only: no inputs."""
    rows = []
    for lo, ln in zip(old.model.layers, new.model.layers):
        row = {}
        for block, part, projs in (("attn", "self_attn", ATTN), ("ffn", "mlp", FFN)):
            mo, mn = getattr(lo, part), getattr(ln, part)
            diff = sum((_weight(getattr(mn, p)).float() - _weight(getattr(mo, p)).float()).pow(2).sum()
                       for p in projs)
            ref = sum(_weight(getattr(mo, p)).float().pow(2).sum() for p in projs)
            row[f"{block}_weight"] = (diff / ref).sqrt().item()
        rows.append(row)
    return rows


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
    check_same_architecture(old.config, new.config, getattr(old, "name_or_path", "the old model"),
                            getattr(new, "name_or_path", "the new model"))
    batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    rows = [{"layer": i, **w, "attn_cos": 0.0, "attn_norm": 0.0, "ffn_cos": 0.0, "ffn_norm": 0.0}
            for i, w in enumerate(weight_drift(old, new))]

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
    in float32 (it takes them in the activations' dtype), not averaged over processes, and only on the batches given
    (it also runs on training batches right-padded with id 2, whose padding positions enter its norms)."""
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



# -----------------------------------------------------------------------------------------------------------
# Tables, plot and the command line

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


def pyplot():
    """matplotlib.pyplot drawing to files (no window), or None where matplotlib is not installed: the project's charts
    are optional, and every number they show is also in a table."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_plot(rows: list[dict], path: str, title: str) -> bool:
    """A PNG of attention vs FFN drift by layer; False (nothing written) where matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
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
    if path is None:
        return DEFAULT_TEXT
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"--text {path} cannot be read ({e.strerror}).") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path} is not UTF-8 text (byte {e.start}: {e.reason}).") from None
    if not lines:
        raise ValueError(f"{path} has no text to feed the model.")
    return lines


def writable_directory(path: Path) -> Path:
    """Refuse, before any compute, an --out directory that cannot be written (a file, or a place the process cannot
    write); create it. (An --out file is eval.check_writable's.)"""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file: give a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {path} cannot be written ({e.strerror}): choose another place.") from None
    return path


def drop_cost_command(args) -> None:
    try:
        out = Path(args.out)
        check_writable(out)
        lines = read_lines(args.text)
        check_checkpoint(args.model)
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
    out.write_text(json.dumps({"model": args.model, **costs}, indent=2))
    print(f"wrote {out}")


def main(argv=None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is KeyboardInterrupt again
    parser = argparse.ArgumentParser(description="Analyses for Trans-PEFT: how an update changes attention vs FFN by "
                                     "layer (analyze), and what dropping each layer's FFN costs (drop-cost).")
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
        out = writable_directory(Path(args.out))
        lines = read_lines(args.text)
        check_checkpoint(args.old)
        tok = load_tokenizer(args.old)  # its ids go into both bases
        check_tokenizer_fits(tok, load_config(args.new), args.old, model=args.new)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        old, new = load_model(args.old, dtype, args.device), load_model(args.new, dtype, args.device)
        encoded = [tok.encode(line)[: args.max_tokens] for line in lines]
        rows = analyze_drift(old, new, [torch.tensor([ids], device=args.device) for ids in encoded])  # a batch per line
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

    print(f"drift from {args.old} to {args.new} ({len(lines)} inputs, {sum(map(len, encoded))} tokens)")
    print(format_table(rows))
    (out / "analysis.json").write_text(json.dumps({"old": args.old, "new": args.new, "layers": rows}, indent=2))
    plotted = save_plot(rows, str(out / "drift.png"), f"{args.old} → {args.new}")
    plot = f" and {out / 'drift.png'}" if plotted else " (install matplotlib for drift.png)"
    print(f"wrote {out / 'analysis.json'}{plot}")


if __name__ == "__main__":
    main()
