"""analysis.py: the drift analysis sees what an update changed (weights, outputs, the official tracker's norms),
its command line, the plot, and drop-cost against transformers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis import analyze_drift, drop_costs, save_plot, track_output_norms
from bases import load_model
from data import collate, next_token_targets
from test_tokenizer import write_checkpoint_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_analysis_sees_only_the_ffn_change(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2")
    sd = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    changed = {k: v + 0.05 * torch.randn(v.shape, generator=g) if ".mlp." in k else v for k, v in sd.items()}
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    (new_dir / "config.json").write_text((path / "config.json").read_text())
    save_file(changed, new_dir / "model.safetensors")
    rows = analyze_drift(load_model(path), load_model(new_dir), torch.randint(0, 96, (2, 32)))
    # the official tracker runs each model on its own activations: layer 0's attention sees equal inputs, later ones not
    assert rows[0]["attn_tracked"] <= 1e-6 and rows[1]["attn_tracked"] > 1e-3
    for r in rows:
        assert r["ffn_tracked"] > 1e-3
        assert r["attn_weight"] == 0 and r["attn_cos"] <= 1e-6 and r["attn_norm"] <= 1e-6
        assert r["ffn_weight"] > 0.1 and r["ffn_cos"] > 1e-3 and r["ffn_norm"] > 1e-3
        ffn = [sd[f"model.layers.{r['layer']}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")]
        diff = [changed[f"model.layers.{r['layer']}.mlp.{p}.weight"] - w for p, w in zip(("gate_proj", "up_proj", "down_proj"), ffn)]
        expected = math.sqrt(sum(d.pow(2).sum() for d in diff) / sum(w.pow(2).sum() for w in ffn))
        assert abs(r["ffn_weight"] - expected) <= 1e-5


def test_analyze_command(hf_checkpoint, tmp_path):
    old, _ = hf_checkpoint("qwen2", vocab_size=512)
    new, _ = hf_checkpoint("qwen2", vocab_size=512, seed=1)
    for path in (old, new):
        write_checkpoint_tokenizer(path, "qwen2")
    r = subprocess.run([sys.executable, "analysis.py", "analyze", "--old", str(old), "--new", str(new), "--out",
                        str(tmp_path / "a")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "attn ΔW/W" in r.stdout and " mean |" in r.stdout
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert len(result["layers"]) == 2 and all(row["attn_weight"] > 0 for row in result["layers"])
    bad = subprocess.run([sys.executable, "analysis.py", "analyze", "--old", "qwen9", "--new", str(new)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "Unknown model 'qwen9'" in bad.stderr


def test_drift_plot_where_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"layer": i, **{f"{b}_{m}": 0.1 * (i + 1) for b in ("attn", "ffn") for m in ("weight", "cos", "norm")}} for i in range(3)]
    assert save_plot(rows, str(tmp_path / "drift.png"), "old -> new")
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tracked_output_norms_follow_the_official_tracker(hf_checkpoint):
    """training_utils.py LinearOutputNormTracker, written here from its definition on transformers' own model: for
    every nn.Linear and batch, the per-output-channel L2 norm over the batch's tokens, in an EMA from zero
    (s <- 0.9 s + 0.1 n)."""

    path, hf = hf_checkpoint("qwen2")
    batches = [torch.randint(0, 96, (2, 12)), torch.randint(0, 96, (1, 20)), torch.randint(0, 96, (3, 7))]
    expected = {}

    def hook(name):
        def record(module, args, output):
            norms = torch.linalg.norm(output.view(-1, output.shape[-1]), dim=0)
            expected[name] = expected.get(name, torch.zeros_like(norms)) * 0.9 + norms * 0.1
        return record

    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name))
    with torch.no_grad():
        for ids in batches:
            hf(ids)
    ours = track_output_norms(load_model(path), batches)
    assert set(ours) == set(expected)  # every projection and lm_head
    for name, s in expected.items():
        assert torch.allclose(ours[name], s, rtol=1e-4, atol=1e-5), name


def test_drop_costs_equal_transformers_with_that_ffn_skipped(hf_checkpoint):
    """drop_costs: the mean next-token loss with layer i's FFN sub-block skipped equals transformers' loss on the same
    model with that layer's MLP output replaced by zeros (so the residual add leaves the stream unchanged), here on
    one right-padded batch of two sequences against transformers on each sequence alone."""

    path, hf = hf_checkpoint("llama3")
    sequences = [torch.randint(0, 96, (20,)).tolist(), torch.randint(0, 96, (9,)).tolist()]

    def hf_loss():  # transformers' mean over each sequence's tokens, weighted back to a mean over all tokens
        return sum(hf(torch.tensor([s]), labels=torch.tensor([s])).loss.item() * (len(s) - 1) for s in sequences) / 27

    with torch.no_grad():
        expected = [hf_loss()]
        for layer in hf.model.layers:
            h = layer.mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
            expected.append(hf_loss())
            h.remove()
    ids, labels = collate([{"input_ids": s, "labels": s} for s in sequences], pad_id=0)
    costs = drop_costs(load_model(path), ids, next_token_targets(labels))
    assert [costs["base"], *costs["dropped"]] == pytest.approx(expected, rel=1e-5)
    assert all(abs(d - costs["base"]) > 1e-3 for d in costs["dropped"])


def test_norm_shift_and_cosine_of_an_exactly_doubled_ffn(hf_checkpoint, tmp_path):
    """down_proj doubled: each FFN output is exactly twice the old one on the same input, so its per-channel norms
    double, ‖n_new − n_old‖ / ‖n_old‖ = 1, and the cosine is 1 (1 − cos = 0); attention is untouched."""
    path, _ = hf_checkpoint("qwen2")
    sd = load_file(path / "model.safetensors")
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    (new_dir / "config.json").write_text((path / "config.json").read_text())
    save_file({k: 2 * v if "down_proj" in k else v for k, v in sd.items()}, new_dir / "model.safetensors")
    for r in analyze_drift(load_model(path), load_model(new_dir), torch.randint(0, 96, (2, 32))):
        assert r["ffn_norm"] == pytest.approx(1.0, abs=1e-5) and r["ffn_cos"] == pytest.approx(0.0, abs=1e-6)
        assert r["attn_norm"] <= 1e-6 and r["attn_weight"] == 0
