"""transpeft.py against the paper's equations: zero rates change nothing, eval is never masked, the mask is a
per-element Bernoulli(1 - p) on the SwiGLU product of the LoRA-adjusted projections, a dropped layer passes its
post-attention state through exactly and gives its FFN LoRA no gradient."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora import PROJECTIONS, add_lora
from bases import load_model
from transpeft import (MaskedInputLinear, apply_attention_masking, apply_transpeft, ffn_gradient,
                       remove_attention_masking, remove_transpeft)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROOT = Path(__file__).resolve().parents[1]


def lora_model(path, seed=0):
    model = add_lora(load_model(path), r=4, alpha=8, targets=ALL, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B, so that every LoRA parameter gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_zero_rates_are_exactly_the_plain_model(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    model = lora_model(path).train()
    ids = torch.randint(0, 96, (2, 24))
    plain_logits, plain_grads = loss_and_grads(model, ids)
    apply_transpeft(model, p_intra=0.0, p_cross=0.0)
    logits, grads = loss_and_grads(model, ids)
    assert torch.equal(logits, plain_logits)
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)


def test_eval_is_deterministic_and_unmasked(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    model = lora_model(path).eval()
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        plain = model(ids)
        apply_transpeft(model, p_intra=0.5, p_cross=0.5)
        assert torch.equal(model(ids), plain) and torch.equal(model(ids), plain)
        model.train()
        assert not torch.equal(model(ids), plain)  # and in training it does act
        remove_transpeft(model)
        assert torch.equal(model(ids), plain)  # switched off: plain again, in train mode too (no dropout here)


def capture_products(model):
    """The input of every down_proj (the masked SwiGLU product), per forward."""
    seen = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen


def test_masking_is_per_element_bernoulli(hf_checkpoint):
    path, _ = hf_checkpoint("llama3", intermediate_size=256)
    model = apply_transpeft(load_model(path), p_intra=0.3, p_cross=0.0).train()
    seen = capture_products(model)
    ids = torch.randint(0, 96, (8, 64))
    with torch.no_grad():
        model(ids)
        first = [(h == 0) for h in seen]
        model(ids)
        second = [(h == 0) for h in seen[len(first):]]
    for zero, again in zip(first, second):
        n = zero.numel()  # 8 * 64 * 256 = 131072 elements per layer
        # Binomial: std of the zero fraction sqrt(p(1-p)/n) = 0.0013; allow 5 standard deviations.
        assert abs(zero.float().mean().item() - 0.3) <= 5 * math.sqrt(0.3 * 0.7 / n)
        # Per element, not per token or channel: no token (row) or channel (column) is masked whole, and two
        # channels of one token are both masked with probability p^2 = 0.09 (per-token masks would give p = 0.3).
        flat = zero.flatten(0, 1)  # (tokens, channels)
        assert not flat.all(dim=1).any() and not flat.all(dim=0).any()
        both = (flat[:, 0::2] & flat[:, 1::2]).float().mean().item()
        assert abs(both - 0.09) <= 5 * math.sqrt(0.09 * 0.91 / (n / 2))
        assert not torch.equal(zero, again)  # a fresh mask on the next forward


def test_mask_acts_on_the_lora_adjusted_product(hf_checkpoint):
    """σ(X(W1+ΔW1)) ⊙ m · (W2+ΔW2): the paper's equation, with the same draw of m."""
    path, _ = hf_checkpoint("qwen2")
    model = apply_transpeft(lora_model(path), p_intra=0.4, p_cross=0.0).train()
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)

    def lora(m, v):
        return F.linear(v, m.base_layer.weight, m.base_layer.bias) + m.scaling * F.linear(F.linear(v, m.lora_A.weight), m.lora_B.weight)

    with torch.no_grad():
        torch.manual_seed(7)
        got = mlp(x)
        h = F.silu(lora(mlp.gate_proj, x)) * lora(mlp.up_proj, x)
        torch.manual_seed(7)
        m = (torch.rand_like(h) > 0.4).float()  # Bernoulli(1 - p), the official code's `rand > p`
        assert torch.allclose(got, lora(mlp.down_proj, h * m), atol=1e-6)


def test_control_a_masks_only_the_base_branch_of_o_proj(hf_checkpoint):
    """W_o (x ⊙ m) + s B A x: the LoRA on o_proj reads the unmasked input, as FFN masking leaves an attention LoRA's
    input alone; in eval, and once removed, the plain projection."""
    path, _ = hf_checkpoint("qwen2")
    model = apply_attention_masking(lora_model(path), 0.4).train()
    o = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 5, o.base_layer.in_features)

    def lora(v_base, v_lora):
        return F.linear(v_base, o.base_layer.weight, o.base_layer.bias) + o.scaling * F.linear(F.linear(v_lora, o.lora_A.weight), o.lora_B.weight)

    with torch.no_grad():
        torch.manual_seed(7)
        got = o(x)
        torch.manual_seed(7)
        m = (torch.rand_like(x) > 0.4).float()  # Bernoulli(1 - p), no rescaling
        assert 0.5 < m.mean() < 0.7
        assert torch.allclose(got, lora(x * m, x), atol=1e-6)
        assert not torch.allclose(got, lora(x * m, x * m), atol=1e-3)  # the confounded placement: LoRA input masked too
        assert torch.allclose(o.eval()(x), lora(x, x), atol=1e-6)
        remove_attention_masking(model.train())
        assert type(o.base_layer) is torch.nn.Linear and torch.allclose(o(x), lora(x, x), atol=1e-6)
    # applied before the LoRA: the LoRA wraps the masked base layer, and the base branch is still the one masked
    early = add_lora(apply_attention_masking(load_model(path), 0.4), r=4, alpha=8, targets=["o_proj"], verbose=False)
    assert isinstance(early.model.layers[0].self_attn.o_proj.base_layer, MaskedInputLinear)


def test_ffn_gradient_is_the_gradient_at_the_ffn_outputs(hf_checkpoint):
    """(L, ‖∂L/∂y‖) against the definition: a perturbation δ_l added to every FFN output, L the mean cross-entropy of
    the full logits over the positions with a target; the gradient by autograd, and its norm also as the finite
    difference of L along the gradient's direction u (dL/dε at δ = εu is ‖∂L/∂y‖), which uses forward passes only."""
    path, _ = hf_checkpoint("qwen2")
    model = apply_transpeft(lora_model(path), p_intra=0.5, p_cross=0.5).train()  # measured without either
    ids = torch.randint(0, 96, (3, 12))
    targets = torch.randint(0, 96, (3, 12))
    targets[:, :4] = -100
    loss, grad_norm = ffn_gradient(model, ids, targets)
    assert model.training  # restored
    remove_transpeft(model).eval()
    deltas = [torch.zeros(3, 12, 64, requires_grad=True) for _ in model.model.layers]
    for layer, d in zip(model.model.layers, deltas):
        layer.mlp.register_forward_hook(lambda m, args, out, d=d: out + d)
    ref = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    grads = torch.autograd.grad(ref, deltas)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert grad_norm == pytest.approx(norm.item(), rel=1e-4)

    def loss_at(eps):
        with torch.no_grad():
            for d, g in zip(deltas, grads):
                d.copy_(eps * g / norm)
            return F.cross_entropy(model(ids).flatten(0, 1).double(), targets.flatten(), ignore_index=-100).item()

    eps = 1e-2
    assert grad_norm == pytest.approx((loss_at(eps) - loss_at(-eps)) / (2 * eps), rel=2e-2)


def test_ffn_gradient_with_an_adapter_is_taken_at_the_ffn_itself_before_the_adapter(hf_checkpoint):
    """With a series bottleneck adapter on each FFN (adapter.py), y_l is still the FFN's own output, the one an update
    moves: the reference perturbs down_proj's output, the FFN's last operation, with the adapter after it."""
    from adapter import add_adapter

    path, _ = hf_checkpoint("qwen2")
    model = add_adapter(load_model(path), bottleneck=4, verbose=False)
    with torch.no_grad():  # non-zero up projections: each adapter then changes what flows after the FFN
        for n, p in model.named_parameters():
            if ".up." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    ids, targets = torch.randint(0, 96, (2, 10)), torch.randint(0, 96, (2, 10))
    _, grad_norm = ffn_gradient(model, ids, targets)
    deltas = [torch.zeros(2, 10, 64, requires_grad=True) for _ in model.model.layers]
    for layer, d in zip(model.model.layers, deltas):
        layer.mlp.down_proj.register_forward_hook(lambda m, args, out, d=d: out + d)
    ref = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    norm = torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(ref, deltas)))
    assert grad_norm == pytest.approx(norm.item(), rel=1e-4)


def test_dropping_skips_the_whole_ffn_and_its_lora_gets_no_gradient(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2", num_hidden_layers=4)
    model = apply_transpeft(lora_model(path), p_intra=0.0, p_cross=0.5, seed=0).train()
    n_layers, steps = 4, 300
    calls, states = [], {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda m, a, out, i=i: states.__setitem__(("out", i), out.detach()))
        layer.register_forward_pre_hook(lambda m, a, i=i: states.__setitem__(("in", i), a[0].detach()))
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: states.__setitem__(("attn", i), out.detach()))
        layer.mlp.register_forward_hook(lambda m, a, out, i=i: calls.append(i))
    ids = torch.randint(0, 96, (2, 16))
    dropped_count = [0] * n_layers
    for step in range(steps):
        calls.clear()
        need_grads = step < 20
        _, grads = loss_and_grads(model, ids) if need_grads else (model(ids), None)
        for i in range(n_layers):
            if i in calls:
                continue
            dropped_count[i] += 1
            post_attention = states[("in", i)] + states[("attn", i)]
            assert torch.equal(states[("out", i)], post_attention)  # passes through exactly, whole batch
        if need_grads:
            for i in range(n_layers):
                prefix = f"model.layers.{i}."
                ffn = [n for n in grads if n.startswith(prefix + "mlp.")]
                attn_b = [n for n in grads if n.startswith(prefix + "self_attn.") and "lora_B" in n]
                assert len(attn_b) == 4 and all(grads[n].abs().sum() > 0 for n in attn_b)  # attention always learns
                if i in calls:
                    assert len(ffn) == 6
                else:
                    assert ffn == []  # a dropped layer's FFN LoRA got no gradient at all
    # Each layer dropped about half the time: binomial std sqrt(0.25 / 300) = 0.029; allow 4 of them.
    for count in dropped_count:
        assert abs(count / steps - 0.5) <= 4 * math.sqrt(0.25 / steps)


def test_drops_are_reproducible_and_shared_across_ranks(hf_checkpoint):
    """Two 'ranks' seeded alike drop the same layers even when they draw different amounts of other randomness."""
    path, _ = hf_checkpoint("qwen2", num_hidden_layers=4)
    ids = torch.randint(0, 96, (1, 8))

    def drops(extra_draws):
        torch.manual_seed(42)
        model = apply_transpeft(load_model(path), p_intra=0.2, p_cross=0.5).train()
        calls = []
        for i, layer in enumerate(model.model.layers):
            layer.mlp.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
        pattern = []
        for _ in range(20):
            torch.rand(extra_draws)  # e.g. another data shard, other dropout shapes
            calls.clear()
            with torch.no_grad():
                model(ids)
            pattern.append(tuple(calls))
        return pattern

    assert drops(0) == drops(1000)
    assert len(set(drops(0))) > 1  # and the pattern does vary from step to step


@pytest.mark.parametrize("kw,msg", [
    (dict(p_cross=1.0), r"p_cross must be in \[0, 1\), got 1.0"),
    (dict(p_intra=-0.1), r"p_intra must be in \[0, 1\), got -0.1"),
    (dict(p_intra=float("nan")), r"p_intra must be in \[0, 1\), got nan"),
    (dict(p_cross=[0.1, 0.2, 0.3]), r"p_cross has 3 values but the model has 2 layers"),
    (dict(p_cross=[0.1, 1.5]), r"got 1.5 \(layer 1\)"),
])
def test_rates_outside_unit_interval_are_refused(hf_checkpoint, kw, msg):
    path, _ = hf_checkpoint("qwen2")
    with pytest.raises(ValueError, match=msg):
        apply_transpeft(load_model(path), **kw)


def test_per_layer_rates(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    model = apply_transpeft(load_model(path), p_intra=[0.0, 0.5], p_cross=[0.0, 0.0]).train()
    seen = capture_products(model)
    with torch.no_grad():
        model(torch.randint(0, 96, (4, 32)))
    assert (seen[0] == 0).float().mean() == 0 and abs((seen[1] == 0).float().mean().item() - 0.5) < 0.05


def test_gradient_checkpointing_replays_the_random_draws(hf_checkpoint):
    """loop.wrap_layers(grad_checkpointing=True) recomputes each layer in backward with the masks and drops its
    forward pass drew: losses and LoRA gradients equal those without checkpointing (a fresh draw would not)."""
    from loop import wrap_layers

    path, _ = hf_checkpoint("qwen2", num_hidden_layers=4)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = add_lora(load_model(path), r=4, alpha=8, dropout=0.1, targets=PROJECTIONS, verbose=False)
        apply_transpeft(model, p_intra=0.3, p_cross=0.5, seed=0)
        if checkpointed:
            wrap_layers(model, grad_checkpointing=True)
        model.train()
        losses = []
        for step in range(3):  # several draws of the drops and masks
            torch.manual_seed(100 + step)
            model.transpeft_rng.manual_seed(step)
            loss = model(ids, targets=targets)
            loss.backward()
            losses.append(loss.item())
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_losses, plain_grads), (ckpt_losses, ckpt_grads) = results
    assert plain_losses == pytest.approx(ckpt_losses, rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], atol=1e-6), name
