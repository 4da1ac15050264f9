"""Tiny random checkpoints written by transformers itself, the reference every model test compares against."""

import pytest
import torch

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

