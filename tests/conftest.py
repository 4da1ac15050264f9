"""Tiny random checkpoints written by transformers itself, the reference every model test compares against."""

import json

import pytest
import torch
from safetensors.torch import save_file

from test_tokenizer import write_checkpoint_tokenizer

transformers = pytest.importorskip("transformers")

# One small shape for every family: 2 layers, 4 query heads sharing 2 key/value heads (GQA), head_dim 16.
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
# Llama 3.1-style scaling with an original context of 64 tokens, so that a 100-token test sequence runs past it,
# and theta 1e4, so that head_dim 16 has frequencies in all three bands (kept, smoothed, divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

FAMILIES = {
    "qwen2": ("qwen2", dict()),  # q/k/v bias (Qwen2 hard-codes it)
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),  # like Qwen2-0.5B
    "llama3": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=0, eos_token_id=1)),
    "llama3.1": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    # Llama 3.2-style: explicit head_dim (here unlike hidden/heads = 12, to prove it is read) and tied embeddings.
    "llama3.2": ("llama", dict(hidden_size=48, head_dim=16, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    # Dynamic NTK as InternLM2 uses it; a 32-token window so that tests can run past it.
    "llama-dynamic": ("llama", dict(max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0})),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
}


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of the family with every parameter random (biases and norms too, so none is trivially 0 or 1)."""
    model_type, extra = FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model.eval()


def train_a_few_steps(model, ids, steps=3, lr=1e-2):
    """Next-token training of whatever is trainable (requires_grad), with AdamW."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (directory, transformers model) for a family, saved by save_pretrained as safetensors."""
    count = 0

    def make(family: str, dtype=torch.float32, max_shard_size=None, **overrides):
        nonlocal count
        count += 1
        model = build_hf_model(family, **overrides).to(dtype)
        path = tmp_path / f"{family}-{count}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return path, model

    return make


def pack_internlm2(sd, cfg):
    """A Llama state dict in InternLM2's format: rows of wqkv grouped per kv head as [q_0 .. q_{G-1}, k, v] (REFERENCE.md 2)."""
    K, H, D, C = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    G = H // K
    names = {"model.embed_tokens.weight": "model.tok_embeddings.weight", "lm_head.weight": "output.weight"}
    out = {}
    for key, t in sd.items():
        if ".self_attn.q_proj." in key or ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        new = names.get(key, key)
        for a, b in [("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"), ("self_attn.o_proj", "attention.wo"),
                     ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2")]:
            new = new.replace(a, b)
        out[new] = t.clone()
    for i in range(cfg.num_hidden_layers):
        for kind in ("weight", "bias"):
            p = f"model.layers.{i}.self_attn."
            if p + "q_proj." + kind not in sd:
                continue
            q, k, v = (sd[p + n + "_proj." + kind].reshape(K, -1, D, 1 if kind == "bias" else C) for n in "qkv")
            assert q.shape[1] == G
            out[f"model.layers.{i}.attention.wqkv.{kind}"] = torch.cat([q, k, v], 1).reshape(-1, C) if kind == "weight" else torch.cat([q, k, v], 1).reshape(-1)
    return out


def write_internlm2_checkpoint(path, hf_llama, fmt="safetensors", packed=None):
    """Save a transformers Llama model (dynamic-NTK RoPE) as an InternLM2 checkpoint: config.json in InternLM2's
    spelling and the packed tensors (`packed`, else packed from the model), as safetensors or (like internlm2-7b on the hub) pytorch_model.bin."""
    c = hf_llama.config
    sd = packed if packed is not None else pack_internlm2(hf_llama.state_dict(), c)
    config = dict(model_type="internlm2", architectures=["InternLM2ForCausalLM"], vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
                  rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=c.max_position_embeddings,
                  bias=c.attention_bias, hidden_act="silu", tie_word_embeddings=False, torch_dtype="float32",
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(sd, path / "pytorch_model.bin")
    else:
        save_file(sd, path / "model.safetensors")


QUESTIONS = [("What is 2 plus 3?", 5), ("What is 7 minus 4?", 3), ("What is 6 times 2?", 12), ("What is 9 plus 9?", 18),
             ("What is 10 minus 1?", 9), ("What is 4 times 4?", 16)]


@pytest.fixture
def world(hf_checkpoint, tmp_path):
    """An old base, its 'update' (same shape, other weights), a base of another shape, and GSM8K-format data."""
    old, _ = hf_checkpoint("qwen2", vocab_size=512)
    new, _ = hf_checkpoint("qwen2", vocab_size=512, seed=1)
    other, _ = hf_checkpoint("qwen2", vocab_size=512, intermediate_size=96)
    for path in (old, new, other):
        write_checkpoint_tokenizer(path, "qwen2")
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"It is {a}.\n#### {a}"}) + "\n" for q, a in QUESTIONS))
    return {"old": str(old), "new": str(new), "other": str(other), "data": str(data), "tmp": tmp_path}
