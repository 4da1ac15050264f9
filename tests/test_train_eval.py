"""train.py and eval.py end to end on tiny checkpoints built here: a short run lowers the loss and writes an adapter
that eval.py loads, --resume after an interruption ends where the uninterrupted run ends, batched decoding equals
one prompt at a time, and bad input is refused before any training."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import eval as eval_cli
import model as model_py
import experiment
import loop
import train
from data import eval_prompt
from eval import generate
from lora import add_lora
from bases import load_model, load_tokenizer
from conftest import QUESTIONS

needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                               reason="torch.compile on CPU needs a C++ compiler")


def run_args(w, out, *extra):
    return ["--old", w["old"], "--new", w["new"], "--train-data", w["data"], "--eval-data", w["data"], "--out",
            str(out),
            "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj,down_proj", "--p-cross", "0.3",
            "--p-intra", "0.1",
            "--batch-size", "6", "--micro-batch-size", "4", "--lr", "3e-2", "--warmup-ratio", "0.1", "--eval-limit",
            "3",
            "--max-new-tokens", "6", "--max-len", "320", "--save-every", "2", *extra]


def test_arms_run_the_papers_comparison(world, capsys):
    """--arms plain,transpeft,refit: one ordinary run per arm and seed (plain: rates 0; transpeft: the rates given;
    refit: trained on --new), paired by seed, then one table; --resume reuses the finished runs."""
    out = world["tmp"] / "arms"
    train.main(run_args(world, out, "--max-steps", "2", "--arms", "plain,transpeft,refit", "--seeds", "2"))
    summary = json.loads((out / "arms.json").read_text())
    rows = {(r["arm"], r["seed"]): r for r in summary["rows"]}
    assert set(rows) == {(a, s) for a in ("plain", "transpeft", "refit") for s in (42, 43)}
    for seed in (42, 43):
        plain, tp = (json.loads((out / f"{a}-seed{seed}" / "args.json").read_text()) for a in ("plain", "transpeft"))
        assert (plain["p_cross"], plain["p_intra"], tp["p_cross"], tp["p_intra"], plain["seed"]) == (0.0, 0.0, 0.3, 0.1, seed)
        for arm in ("plain", "transpeft"):
            r = json.loads((out / f"{arm}-seed{seed}" / "results.json").read_text())
            assert rows[(arm, seed)]["source"] == r["gsm8k"]["source_old"]["accuracy"] and rows[(arm, seed)]["transfer"] == r["gsm8k"]["transfer_new"]["accuracy"]
        refit = json.loads((out / f"refit-seed{seed}" / "results.json").read_text())
        assert refit["gsm8k"]["source_old"] is None and refit["gsm8k"]["transfer_new"] is None and refit["gsm8k"]["refit_new"]["total"] == 3
        assert rows[("refit", seed)]["transfer"] == refit["gsm8k"]["refit_new"]["accuracy"]
        config = json.loads((out / f"refit-seed{seed}" / "refit-new" / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == world["new"]
        assert not (out / f"plain-seed{seed}" / "refit-new").exists()
    assert "Trans-PEFT trained on old" in capsys.readouterr().out
    assert len(summary["summary"]["regimes"][Path(world["new"]).name + " gsm8k"]["arms"]["transpeft"]["itt"]) > 0  # paired over 2 seeds
    before = (out / "plain-seed42" / "adapter" / "adapter_model.safetensors").read_bytes()
    train.main(run_args(world, out, "--max-steps", "2", "--arms", "plain,transpeft,refit", "--seeds", "2", "--resume"))
    assert (out / "plain-seed42" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_short_run_learns_saves_and_resumes_identically(world):
    a = world["tmp"] / "a"
    train.main(run_args(world, a, "--max-steps", "16", "--refit-new"))
    log = [json.loads(line) for line in (a / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 17))
    first, last = sum(e["loss"] for e in log[:3]) / 3, sum(e["loss"] for e in log[-3:]) / 3
    assert last < 0.8 * first, (first, last)  # the same six examples every step: the loss must fall
    results = json.loads((a / "results.json").read_text())
    for key in ("source_old", "transfer_new", "refit_new"):
        assert results["gsm8k"][key]["total"] == 3 and 0 <= results["gsm8k"][key]["accuracy"] <= 1
    assert json.loads((a / "args.json").read_text())["p_cross"] == 0.3

    # the adapter is PEFT-format LoRA that eval.py loads onto either base
    assert json.loads((a / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    eval_cli.main(["--model", world["new"], "--adapter", str(a / "adapter"), "--data", world["data"], "--limit", "2",
                   "--max-new-tokens", "4", "--out", str(world["tmp"] / "e.jsonl")])
    records = [json.loads(line) for line in (world["tmp"] / "e.jsonl").read_text().splitlines()]
    assert len(records) == 2 and set(records[0]) == {"question", "completion", "gold", "prediction_official",
                                                     "prediction_lenient",
                                                      "rule_lenient", "correct_official", "correct_lenient", "correct"}

    # interrupted after step 3 (checkpoints at 2 and 3), then resumed: the same adapter as the uninterrupted run
    b = world["tmp"] / "b"
    train.main(run_args(world, b, "--max-steps", "16", "--stop-after", "3"))
    assert not (b / "results.json").exists() and torch.load(b / "checkpoint.pt", weights_only=True)["step"] == 3
    train.main(run_args(world, b, "--max-steps", "16", "--resume"))
    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    log_b = [json.loads(line) for line in (b / "train_log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in log_b] == [e["loss"] for e in log]


def lora_model(world, dropout=0.0):
    """The old toy base with a LoRA whose B is random (not zero), so that the LoRA changes what is decoded."""
    model = add_lora(load_model(world["old"]), r=4, alpha=8, dropout=dropout, targets=["q_proj", "v_proj", "up_proj"],
                     verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model, load_tokenizer(world["old"])


def test_an_arm_at_another_rate_on_real_bases(world):
    out = world["tmp"] / "arms"
    train.main(run_args(world, out, "--max-steps", "2", "--arms", "plain,drop@0.05"))
    assert json.loads((out / "drop@0.05-seed42" / "args.json").read_text())["p_cross"] == 0.05
    assert {r["arm"] for r in json.loads((out / "arms.json").read_text())["rows"]} == {"plain", "drop@0.05"}


def test_arms_resume_starts_an_arm_never_begun(world):
    out = world["tmp"] / "arms"
    train.main(run_args(world, out, "--max-steps", "2", "--arms", "plain"))
    before = (out / "plain-seed42" / "results.json").read_bytes()
    train.main(run_args(world, out, "--max-steps", "2", "--arms", "plain,drop", "--resume"))
    assert (out / "plain-seed42" / "results.json").read_bytes() == before  # reused
    assert (out / "drop-seed42" / "results.json").exists()  # begun and finished
    assert {r["arm"] for r in json.loads((out / "arms.json").read_text())["rows"]} == {"plain", "drop"}


def test_the_experiment_with_dora(world):
    """--peft dora: the transfer experiment end to end, the adapter in peft's DoRA format (use_dora, a magnitude per
    row beside A and B), and --resume continuing it bit for bit."""
    whole, parts = world["tmp"] / "whole", world["tmp"] / "parts"
    train.main(run_args(world, whole, "--max-steps", "4", "--peft", "dora"))
    train.main(run_args(world, parts, "--max-steps", "4", "--peft", "dora", "--stop-after", "2"))
    train.main(run_args(world, parts, "--max-steps", "4", "--peft", "dora", "--resume"))
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    weights = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert config["use_dora"] is True and any(k.endswith("lora_magnitude_vector") for k in weights)
    assert weights.keys() == load_file(parts / "adapter" / "adapter_model.safetensors").keys()
    assert all(torch.equal(v, load_file(parts / "adapter" / "adapter_model.safetensors")[k]) for k, v in weights.items())
    assert json.loads((whole / "results.json").read_text())["peft"] == "dora"


def test_batched_decoding_equals_one_prompt_at_a_time(world):
    model, tok = lora_model(world)
    prompts = [eval_prompt(q) for q, _ in QUESTIONS] + ["Short one", "A much longer prompt " * 5]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batched = generate(model, tok, prompts, max_new_tokens=10, batch_size=8, stop_strings=[])
    alone = generate(model, tok, prompts, max_new_tokens=10, batch_size=1, stop_strings=[])
    assert batched == alone and any(batched)
    # decoding left the weights as they were, and they still train: no inference tensors left behind
    assert all(p.is_contiguous() and torch.equal(p, before[n]) for n, p in model.named_parameters())
    model.train()
    ids = torch.tensor([tok.encode(prompts[0])])
    model(ids, targets=ids).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_a_row_that_ends_by_eos_while_another_continues_equals_the_rows_alone(world):
    """A row stopped by EOS (no stop string to cut extra tokens away afterwards) inside a batch whose other rows go on:
    every row as decoded alone."""
    model, tok = lora_model(world)
    prompts = [eval_prompt(q) for q, _ in QUESTIONS]
    full = generate(model, tok, prompts, max_new_tokens=10, batch_size=8, stop_strings=[])
    ids = [tok.encode(c) for c in full]
    ender, row = next((t, i) for i, r in enumerate(ids) for t in r[1:4] if not any(t in o for o in ids[:i] + ids[i + 1:]))
    tok.stop_ids = set(tok.stop_ids) | {ender}  # an end-of-sequence id for this one row
    batched = generate(model, tok, prompts, max_new_tokens=10, batch_size=8, stop_strings=[])
    alone = generate(model, tok, prompts, max_new_tokens=10, batch_size=1, stop_strings=[])
    assert batched == alone
    assert len(batched[row]) < len(full[row]) and all(batched[i] == full[i] for i in range(len(full)) if i != row)


def test_lookahead_decoding_gives_the_same_completions(world):
    """lookahead (the default on CUDA) queues each next step before the host reads the current tokens: the same
    completions, with and without a stop string that cuts them, and the KV cache (prompt + max_new_tokens) suffices."""
    model, tok = lora_model(world)
    prompts = [eval_prompt(q) for q, _ in QUESTIONS] + ["Short one"]
    for stops in ([], None):
        if stops is None:  # a stop string taken from a completion, so that it cuts some of them early
            full = generate(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_strings=[])
            stops = [next(c for c in full if len(c) > 6)[3:5]]
        plain = generate(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_strings=stops, lookahead=False)
        ahead = generate(model, tok, prompts, max_new_tokens=10, batch_size=2, stop_strings=stops, lookahead=True)
        assert ahead == plain and any(plain)
    assert any(len(c) < len(f) for c, f in zip(plain, full))  # the stop string did cut


def expect_exit(argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message in str(e.value.code), e.value.code


def test_bad_input_is_refused_before_training(world, capsys):
    out = world["tmp"] / "x"
    expect_exit(["--old", world["old"], "--new", world["other"], "--train-data", world["data"], "--out", str(out)],
                "differ in intermediate_size (128 vs 96)")
    expect_exit(run_args(world, out, "--train-data", str(world["tmp"] / "nope.jsonl")), "nope.jsonl does not exist")
    (world["tmp"] / "empty.jsonl").write_text("")
    expect_exit(run_args(world, out, "--train-data", str(world["tmp"] / "empty.jsonl")), "holds no examples")
    with pytest.raises(SystemExit):  # argparse: a rate outside [0, 1)
        train.parse_args(run_args(world, out, "--p-cross", "1.0"))
    assert "--p-cross must be in [0, 1)" in capsys.readouterr().err
    expect_exit(run_args(world, out, "--resume"), "Nothing to resume")
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text("{}")
    expect_exit(run_args(world, out), "already holds a finished run")
    with pytest.raises(SystemExit):  # argparse: both or neither of --old/--new
        train.parse_args(["--old", world["old"]])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, monkeypatch):
    out = world["tmp"] / "nan"
    real_ce, calls = model_py.linear_cross_entropy, []

    def poisoned(*args, **kwargs):  # NaN from the 4th step on (two micro-batches a step)
        calls.append(1)
        loss = real_ce(*args, **kwargs)
        return loss * float("nan") if len(calls) > 6 else loss

    monkeypatch.setattr(model_py, "linear_cross_entropy", poisoned)
    expect_exit(run_args(world, out, "--max-steps", "10"), "The loss became nan at step 4")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # --save-every 2: the last good one
    assert not (out / "results.json").exists()


@pytest.mark.slow
@needs_cxx
def test_compiled_layers_train_like_eager(world):
    """--compile (torch.compile of each decoder layer) computes the eager loss and LoRA gradients, with layers dropped
    (the drop decision runs outside the compiled graphs), and unwrap_layers gives the plain layers back."""
    from transpeft import apply_transpeft

    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = add_lora(load_model(world["old"]), r=4, alpha=8, targets=["q_proj", "down_proj"], verbose=False)
        apply_transpeft(model, p_cross=0.5, seed=0)
        loop.wrap_layers(model, compile=compiled)
        model.train()
        loss = model(ids, targets=ids)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        loop.unwrap_layers(model)
        assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    ffn_loras = [n for n in eager_grads if ".mlp.down_proj.lora_A" in n]
    assert len(ffn_loras) < len(model.model.layers)  # some layer's FFN was dropped: its LoRA got no gradient
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == compiled_grads.keys()
    assert all(torch.allclose(eager_grads[n], compiled_grads[n], atol=1e-5) for n in eager_grads)


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("batch_size, module", [(2, "lora"), (1, "lora"), (2, "adapter")])
def test_compiled_decoding_equals_eager_and_compiles_once(world, batch_size, module):
    """generate(compile=True) (a static KV cache, the one-token step through torch.compile) gives the eager tokens and
    logits on left-padded batches with a LoRA (dropout configured, inactive in eval) or a bottleneck adapter attached,
    and compiles once for batches of one size whatever their prompt lengths."""
    if module == "lora":
        model, tok = lora_model(world, dropout=0.1)
    else:
        from adapter import add_adapter

        model, tok = add_adapter(load_model(world["old"]), bottleneck=4, verbose=False), load_tokenizer(world["old"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".up." in n:
                    p.normal_(0, 0.2)
    model.eval()
    step_logits = {}
    for compiled in (False, True):  # the logits of a prompt's first decoding step, eager and compiled
        cache = model.new_cache(1, 256, static=compiled)
        ids = torch.tensor([tok.encode(eval_prompt(QUESTIONS[0][0]))])
        first = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1)
        torch._dynamo.reset()
        step = torch.compile(model, dynamic=False) if compiled else model
        step_logits[compiled] = step(first[:, None], cache=cache)[:, -1]
    assert (step_logits[True] - step_logits[False]).abs().max() <= 1e-4
    prompts = [eval_prompt(q) for q, _ in QUESTIONS][:2] + ["Short one", "A much longer prompt " * 5]
    lengths = sorted(len(tok.encode(p)) for p in prompts)
    assert lengths[1] < lengths[3]  # batches (of prompts sorted by length) are padded to different lengths
    eager = generate(model, tok, prompts, max_new_tokens=8, batch_size=batch_size, stop_strings=[])
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = generate(model, tok, prompts, max_new_tokens=8, batch_size=batch_size, stop_strings=[], compile=True)
    assert compiled == eager and any(compiled)
    # batches of different prompt lengths, 7 steps each: one compiled graph serves all the steps
    assert counters["stats"]["unique_graphs"] == 1


def test_static_cache_reaches_the_compiled_step_as_static_inputs(world):
    """CUDA graphs replay a step at the addresses they recorded, and torch skips the graphs of a step that mutates an
    input it does not know to be static: the cache's keys, values and slot, written in place by every step, must reach
    the graph as static inputs (as the weights do); the tokens and the attention mask, which only are read, need not.
    Checked on the graph dynamo hands to the compiler, so that a CPU shows it."""
    model, _ = lora_model(world)
    model.eval()
    inputs = {}

    def backend(gm, example_inputs):  # records each graph input's static marking, then runs the graph as is
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                inputs[node.name] = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
        return gm.forward

    with torch.inference_mode():
        cache, mask = model.new_cache(2, 16, static=True), torch.ones(2, 16, dtype=torch.long)
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=mask, cache=cache)
        torch._dynamo.reset()
        torch.compile(model, backend=backend, dynamic=False)(torch.ones(2, 1, dtype=torch.long), attention_mask=mask,
                                                             cache=cache)
    n_layers = len(model.model.layers)
    cached = {name: kind for name, kind in inputs.items() if "cache" in name}
    assert len(cached) == 2 * n_layers + 1 and all(kind is not None for kind in cached.values()), cached
    assert all(kind is not None for name, kind in inputs.items() if "parameters" in name)
    assert inputs["l_input_ids_"] is None and inputs["l_attention_mask_"] is None


@pytest.mark.parametrize("total, ratio", [(50, 0.03), (200, 0.05), (10, 0.0), (7, 0.5)])
def test_lr_schedule_is_transformers_cosine_with_warmup(total, ratio):
    """The HF Trainer of the official run: get_cosine_schedule_with_warmup, stepped after each optimizer step, so
    optimizer step s uses lambda(s): lr 0 at the first step, warmup = ceil(ratio * total)."""
    warmup = math.ceil(ratio * total)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-4)
    schedule = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(total):
        assert loop.get_lr(step, total, 3e-4, warmup) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        opt.step()
        schedule.step()


def test_logged_lr_is_the_schedule_of_the_run(world):
    """The lr column of train_log.jsonl: warmup from 0 over ceil(0.25 * 8) = 2 steps, then cosine to 0 at step 8."""
    out = world["tmp"] / "lr"
    train.main(run_args(world, out, "--max-steps", "8", "--warmup-ratio", "0.25", "--lr", "1e-2"))
    logged = [json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    expected = [0.0, 0.005] + [0.5e-2 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(2, 8)]
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-15)


# Supervised token counts 1-2, 9-12, ~25 and ~45 in one batch: micro-batch means and the batch mean differ.
UNEQUAL = [{"question": "Say yes.", "response": "Yes."},
           {"question": "What is 2 plus 3?", "response": "Two plus three is five. The answer is: 5"},
           {"question": "What is 7 minus 4?",
            "response": "Seven minus four: take four away from seven and three are left, "
                                                          "so seven minus four is three. The answer is: 3"},
           {"question": "What is 6 times 2?",
            "response": "Six times two is six added to itself: six and six make twelve, "
                                                          "twelve is the product of six and two, and twice six is "
                                                          "twelve again. The answer is: 12"}]


@pytest.mark.parametrize("loss_mean, micro", [("batch", 1), ("batch", 2), ("micro-batch", 1)])
def test_loss_and_gradient_are_the_defined_token_means(world, loss_mean, micro):
    """One process, micro-batches of unequal token counts. batch: the mean over every supervised token of the global
    batch, however it is split; micro-batch (the released run's HF Trainer): each micro-batch's own token mean,
    averaged over the micro-batches. The step's logged loss and gradient norm (taken before clipping) equal the
    definition's, computed here in one pass with F.cross_entropy."""
    import torch.nn.functional as F

    from data import IGNORE_INDEX, tokenize_dataset

    dataset, _ = tokenize_dataset(UNEQUAL, load_tokenizer(world["old"]), 320)
    counts = [sum(label != IGNORE_INDEX for label in d["labels"][1:]) for d in dataset]
    assert len(set(counts)) == 4

    def fresh():
        torch.manual_seed(0)
        m = add_lora(load_model(world["old"]), r=4, alpha=8, targets=["q_proj", "v_proj"], verbose=False)
        with torch.no_grad():  # B = 0 at init would leave A without gradient
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        return m

    ref = fresh()
    sums = []
    for d in dataset:
        ids, labels = torch.tensor([d["input_ids"]]), torch.tensor(d["labels"])
        sums.append(F.cross_entropy(ref(ids)[0, :-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
    loss = sum(sums) / sum(counts) if loss_mean == "batch" else sum(s / n for s, n in zip(sums, counts)) / len(dataset)
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in ref.parameters() if p.requires_grad]).norm().item()

    args = loop.TrainSettings(lr=0.0, weight_decay=0.0, warmup_ratio=0.0, grad_clip=1e9, batch_size=4,
                               micro_batch_size=micro,
                               max_steps=1, epochs=1, seed=0, save_every=100, resume=False, stop_after=None,
                               loss_mean=loss_mean)
    logged = loop.train(fresh(), dataset, args, world["tmp"] / f"{loss_mean}-{micro}", pad_id=0)[0]
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_merged_bf16_evaluation_is_the_released_path(world, tmp_path):
    """--eval-merged: the released evaluation loads the base in bf16 and merges the adapter with its bundled peft
    0.9.0, whose LoRA layers take the bf16 base's dtype (lora/layer.py: update_layer casts the layer, get_delta_weight
    computes (B @ A) * scaling in that dtype, merge adds it to the weight in place). Our merged weights equal that
    arithmetic written out here, and the logits equal transformers' on the merged weights."""
    from eval import load_for_eval
    from lora import save_lora

    torch.manual_seed(0)
    trained = add_lora(load_model(world["old"]), r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj"], verbose=False)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_lora(trained, tmp_path / "ad", base_model_name_or_path=world["old"])
    ours = load_for_eval(world["new"], tmp_path / "ad", "cpu", merged=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(world["new"], dtype=torch.bfloat16).eval()
    ref = hf.state_dict()
    lora = trained.state_dict()
    for name, p in ours.named_parameters():
        if ".lora_" in name:  # merged: the LoRA weights no longer act
            continue
        key = name.replace(".base_layer.", ".")
        expected = ref[key]
        if name.endswith(".base_layer.weight"):
            a, b = (lora[name.replace("base_layer.weight", f"lora_{x}.weight")].to(torch.bfloat16) for x in "AB")
            expected = expected + (b @ a) * 2.0  # every step in bf16: the product, the scaling, the sum
        assert p.dtype == torch.bfloat16 and torch.equal(p, expected), name
    with torch.no_grad():
        hf.load_state_dict({name.replace(".base_layer.", "."): p for name, p in ours.state_dict().items()
                            if ".lora_" not in name}, strict=False)
    ids = torch.tensor([load_tokenizer(world["new"]).encode(eval_prompt(QUESTIONS[0][0]))])
    with torch.no_grad():
        assert torch.allclose(ours(ids).float(), hf(ids).logits.float(), atol=2e-2)
    assert not torch.equal(ours.model.layers[0].self_attn.q_proj.base_layer.weight,
                           load_model(world["new"], dtype=torch.bfloat16).model.layers[0].self_attn.q_proj.weight)


def test_as_released_switch_trains_bf16_with_micro_batch_means_and_merges(world):
    out = world["tmp"] / "released"
    train.main(run_args(world, out, "--max-steps", "2", "--as-released", "--loss-mean", "batch"))
    stored = json.loads((out / "args.json").read_text())
    assert (stored["peft_dtype"], stored["loss_mean"], stored["eval_merged"]) == ("bfloat16", "batch", True)  # an explicit flag wins
    for t in load_file(out / "adapter" / "adapter_model.safetensors").values():  # saved as float32, trained in bf16
        assert torch.equal(t, t.bfloat16().float())
    state = torch.load(out / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.bfloat16}
    results = json.loads((out / "results.json").read_text())
    assert results["eval_merged"] and results["gsm8k"]["transfer_new"]["total"] == 3


MATH_RECORDS = [  # MetaMath's spelling of MATH's test problems (instruction / output), written here
    ("What is $1 + 2$?", "We add: $1 + 2 = \\boxed{3}$."),
    ("What is $\\frac{1}{2} \\cdot 4$?", "$\\frac{1}{2} \\cdot 4 = \\boxed{2}$."),
    ("Simplify $\\sqrt{4}$.", "Since $2^2 = 4$, $\\sqrt{4} = \\boxed{2}$."),
    ("What is $2^3$?", "The cube of 2 is 8, with no box."),  # the official extraction finds no gold here
]


def test_math_beside_gsm8k_end_to_end(world, capsys):
    """--eval-data GSM8K,MATH: both evaluated on both bases, one results.json entry per task with both scorers, one
    per-example file per task and base; a MATH solution without \\boxed named in one warning before decoding and
    scored wrong, as the official code scores it."""
    math_file = world["tmp"] / "MATH_test.jsonl"
    math_file.write_text("".join(json.dumps({"instruction": q, "output": s}) + "\n" for q, s in MATH_RECORDS))
    out = world["tmp"] / "both"
    train.main(run_args(world, out, "--max-steps", "2", "--eval-data", f"{world['data']},{math_file}", "--eval-limit", "4"))
    printed = capsys.readouterr().out
    assert "1 MATH solution(s) without a \\boxed answer" in printed and "MATH_test.jsonl, line 4" in printed
    assert printed.index("without a \\boxed") < printed.index("run directory")  # before any compute
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["gsm8k", "math"]
    for task, n in (("gsm8k", 4), ("math", 4)):
        for setting in ("source_old", "transfer_new"):
            r = results[task][setting]
            assert r["task"] == task and r["total"] == n and {"accuracy_official", "accuracy_lenient"} <= set(r)
    records = [json.loads(line) for line in (out / "eval-new-math.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in records] == ["3", "2", "2", None]
    assert not records[3]["correct_official"] and not records[3]["correct_lenient"]
    assert (out / "eval-old-gsm8k.jsonl").exists() and (out / "eval-old-math.jsonl").exists()
    assert "MATH accuracy" in printed and "GSM8K exact match" in printed  # the final table shows every task


def test_new_tokens_default_per_task_and_as_released_evaluates_both(world, monkeypatch):
    """--max-new-tokens unset: 1,024 for GSM8K and 2,048 for MATH, as the released scripts decode; --as-released
    evaluates both sets and sets every released choice, each flag given explicitly still winning."""
    asked = []

    def fake_evaluate(model, tokenizer, examples, max_new_tokens, *args, task, **kwargs):
        asked.append((task, max_new_tokens))
        return {"task": task, "scorer": "official", "accuracy": 0.0, "correct": 0, "total": len(examples),
                "accuracy_official": 0.0, "accuracy_lenient": 0.0}

    monkeypatch.setattr(experiment, "evaluate", fake_evaluate)
    math_file = world["tmp"] / "MATH_test.jsonl"
    math_file.write_text("".join(json.dumps({"problem": q, "solution": s}) + "\n" for q, s in MATH_RECORDS[:2]))
    argv = run_args(world, world["tmp"] / "n", "--max-steps", "1")
    i = argv.index("--max-new-tokens")
    del argv[i : i + 2]
    train.main(argv + ["--eval-data", f"{world['data']},{math_file}"])
    assert sorted(set(asked)) == [("gsm8k", 1024), ("math", 2048)]
    released = train.parse_args(["--old", "a", "--new", "b", "--as-released"])
    assert (released.eval_data, released.eval_merged, released.peft_dtype, released.loss_mean) == (
        "gsm8k,math", True, "bfloat16", "micro-batch")
    explicit = train.parse_args(["--old", "a", "--new", "b", "--as-released", "--no-eval-merged", "--eval-data", "math",
                                 "--peft-dtype", "float32", "--loss-mean", "batch"])
    assert (explicit.eval_data, explicit.eval_merged, explicit.peft_dtype, explicit.loss_mean) == (
        "math", False, "float32", "batch")


@pytest.mark.slow
def test_decoding_2048_new_tokens_at_the_gpu_checks_batch_sizes_equals_rows_alone(world):
    """The MATH evaluation decodes up to 2,048 new tokens, the longest decode of the experiment: at the GPU check's
    batch sizes (16 and 64) the preallocated cache holds prompt + 2,048 positions, and every row decodes what it
    decodes alone (no stop string, so every row runs the whole length)."""
    model, tok = load_model(world["old"]).eval(), load_tokenizer(world["old"])
    tok.stop_ids = set()  # no end id either: every row decodes all 2,048 tokens
    prompts = [eval_prompt(q) * (1 + i % 3) for i, (q, _) in enumerate(QUESTIONS * 11)][:64]  # unequal lengths
    for batch in (16, 64):
        batched = generate(model, tok, prompts[:batch], max_new_tokens=2048, batch_size=batch, stop_strings=[])
        for i in (0, batch // 2, batch - 1):
            alone = generate(model, tok, [prompts[i]], max_new_tokens=2048, batch_size=1, stop_strings=[])[0]
            assert batched[i] == alone, (batch, i)


def test_layer_drops_change_from_step_to_step(world):
    """reseed_drops seeds the drop generator from (seed, step): the drop pattern differs between steps (a seed that
    stayed the same would drop the same layers every step) and is the same for every micro-batch of a step."""
    from transpeft import apply_transpeft

    torch.manual_seed(0)
    model = apply_transpeft(add_lora(load_model(world["old"]), r=2, alpha=4, targets=["q_proj"], verbose=False),
                            p_cross=0.5, seed=0)
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    forwards = []
    real_forward = model.forward

    def counting(*a, **k):
        ran.clear()
        out = real_forward(*a, **k)
        forwards.append(tuple(ran))
        return out

    model.forward = counting
    from data import load_examples, tokenize_dataset
    dataset, _ = tokenize_dataset(load_examples(world["data"]), load_tokenizer(world["old"]), 320)
    settings = loop.TrainSettings(lr=1e-2, batch_size=2, micro_batch_size=1, max_steps=8, seed=0, save_every=100)
    loop.train(model, dataset, settings, world["tmp"] / "drops", pad_id=0)
    steps = [forwards[i : i + 2] for i in range(0, len(forwards), 2)]  # two micro-batches a step
    assert all(a == b for a, b in steps) and len({s[0] for s in steps}) > 1


def test_merged_evaluation_uses_each_base_for_its_own_setting(world, monkeypatch):
    """--eval-merged: the source accuracy comes from the adapter merged into --old, the transfer from --new."""
    loaded = []
    real = experiment.model_for_eval

    def recording(base, adapter_dir, args):
        loaded.append((base, Path(adapter_dir).name))
        return real(base, adapter_dir, args)

    monkeypatch.setattr(experiment, "model_for_eval", recording)
    train.main(run_args(world, world["tmp"] / "m", "--max-steps", "1", "--eval-merged"))
    assert loaded == [(world["old"], "adapter"), (world["new"], "adapter")]


def test_a_row_that_stops_early_decodes_as_it_does_alone(world):
    """A stop string that one row's completion reaches early and the other's does not: the batch decodes each row as
    it decodes alone, the stopped row cut there, the other running on."""
    model, tok = load_model(world["old"]).eval(), load_tokenizer(world["old"])
    candidates = [q for q, _ in QUESTIONS] + ["The answer is", "Response:", "12 + 7 = 19"]
    free = dict(zip(candidates, generate(model, tok, candidates, max_new_tokens=12, batch_size=1, stop_strings=[])))
    # two prompts and a stop string that the first one's completion reaches early and the second one's never does
    prompts, stop = next(([a, b], free[a][i : i + 3]) for a in candidates for b in candidates
                         for i in range(1, len(free[a]) - 6) if free[a][i : i + 3] not in free[b])
    free = [free[p] for p in prompts]
    alone = [generate(model, tok, [p], max_new_tokens=12, batch_size=1, stop_strings=[stop])[0] for p in prompts]
    assert len(alone[0]) < len(free[0]) and alone[1] == free[1]  # one row stopped, the other did not
    assert generate(model, tok, prompts, max_new_tokens=12, batch_size=2, stop_strings=[stop]) == alone
