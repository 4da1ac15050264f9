"""model.py against transformers: logits of tiny random checkpoints of every family, RoPE variants, InternLM2's packed
wqkv, the KV cache and left padding, hub-cache resolution, and the error messages for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import build_hf_model, write_internlm2_checkpoint
from bases import load_model
from model import ModelConfig, linear_cross_entropy, rope_inv_freq

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
FP32_TOL = 1e-4


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw)


# 100 tokens: past Llama 3.1's original context (64 here) and the dynamic-NTK window (32 here).
@pytest.mark.parametrize("family", ["qwen2", "qwen2-tied", "llama3", "llama3.1", "llama3.2", "llama-dynamic", "llama-bias"])
def test_logits_match_transformers(hf_checkpoint, family):
    path, hf = hf_checkpoint(family)
    ours = load_model(path)
    ids = torch.randint(0, 96, (2, 100), generator=torch.Generator().manual_seed(1))
    assert max_diff(our_logits(ours, ids), hf_logits(hf, ids)) <= FP32_TOL
    if hf.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_training_loss_matches_hf(hf_checkpoint):
    """model(ids, targets=...) is the cross-entropy summed over the positions with a target, with HF's gradients."""
    path, hf = hf_checkpoint("qwen2")
    ours = load_model(path)
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt without loss
    labels[2, 15:] = -100  # and padding
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)  # position t predicts t + 1
    n = int((targets != -100).sum())
    hf_loss = hf(input_ids=ids, labels=labels).loss  # HF's mean over the same positions, from full logits
    hf_loss.backward()
    loss = ours(ids, targets=targets)
    (loss / n).backward()
    assert abs(loss.item() / n - hf_loss.item()) <= 1e-5
    ours_params = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        if name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
            assert max_diff(ours_params[name].grad, p.grad) <= 1e-5, name


@pytest.mark.parametrize("chunking", [dict(chunk_rows=3), dict(max_chunk_elements=3 * 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_cross_entropy(dtype, chunking):
    """linear_cross_entropy in chunks (here of 3 rows, set by rows or by logits) = F.cross_entropy of the full
    logits, loss and gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g).to(dtype).requires_grad_()
    w = torch.randn(40, 8, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 40, (10,), generator=g)
    ref = F.cross_entropy((h @ w.t()).float(), t, reduction="sum")
    (ref * 0.5).backward()
    ref_grads = h.grad, w.grad
    h.grad = w.grad = None
    loss = linear_cross_entropy(h, w, t, **chunking)
    (loss * 0.5).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert max_diff(h.grad, ref_grads[0]) <= tol and max_diff(w.grad, ref_grads[1]) <= tol
    assert h.grad.dtype == w.grad.dtype == dtype
    with torch.no_grad():  # no gradients asked for: the loss alone
        assert abs(linear_cross_entropy(h, w, t).item() - ref.item()) <= tol * abs(ref.item())


def test_sharded_checkpoint(hf_checkpoint):
    path, hf = hf_checkpoint("qwen2", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 96, (1, 30))
    assert max_diff(our_logits(load_model(path), ids), hf_logits(hf, ids)) <= FP32_TOL


def test_bfloat16_checkpoint(hf_checkpoint):
    path, _ = hf_checkpoint("llama3.1", dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (2, 40))
    # Kept in bf16 (the checkpoint's dtype): both implementations round at every op, in slightly different
    # places (e.g. fused SDPA kernels), so agreement is to bf16 precision. Logits here are O(1); bf16 has
    # 8 bits of mantissa (relative step 2^-8 = 0.004); 0.05 allows a few such steps through 2 layers.
    ours = load_model(path)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref32 = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ids)
    assert max_diff(our_logits(ours, ids), hf_logits(hf, ids)) <= 0.05
    # And ours in bf16 is no further from the fp32 truth than transformers in bf16 is (within 50%).
    assert max_diff(our_logits(ours, ids), ref32) <= 1.5 * max_diff(hf_logits(hf, ids), ref32) + 1e-3
    # Upcast at load time, the same bf16 weights give the fp32 logits exactly.
    assert max_diff(our_logits(load_model(path, dtype=torch.float32), ids), ref32) <= FP32_TOL


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_hub_v4_config_spelling(hf_checkpoint, type_key):
    """The hub's config.json files predate transformers 5: top-level rope_theta, rope_scaling, torch_dtype."""
    path, hf = hf_checkpoint("llama3.1")
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope[type_key] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    (path / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(0, 96, (1, 100))
    assert max_diff(our_logits(load_model(path), ids), hf_logits(hf, ids)) <= FP32_TOL


# Published config.json values (REFERENCE.md 1.2), in the hub's spelling.
HUB_CONFIGS = {
    "Qwen2-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, max_position_embeddings=131072,
                     vocab_size=152064, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16", use_sliding_window=False),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=131072, vocab_size=128256,
                         rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu", torch_dtype="bfloat16"),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=131072,
                         vocab_size=128256, rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         tie_word_embeddings=True, hidden_act="silu", torch_dtype="bfloat16"),
    "internlm2_5-7b": dict(model_type="internlm2", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0},
                           max_position_embeddings=32768, vocab_size=92544, bias=False, tie_word_embeddings=False,
                           hidden_act="silu", torch_dtype="bfloat16"),
}


def test_config_from_hub_files():
    q = ModelConfig.from_hf(HUB_CONFIGS["Qwen2-7B"])
    assert (q.head_dim, q.qkv_bias, q.o_bias, q.rope_scaling, q.num_key_value_heads) == (128, True, False, None, 4)
    l31 = ModelConfig.from_hf(HUB_CONFIGS["Llama-3.1-8B"])
    assert (l31.head_dim, l31.qkv_bias, l31.rope_theta, l31.rope_scaling["rope_type"]) == (128, False, 5e5, "llama3")
    assert ModelConfig.from_hf(HUB_CONFIGS["Llama-3.2-1B"]).tie_word_embeddings
    i = ModelConfig.from_hf(HUB_CONFIGS["internlm2_5-7b"])
    assert (i.model_type, i.head_dim, i.qkv_bias, i.rope_scaling) == ("internlm2", 128, False, {"rope_type": "dynamic", "factor": 2.0})


@pytest.mark.parametrize("name", ["Llama-3.1-8B", "Llama-3.2-1B", "internlm2_5-7b"])
def test_rope_frequencies_match_transformers_on_real_configs(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hub = dict(HUB_CONFIGS[name])
    ours_cfg = ModelConfig.from_hf(hub)
    if hub["model_type"] == "internlm2":  # transformers has no InternLM2; its Llama reads the same RoPE fields
        hub.update(model_type="llama", attention_bias=hub.pop("bias"))
    hf_cfg = transformers.AutoConfig.for_model(**hub)
    kind = hf_cfg.rope_parameters["rope_type"]
    for seq_len in (None, 40000, 200000):
        hf_inv, scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", seq_len=seq_len)
        assert scale == 1.0
        assert torch.allclose(rope_inv_freq(ours_cfg, seq_len or 0), hf_inv, rtol=1e-6, atol=0)
    if name == "Llama-3.1-8B":  # REFERENCE.md: 29 frequencies kept, 29 divided by 8, 6 smoothed
        plain = 1.0 / (5e5 ** (torch.arange(0, 128, 2).float() / 128))
        ratio = rope_inv_freq(ours_cfg) / plain
        kept, divided = (ratio == 1).sum().item(), torch.isclose(ratio, torch.tensor(1 / 8)).sum().item()
        assert (kept, divided, 64 - kept - divided) == (29, 29, 6)


@pytest.mark.parametrize("bias,fmt", [(False, "safetensors"), (True, "bin")])
def test_internlm2_checkpoint_matches_llama(tmp_path, bias, fmt):
    hf = build_hf_model("llama-dynamic", attention_bias=bias)
    write_internlm2_checkpoint(tmp_path, hf, fmt)
    ids = torch.randint(0, 96, (2, 48))  # past the 32-token window, so dynamic NTK is active
    assert max_diff(our_logits(load_model(tmp_path), ids), hf_logits(hf, ids)) <= FP32_TOL


@pytest.mark.parametrize("family,static", [("qwen2", False), ("llama3.2", False), ("qwen2", True)])
def test_kv_cache_decoding_equals_full_forward(hf_checkpoint, family, static):
    path, _ = hf_checkpoint(family)
    model = load_model(path)
    ids = torch.randint(0, 96, (2, 24))
    full = our_logits(model, ids)
    cache = model.new_cache(batch_size=2, max_len=32, static=static)
    steps = [our_logits(model, ids[:, :7], cache=cache), our_logits(model, ids[:, 7:12], cache=cache)]  # prefill, then a chunk
    steps += [our_logits(model, ids[:, t : t + 1], cache=cache) for t in range(12, 24)]  # one token at a time
    assert (cache.slot.item() if static else cache.length) == 24
    assert max_diff(torch.cat(steps, 1), full) <= 1e-5


@pytest.mark.parametrize("static, kv_heads", [(False, 2), (True, 2), (False, 4)])  # 4 of 4: no grouped queries
def test_left_padded_batch_equals_rows_alone(hf_checkpoint, static, kv_heads):
    path, _ = hf_checkpoint("qwen2", num_key_value_heads=kv_heads)
    model = load_model(path)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 96, (n,), generator=g) for n in (12, 5, 9)]
    nxt = torch.randint(1, 96, (3, 4), generator=g)  # four more tokens per row, decoded one at a time
    T = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(T - len(r)), torch.ones(len(r))]) for r in rows]).long()

    batched = our_logits(model, ids, attention_mask=mask)
    cache = model.new_cache(3, T + 4, static=static)
    all_slots = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)  # a static cache's mask covers every slot
    our_logits(model, ids, attention_mask=all_slots if static else mask, cache=cache)
    steps = []
    for t in range(4):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        steps.append(our_logits(model, nxt[:, t : t + 1], attention_mask=all_slots if static else mask, cache=cache))
    for b, r in enumerate(rows):
        alone = our_logits(model, torch.cat([r, nxt[b]])[None])
        assert max_diff(batched[b, T - len(r) :], alone[0, : len(r)]) <= 1e-5
        assert max_diff(torch.cat(steps, 1)[b], alone[0, len(r) :]) <= 1e-5
    assert not torch.isnan(batched).any()  # padding queries see at least themselves


# ---- bad input: one clear sentence -------------------------------------------------------------------------


def test_unknown_alias_lists_known_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'qwen3'.*qwen2\.5"):
        load_model("qwen3")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)


def test_unsupported_model_type(hf_checkpoint):
    path, _ = hf_checkpoint("llama3")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="Unsupported model_type 'mistral'"):
        load_model(path)


def test_misshaped_missing_and_extra_tensors(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    original = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"

    save_file({**original, name: torch.zeros(16, 64)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name} .*shape \(16, 64\), but the model expects \(32, 64\)"):
        load_model(path)
    save_file({k: v for k, v in original.items() if k != name}, path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"missing tensor {name} \(shape \(32, 64\)\)"):
        load_model(path)
    save_file({**original, "model.layers.1.self_attn.o_proj.bias": torch.zeros(64)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj.bias"):
        load_model(path)


def run_python(code, env_extra, cwd=ROOT):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_and_alias_resolve_through_hub_cache(hf_checkpoint, tmp_path):
    """With HF_HUB_OFFLINE=1, the real huggingface_hub finds a snapshot laid out as the hub's cache."""
    path, hf = hf_checkpoint("qwen2-tied")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Qwen--Qwen2-0.5B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots").mkdir()
    path.rename(repo / "snapshots" / revision)
    ids = torch.randint(0, 96, (1, 20))
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch; from bases import load_model\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = [load_model(n)(ids) for n in ('Qwen/Qwen2-0.5B', 'qwen2-0.5b')]\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    r = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 0, r.stderr
    for logits in torch.load(tmp_path / "out.pt"):
        assert max_diff(logits, hf_logits(hf, ids)) <= FP32_TOL


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline", "unreachable"])
def test_hub_unreachable_is_one_clear_sentence(tmp_path, env):
    r = run_python("from bases import load_model; load_model('Qwen/Qwen2-0.5B')", {"HF_HUB_CACHE": str(tmp_path), **env})
    assert r.returncode != 0
    assert "Could not get Qwen/Qwen2-0.5B from the Hugging Face hub" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_command_line_prints_one_line_errors(tmp_path):
    for arg, expected in [("qwen3", "Unknown model 'qwen3'"), (str(tmp_path), "has no config.json")]:
        r = subprocess.run([sys.executable, "bases.py", arg], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert r.stderr.strip().startswith("error:") and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1
