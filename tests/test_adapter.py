"""adapter.py: the hooks compute the stated equations (series and parallel), adapters start as the identity, train
only themselves, save and load, and refuse bad configurations and bases of another size."""

import pytest
import torch

from adapter import add_adapter, is_adapter_parameter, load_adapter, remove_adapter, save_adapter
from conftest import train_a_few_steps
from bases import load_model


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter_parameter(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def reference_forward(model, ids, adapters, placement):
    """The decoder written out with the adapters of the module docstring, hooks removed."""
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(ids.shape[1]).expand(ids.shape), x.dtype)
    for layer, (attn_ad, ffn_ad) in zip(model.model.layers, adapters):
        u = layer.input_layernorm(x)
        a = layer.self_attn(u, cos, sin)
        x = x + (attn_ad(a) if placement == "series" else a + attn_ad.branch(u))
        u = layer.post_attention_layernorm(x)
        f = layer.mlp(u)
        x = x + (ffn_ad(f) if placement == "series" else f + ffn_ad.branch(u))
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_hooks_compute_the_adapter_equations(hf_checkpoint, placement):
    path, _ = hf_checkpoint("qwen2")
    model = load_model(path)
    ids = torch.randint(0, 96, (2, 16))
    before = logits(model, ids)
    add_adapter(model, bottleneck=8, placement=placement)
    assert torch.equal(logits(model, ids), before)  # up = 0: the identity at init
    randomize(model)
    with_hooks = logits(model, ids)
    assert (with_hooks - before).abs().max() > 1e-3
    adapters = [(layer.attn_adapter, layer.ffn_adapter) for layer in model.model.layers]
    for h in model.adapter_hooks:
        h.remove()
    with torch.no_grad():
        assert (reference_forward(model, ids, adapters, placement) - with_hooks).abs().max() <= 1e-5


def test_trains_only_adapters_and_round_trips(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("llama3")
    model = load_model(path)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_adapter(model, bottleneck=4, act="silu")
    ids = torch.randint(0, 96, (4, 20))
    train_a_few_steps(model, ids)
    assert all(is_adapter_parameter(n) == p.requires_grad for n, p in model.named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not is_adapter_parameter(n))
    trained = logits(model, ids)

    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(load_model(path), tmp_path / "ad")
    assert torch.equal(logits(fresh, ids), trained)
    remove_adapter(fresh)
    assert torch.equal(logits(fresh, ids), logits(load_model(path), ids))


def test_bad_configuration_and_other_size_are_refused(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2")
    model = load_model(path)
    with pytest.raises(ValueError, match="bottleneck must be a positive integer"):
        add_adapter(model, bottleneck=0)
    with pytest.raises(ValueError, match="Unknown adapter activation 'tanh'"):
        add_adapter(model, act="tanh")
    with pytest.raises(ValueError, match="Unknown adapter placement"):
        add_adapter(model, placement="sideways")
    save_adapter(add_adapter(model, bottleneck=4), tmp_path / "ad")
    other, _ = hf_checkpoint("llama3.2")  # hidden 48
    with pytest.raises(ValueError, match="hidden size 64 and 2 layers; this model has 48 and 2"):
        load_adapter(load_model(other), tmp_path / "ad")
