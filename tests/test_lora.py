"""lora.py against peft: adapters cross-load both ways with equal logits, the saved keys are peft's, LoRA starts as
the identity and trains only itself, merge is exact and idempotent, and bad configurations are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_hf_model, pack_internlm2, train_a_few_steps, write_internlm2_checkpoint
from lora import (DoRALinear, LoRALinear, add_lora, load_lora, lora_parameters, merge_lora, save_lora,
                  unmerge_lora)
from bases import load_model

peft = pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def randomize_lora(model, seed=0):
    """Stand-in for training: non-zero B (and a new A), so the LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_our_adapter_loads_in_peft(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("qwen2")  # q/k/v carry a bias: LoRA must add to base(x) including it
    ours = add_lora(load_model(path), r=4, alpha=8, dropout=0.05, targets=ALL)
    randomize_lora(ours)
    save_lora(ours, tmp_path / "ad", base_model_name_or_path=str(path))
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad")
    ids = torch.randint(0, 96, (2, 30))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-4
    # and the saved tensors are exactly the ones peft's model now holds
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    for k, v in peft.get_peft_model_state_dict(theirs).items():
        assert torch.equal(sd[k], v)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], r".*\.(k_proj|up_proj)"])
def test_peft_adapter_loads_here(hf_checkpoint, tmp_path, targets):
    path, hf = hf_checkpoint("llama3.2")
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config)
    theirs.save_pretrained(tmp_path / "ad")
    ours = load_lora(load_model(path), tmp_path / "ad")
    ids = torch.randint(0, 96, (2, 30))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-4


def test_saved_keys_and_config_are_peft_format(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("llama3")
    peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, task_type="CAUSAL_LM")).save_pretrained(tmp_path / "peft")
    ours = add_lora(load_model(path), r=4, alpha=8, targets=ALL)
    save_lora(ours, tmp_path / "ours")
    ref, got = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(got) == set(ref)
    assert all(got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype for k in ref)
    cfg = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules), cfg.task_type) == (4, 8, set(ALL), "CAUSAL_LM")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)


def test_subset_of_layers_saves_module_paths(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("llama3")
    ours = add_lora(load_model(path), r=2, alpha=4, targets=["layers.1.self_attn.q_proj", "v_proj"])
    randomize_lora(ours)
    save_lora(ours, tmp_path / "ad")
    assert sorted(json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]) == ["model.layers.1.self_attn.q_proj", "v_proj"]
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad")
    ids = torch.randint(0, 96, (1, 20))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-4


def test_identity_at_init_trains_only_lora_and_merges_exactly(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    model = load_model(path)
    ids = torch.randint(0, 96, (4, 24))
    before = logits(model, ids)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, r=4, alpha=8, dropout=0.1, targets=ALL)
    assert torch.equal(logits(model, ids), before)  # B = 0: exactly the base model

    train_a_few_steps(model, ids)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # plain LoRA owns A and B alone: peft's names
    assert trainable == set(lora_parameters(model)) == {n for n, _ in model.named_parameters() if ".lora_" in n}
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, base[n.replace(".base_layer", "")]), n  # every base weight bit-identical
    assert any(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))

    unmerged = logits(model, ids)
    assert (unmerged - before).abs().max() > 1e-3  # training changed the function
    merge_lora(model)
    merged_weights = {n: p.clone() for n, p in model.named_parameters()}
    merge_lora(model)  # idempotent: a second merge changes nothing
    assert all(torch.equal(p, merged_weights[n]) for n, p in model.named_parameters())
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    model.train()
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        model(ids)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.allclose(p, base[n.replace(".base_layer", "")], atol=1e-6)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5


def test_internlm2_native_lora_names(tmp_path):
    """A peft LoRA on InternLM2's packed wqkv (and w2) loads onto the split model: the reference merges
    W_qkv + (alpha/r) B A in the packed layout, as peft would on InternLM2's own modules."""
    hf = build_hf_model("llama-dynamic")
    c = hf.config
    packed = pack_internlm2(hf.state_dict(), c)
    write_internlm2_checkpoint(tmp_path / "base", hf, packed=packed)
    r, alpha, g = 4, 8, torch.Generator().manual_seed(0)
    lora, merged = {}, dict(packed)
    for i in range(c.num_hidden_layers):
        for mod in ("attention.wqkv", "feed_forward.w2"):
            W = packed[f"model.layers.{i}.{mod}.weight"]
            A, B = torch.randn(r, W.shape[1], generator=g) * 0.1, torch.randn(W.shape[0], r, generator=g) * 0.1
            lora[f"base_model.model.model.layers.{i}.{mod}.lora_A.weight"] = A
            lora[f"base_model.model.model.layers.{i}.{mod}.lora_B.weight"] = B
            merged[f"model.layers.{i}.{mod}.weight"] = W + (alpha / r) * B @ A
    (tmp_path / "ad").mkdir()
    save_file(lora, tmp_path / "ad" / "adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": ["wqkv", "w2"], "bias": "none"}))
    write_internlm2_checkpoint(tmp_path / "merged", hf, packed=merged)
    ids = torch.randint(0, 96, (2, 20))
    ours = load_lora(load_model(tmp_path / "base"), tmp_path / "ad")
    assert (logits(ours, ids) - logits(load_model(tmp_path / "merged"), ids)).abs().max() <= 1e-4


def test_bad_configuration_is_refused(hf_checkpoint):
    path, _ = hf_checkpoint("qwen2")
    model = load_model(path)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        add_lora(model, r=0)
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\)"):
        add_lora(model, r=4, dropout=1.0)
    with pytest.raises(ValueError, match="Unknown LoRA target 'qproj'"):
        add_lora(model, r=4, targets=["qproj"])
    with pytest.raises(ValueError, match="'layers.7.self_attn.q_proj' matches no projection"):
        add_lora(model, r=4, targets=["layers.7.self_attn.q_proj"])
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        save_lora(model, "unused")


def test_loading_onto_another_shape_or_with_missing_keys_names_the_first_mismatch(hf_checkpoint, tmp_path):
    small, _ = hf_checkpoint("qwen2")
    other, _ = hf_checkpoint("qwen2", intermediate_size=96)
    save_lora(add_lora(load_model(small), r=4, alpha=8, targets=ALL), tmp_path / "ad")
    with pytest.raises(ValueError, match=r"Tensor model.layers.0.mlp.gate_proj.lora_B.weight .* shape \(128, 4\), but the model expects \(96, 4\)"):
        load_lora(load_model(other), tmp_path / "ad")
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    del sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(sd, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor model.layers.1.self_attn.v_proj.lora_B.weight \(shape \(32, 4\)\)"):
        load_lora(load_model(small), tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    with pytest.raises(ValueError, match="use_rslora"):
        load_lora(load_model(small), tmp_path / "ad")
    # a config that names a variant (DoRA) asks for its own weights, which a plain LoRA's file lacks
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="missing tensor model.layers.0.self_attn.q_proj.lora_magnitude_vector"):
        load_lora(load_model(small), tmp_path / "ad")


def test_dropout_in_training_acts_on_the_input_as_in_peft():
    """In train mode, with dropout: y = W x + b + (alpha/r) B A dropout(x), equal to peft's own Linear layer drawing the
    same dropout mask (one draw over x's elements, from the same RNG state)."""
    from peft.tuners.lora import Linear as PeftLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    ours = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5)
    theirs = PeftLinear(torch.nn.Linear(16, 12), adapter_name="default", config=config, r=4, lora_alpha=8)
    with torch.no_grad():
        theirs.base_layer.load_state_dict(base.state_dict())
        ours.lora_B.weight.normal_()  # B = 0 at init would hide where the dropout acts
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    ours.train(), theirs.train()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(1)
    y = ours(x)
    torch.manual_seed(1)
    assert torch.allclose(y, theirs(x), atol=1e-6)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones(10, 16), 0.5, training=True)  # the same draw, on ones: the mask / (1-p)
    expected = base(x) + 2.0 * (x * mask.view(2, 5, 16)) @ ours.lora_A.weight.T @ ours.lora_B.weight.T
    assert torch.allclose(y, expected, atol=1e-5)


def test_delta_is_the_one_place_the_update_is_computed():
    """forward(x) = base(x) + delta(x), delta(x) = (alpha/r) B A x (peft's get_delta_weight applied to x); a subclass
    that overrides delta alone (a DoRA-style fork) changes what forward adds, and nothing else."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    ours = LoRALinear(base, r=4, alpha=8).eval()
    with torch.no_grad():
        ours.lora_B.weight.normal_()
    x = torch.randn(10, 16)
    with torch.no_grad():
        expected = (ours.lora_B.weight @ ours.lora_A.weight) * (8 / 4)  # (out, in)
        assert torch.allclose(ours.delta(x), x @ expected.T, atol=1e-5)
        assert torch.allclose(ours(x), base(x) + ours.delta(x), atol=1e-5)

    class Doubled(LoRALinear):
        def delta(self, x, out=None):
            d = 2 * super().delta(x)
            return d if out is None else out + d

    fork = Doubled(base, r=4, alpha=8).eval()
    fork.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.allclose(fork(x), base(x) + 2 * ours.delta(x), atol=1e-5)


def test_a_bf16_base_adds_the_float32_update_before_one_rounding():
    """Without autocast, a bf16 base layer and a float32 LoRA: y = bf16(base(x) + delta) with the sum in float32. The
    numbers sit where rounding twice (delta to bf16 first, then the sum) gives another bf16 value: 1.0078125 + 0.0039
    is just under the midpoint 1.01171875, while 0.0039 alone rounds up to 2^-8, which lands on the midpoint and ties
    to 1.015625."""
    base = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.fill_(1.0078125)  # 1 + 2^-7, exact in bf16
    layer = LoRALinear(base, r=1, alpha=1)
    with torch.no_grad():
        layer.lora_A.weight.fill_(1.0)
        layer.lora_B.weight.fill_(0.0039)
    y = layer(torch.ones(1, 1, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.item() == 1.0078125
    assert (torch.tensor(1.0078125, dtype=torch.bfloat16) + torch.tensor(0.0039).to(torch.bfloat16)).item() == 1.015625


def randomize_dora(model, seed=0):
    """A, B and the magnitudes away from their start (m = n would hide a wrong norm)."""
    randomize_lora(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def test_our_dora_loads_in_peft_with_its_logits(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("qwen2")  # q/k/v biases: the magnitude scales W x, not the bias
    ours = add_lora(load_model(path), r=4, alpha=8, dropout=0.05, targets=ALL, variant=DoRALinear)
    randomize_dora(ours)
    save_lora(ours, tmp_path / "ad", base_model_name_or_path=str(path))
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ad")
    ids = torch.randint(0, 96, (2, 30))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-4
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert set(sd) == set(theirs_sd) and all(torch.equal(sd[k], v) for k, v in theirs_sd.items())


def test_a_peft_dora_loads_here_and_trains_with_the_same_dropout(hf_checkpoint, tmp_path):
    path, hf = hf_checkpoint("llama-bias")  # biases everywhere
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, use_dora=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config)
    randomize_dora(theirs)
    theirs.save_pretrained(tmp_path / "ad")
    ours = load_lora(load_model(path), tmp_path / "ad")
    assert all(type(m) is DoRALinear for m in ours.modules() if isinstance(m, LoRALinear))
    ids = torch.randint(0, 96, (2, 30))
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max() <= 1e-4
    # in training, dropout draws x' and W0 x' is recomputed from it: the same masks give the same outputs
    ours.train(), theirs.train()
    torch.manual_seed(5)
    a = ours(ids)
    torch.manual_seed(5)
    b = theirs(ids).logits
    assert (a - b).abs().max() <= 1e-4


def test_dora_trains_its_magnitudes_and_merges_to_the_same_function(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2")
    model = add_lora(load_model(path), r=4, alpha=8, targets=ALL, variant=DoRALinear)
    ids = torch.randint(0, 96, (2, 30))
    assert (logits(model, ids) - logits(load_model(path), ids)).abs().max() <= 1e-5  # m = n, B = 0: the base model
    start = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    assert any("lora_magnitude_vector" in n for n in start) and all(p.requires_grad for p in lora_parameters(model).values())
    train_a_few_steps(model, ids)
    assert all(not torch.equal(p, start[n]) for n, p in lora_parameters(model).items() if "magnitude" in n)
    save_lora(model, tmp_path / "ad")
    reloaded = load_lora(load_model(path), tmp_path / "ad")
    unmerged = logits(model, ids)
    assert (logits(reloaded, ids) - unmerged).abs().max() <= 1e-5
    merge_lora(reloaded)
    assert (logits(reloaded, ids) - unmerged).abs().max() <= 1e-4
    unmerge_lora(reloaded)
    base = dict(load_model(path).named_parameters())
    for n, p in reloaded.named_parameters():
        if n not in lora_parameters(reloaded):
            assert torch.allclose(p, base[n.replace(".base_layer", "")], atol=1e-5), n


class GatedLoRA(LoRALinear):
    """A fork's variant, defined here alone: the update times a learned scalar gate g, y = W0 x + b + g s B A x."""

    ADAPTER_CONFIG = {"use_gate": True}  # what names it in adapter_config.json (load_lora finds it by this)

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.lora_gate = torch.nn.Parameter(torch.tensor(0.5))

    def delta(self, x, out=None):
        d = self.lora_gate * super().delta(x)
        return d if out is None else (out.float() + d).to(out.dtype)

    def merged_weight(self):
        return self.base_layer.weight.float() + self.lora_gate.detach() * self.delta_weight()

    def unmerged_weight(self):
        return self.base_layer.weight.float() - self.lora_gate.detach() * self.delta_weight()


def test_a_variant_with_a_parameter_of_its_own_trains_saves_reloads_and_merges(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("qwen2")
    model = add_lora(load_model(path), r=4, alpha=8, targets=["q_proj", "v_proj"], variant=GatedLoRA)
    ids = torch.randint(0, 96, (2, 30))
    train_a_few_steps(model, ids)
    gates = [m.lora_gate.item() for m in model.modules() if isinstance(m, GatedLoRA)]
    assert gates and all(g != 0.5 for g in gates)  # the gate trained
    save_lora(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_gate"] is True
    assert any(k.endswith(".lora_gate") for k in load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    reloaded = load_lora(load_model(path), tmp_path / "ad")
    assert [m.lora_gate.item() for m in reloaded.modules() if isinstance(m, GatedLoRA)] == gates
    unmerged = logits(model, ids)
    assert (logits(reloaded, ids) - unmerged).abs().max() <= 1e-5
    merge_lora(reloaded)
    assert (logits(reloaded, ids) - unmerged).abs().max() <= 1e-5


def test_a_variant_without_a_config_of_its_own_is_not_saved_as_its_parent(hf_checkpoint, tmp_path):
    class Halved(LoRALinear):  # changes the function, names nothing: it would load as plain LoRA
        def delta(self, x, out=None):
            d = 0.5 * super().delta(x)
            return d if out is None else out + d

    path, _ = hf_checkpoint("qwen2")
    model = add_lora(load_model(path), r=4, alpha=8, targets=["q_proj"], variant=Halved)
    with pytest.raises(ValueError, match="Halved defines no ADAPTER_CONFIG of its own"):
        save_lora(model, tmp_path / "ad")
