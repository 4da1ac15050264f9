"""toy.py, study.py, arms.py, report.py and stats.py: the task's answers are right by construction, the toy checkpoints are ordinary HF checkpoints
that transformers loads with our logits, a reduced toy study runs end to end, and the study's statistics match hand
calculations."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import arms as arms_lib
import report
import rundir
import stats
import study
import toy
import train
from data import gsm8k_response, tokenize_example
from scoring import gold_answer, is_correct
from bases import load_model, load_tokenizer
from transpeft import ffn_gradient

ALL = arms_lib.select_arms(["all"])  # the toy study's --arms all, the upper bound last
QUICK = {"v1": {**toy.RECIPE["v1"], "steps": 20}, "v2": {**toy.RECIPE["v2"], "steps": 5}}


@pytest.mark.parametrize("update_seed", [0, 1])
def test_task_answers_are_correct_by_construction(update_seed):
    world = toy.make_world(update_seed)
    train_set, test_set = toy.task(world)
    changed = [e for e in world["prices_v1"] if world["prices_v1"][e] != world["prices_v2"][e]]
    assert len(changed) == toy.N_CHANGED and len(world["prices_v2"]) == toy.N_OLD + toy.N_NEW
    for split, entities in ((train_set, toy.TASK_TRAIN), (test_set, toy.TASK_TEST)):
        for ex in split:
            name, qty, entity = re.fullmatch(r"(\w+) buys (\d+) (e\d+) \. how many coins \?", ex["question"]).groups()
            assert int(entity[1:]) in entities and entity not in changed
            # the same gold on both bases: the price is one the update leaves alone
            assert gold_answer(ex["answer"]) == int(qty) * world["prices_v1"][entity] == int(qty) * world["prices_v2"][entity]
            assert is_correct(gsm8k_response(ex["answer"]), ex["answer"])
    assert not {e["question"] for e in train_set} & {e["question"] for e in test_set}


def test_toy_checkpoints_load_in_transformers_with_our_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    v1, v2 = toy.build_bases(update_seed=0, recipe=QUICK, root=tmp_path)
    tok = load_tokenizer(v1)
    text = "ann buys 3 e12 . the price of e12 is 7 . so ann pays 3 * 7 = 21 coins ."
    assert tok.decode(tok.encode(text)) == text and "<unk>" not in tok.decode(tok.encode(text), skip_special_tokens=False)
    example = tokenize_example(toy.task(toy.make_world(0))[0][0], tok, 128, prompt_fn=toy.train_prompt)  # no unknown words
    assert example is not None and tok.token_to_id("<unk>") not in example["input_ids"]
    ids = torch.tensor([tok.encode(text)])
    for path in (v1, v2):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            assert (load_model(path)(ids) - hf(ids).logits).abs().max() <= 1e-4
    ours_v1, ours_v2 = load_model(v1), load_model(v2)
    assert any(not torch.equal(a, b) for a, b in zip(ours_v1.parameters(),
                                                     ours_v2.parameters()))  # the update moved weights


@pytest.mark.parametrize("regime,trained", [("ffn", ".mlp."), ("attn", ".self_attn.")])
def test_an_update_regime_changes_its_parts_only_byte_for_byte(tmp_path, regime, trained):
    v1, v2 = toy.build_bases(update_seed=0, recipe=QUICK, root=tmp_path, regime=regime)
    assert v2.endswith(f"toy-v2-{regime}-u0")
    before, after = load_file(f"{v1}/model.safetensors"), load_file(f"{v2}/model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        if trained in name:
            assert not torch.equal(before[name], after[name]), name  # every projection of the regime moved
        else:
            assert torch.equal(before[name], after[name]), name  # norms, embeddings and the other block: unchanged


def test_a_deeper_world_is_built_under_its_own_names_beside_the_default(tmp_path, monkeypatch):
    """--layers N: the same world at another depth, its bases under toy<N>-..., found by their aliases, toy-v1
    pretrained in proportion to the depth beyond the default's (6 layers: 1.5 times the steps); the default world
    keeps its names and recipe and is not rebuilt by the other."""
    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path))
    four = toy.build_bases(update_seed=0, recipe=QUICK)
    stamp = (Path(four[0]) / "model.safetensors").stat().st_mtime_ns
    v1, v2 = toy.build_bases(update_seed=1, recipe=QUICK, regime="ffn", layers=6)
    assert [Path(p).name for p in four] == ["toy-v1", "toy-v2"] and toy.update_name(2, "attn") == "toy-v2-attn-u2"
    assert (Path(v1).name, Path(v2).name) == ("toy6-v1", "toy6-v2-ffn-u1")
    for name, layers in (("toy6-v1", 6), ("toy6-v2-ffn-u1", 6), ("toy-v1", 4)):
        assert json.loads((tmp_path / name / "config.json").read_text())["num_hidden_layers"] == layers
        assert len(load_model(name).model.layers) == layers  # the alias resolves to the cache
    steps = {name: json.loads((tmp_path / name / "toy_recipe.json").read_text())["steps"]
             for name in ("toy-v1", "toy6-v1")}
    assert steps == {"toy-v1": QUICK["v1"]["steps"], "toy6-v1": 1.5 * QUICK["v1"]["steps"]}
    toy.build_bases(update_seed=0, recipe=QUICK)
    assert (Path(four[0]) / "model.safetensors").stat().st_mtime_ns == stamp  # still the cached one


def test_the_recipe_and_depth_flags_are_checked_where_they_are_parsed(capsys):
    assert train.parse_args(["--recipe", "lr=2e-3,steps=1000"]).recipe == {"lr": 2e-3, "steps": 1000}
    assert train.parse_args([]).recipe == {} and train.parse_args([]).layers == toy.DEPTH
    assert train.parse_args(["--recipe", "weight_decay=0.1"]).recipe == {"weight_decay": 0.1}
    assert train.parse_args(["--peft", "adapter", "--recipe", "bottleneck=16,lr=1e-2"]).recipe == {"bottleneck": 16,
                                                                                                    "lr": 1e-2}
    for argv, phrase in ((["--recipe", "lr=0"], "lr must be positive"), (["--recipe", "steps=1.5"], "an integer"),
                         (["--recipe", "dropout=1"], "in [0, 1)"), (["--recipe", "targets=q"], "key=value"),
                         (["--recipe", "speed=2"], "key=value"), (["--layers", "0"], "--layers must be in"),
                         (["--old", "a", "--new", "b", "--layers", "8"], "toy study's world"),
                         (["--recipe", "weight_decay=-1"], "at least 0"),
                         (["--peft", "adapter", "--recipe", "r=16"], "bottleneck"),  # an adapter has no rank
                         (["--recipe", "bottleneck=16"], "key=value")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert phrase in capsys.readouterr().err


@pytest.mark.parametrize("peft", ["lora", "dora", "adapter"])
def test_each_peft_kind_is_trained_with_the_recipe_it_was_given(hf_checkpoint, tmp_path, monkeypatch, peft):
    """study.toy_module: the module of the recipe's kind, the optimiser's settings from the recipe (weight_decay, a
    --recipe extra, included), control B's dropout on a LoRA; the training itself is replaced by a recorder."""
    path, _ = hf_checkpoint("qwen2")
    seen = {}

    def record(model, dataset, settings, run_dir, pad_id, desc):
        seen["settings"], seen["model"] = settings, model
        return [{"loss": 0.0}]

    monkeypatch.setattr(study, "train", record)
    recipe = {**study.toy_recipe(peft), "steps": 7, "lr": 3e-3, "weight_decay": 0.25}
    study.toy_module({"key": "plain"}, {"p_intra": 0.0, "p_cross": 0.0, "p_attn": 0.0, "lora_dropout": 0.4}, 0,
                     str(path), [], type("Tokenizer", (), {"pad_token_id": 0})(), tmp_path, recipe)
    s = seen["settings"]
    assert (s.max_steps, s.lr, s.weight_decay) == (7, 3e-3, 0.25)
    kinds = {type(m).__name__ for m in seen["model"].modules()}
    if peft == "adapter":
        assert "Adapter" in kinds and "LoRALinear" not in kinds
        assert (tmp_path / "adapter" / "bottleneck_adapter.json").exists()
    else:
        assert ("DoRALinear" in kinds) == (peft == "dora")
        assert {m.dropout.p for m in seen["model"].modules() if hasattr(m, "lora_A")} == {0.4}
        assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_adaptive_rates_follow_the_layers_drift_and_keep_the_mean():
    assert arms_lib.adaptive_rates(0.2, [1.0, 3.0]) == pytest.approx([0.1, 0.3])
    rates = arms_lib.adaptive_rates(0.1, [0.2, 0.1, 0.4, 0.3])
    assert sum(rates) / 4 == pytest.approx(0.1) and rates == pytest.approx([0.08, 0.04, 0.16, 0.12])
    assert arms_lib.adaptive_rates(0.5, [0.0, 1.0]) == [0.0, 0.9]  # capped: the mean is then below the rate
    with pytest.raises(ValueError, match="moved the FFN"):
        arms_lib.adaptive_rates(0.1, [0.0, 0.0])


@pytest.mark.slow
def test_the_adaptive_arm_takes_its_rates_from_an_update_no_study_evaluates(tmp_path, monkeypatch, capsys):
    """The adaptive arm trains with p_l = p · m_l / mean(m), m_l = ‖ΔW‖/‖W‖ of layer l's gate, up and down together
    from toy-v1 to the held-out update (computed here from the two checkpoints' files), which is not evaluated."""
    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path / "cache"))
    train.main(["--quick", "--arms", "plain,adaptive", "--seeds", "1", "--regimes", "ffn", "--jobs", "1",
                "--out", str(tmp_path / "study")])
    v1 = load_file(tmp_path / "cache" / "quick" / "toy-v1" / "model.safetensors")
    held = load_file(tmp_path / "cache" / "quick" / f"toy-v2-u{study.ADAPTIVE_UPDATE}" / "model.safetensors")
    moved = []
    for i in range(toy.DEPTH):
        names = [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        moved.append((sum((held[n] - v1[n]).pow(2).sum() for n in names) / sum(v1[n].pow(2).sum() for n in names))
                     .sqrt().item())
    key = json.loads((tmp_path / "study" / "seed0" / "adaptive" / "rows.json").read_text())["key"]["arm"]
    mean = sum(moved) / len(moved)
    assert key["p_intra"] == pytest.approx([0.2 * m / mean for m in moved], rel=1e-5)
    assert key["p_cross"] == pytest.approx([0.1 * m / mean for m in moved], rel=1e-5)
    assert max(moved) > 1.02 * min(moved)  # the layers moved unevenly: the rates do differ
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert set(results["drift"]) == {"toy-v2-ffn-u0"} and "per layer p_intra" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="sets the adaptive arm's rates"):
        train.main(["--quick", "--arms", "plain,adaptive", "--update-seeds", str(study.ADAPTIVE_UPDATE),
                    "--out", str(tmp_path / "bad")])


@pytest.mark.slow
def test_a_study_at_another_depth_and_recipe(tmp_path, monkeypatch, capsys):
    """--layers 2 --recipe steps=3: trained at that depth with that recipe (results and each arm-seed's resume key say
    so), and no published reference beside it (the published study ran the default world and recipe)."""
    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path / "cache"))
    train.main(["--quick", "--layers", "2", "--recipe", "steps=3", "--seeds", "1", "--arms", "plain,drop",
                "--regimes", "ffn,attn", "--jobs", "1", "--out", str(tmp_path / "deep")])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "deep" / "results.json").read_text())
    assert results["recipe"]["steps"] == 3 and set(results["drift"]) == {"toy2-v2-ffn-u0", "toy2-v2-attn-u0"}
    key = json.loads((tmp_path / "deep" / "seed0" / "drop" / "rows.json").read_text())["key"]
    assert key["recipe"]["steps"] == 3 and key["bases"][0]["from"]["config"]["num_hidden_layers"] == 2
    assert (tmp_path / "deep" / "seed0" / "drop" / "eval-toy2-v1.jsonl").exists()
    assert "published (" not in printed and "source (toy2-v1)" in (tmp_path / "deep" / "report.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["adapter", "dora"])
def test_a_toy_study_of_another_peft_kind(tmp_path, monkeypatch, capsys, peft):
    """--peft adapter / dora: every arm trains that kind of module (saved in its own format), the module moved to the
    update is the one trained (loaded back on toy-v1 it answers as the source evaluation did), no published reference
    (a LoRA study's) is printed beside it, and control B, LoRA's dropout, is refused for an adapter, which has none."""
    import eval as eval_lib

    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / peft
    train.main(["--quick", "--peft", peft, "--seeds", "1", "--arms", "plain,both", "--regimes", "ffn", "--jobs", "1",
                "--out", str(out)])
    assert "published (" not in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == json.loads(json.dumps({**study.toy_recipe(peft), "steps": 6}))
    assert results["arms"][0]["name"] == f"plain {arms_lib.PEFT_NAMES[peft]}"
    saved = out / "seed0" / "both" / "adapter"
    if peft == "adapter":
        assert json.loads((saved / "bottleneck_adapter.json").read_text())["bottleneck"] == 8
        assert not (saved / "adapter_config.json").exists()
    else:
        assert json.loads((saved / "adapter_config.json").read_text())["use_dora"] is True
    v1 = tmp_path / "cache" / "quick" / "toy-v1"
    tokenizer, _, test, _ = study.toy_data(str(v1), results["recipe"], quick=True)
    eval_lib.evaluate(eval_lib.attach_peft(load_model(v1), saved), tokenizer, test, max_new_tokens=24,
                      batch_size=len(test), out_jsonl=tmp_path / "again.jsonl")
    completions = [[json.loads(line)["completion"] for line in path.read_text().splitlines()]
                   for path in (tmp_path / "again.jsonl", out / "seed0" / "both" / "eval-toy-v1.jsonl")]
    assert completions[0] == completions[1]
    if peft == "adapter":
        for arms in ("plain,lora_dropout", "plain,lora_dropout@0.5"):
            with pytest.raises(SystemExit, match="a bottleneck adapter has none"):
                train.main(["--quick", "--peft", "adapter", "--arms", arms, "--out", str(tmp_path / "bad")])
        assert "lora_dropout" not in [a["key"] for a in arms_lib.select_arms(None, "adapter")]


@pytest.mark.slow
def test_reduced_toy_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path / "cache"))
    train.main(["--quick", "--seeds", "2", "--arms", "all", "--out", str(tmp_path / "study")])
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    regimes = ["full", "ffn", "attn"]
    # every arm of every seed, on every update; the upper bound trained on the first update itself
    assert sorted({(r["arm"], r["seed"], r["regime"]) for r in results["rows"]}) == sorted(
        [(a["key"], s, g) for a in ALL[:-1] for s in (0, 1) for g in regimes] + [("refit", s, "full") for s in (0, 1)])
    assert list(results["summary"]["regimes"]) == regimes
    for regime in regimes:
        arms = results["summary"]["regimes"][regime]["arms"]
        assert set(arms) == {a["key"] for a in ALL} - ({"refit"} if regime != "full" else set())
        assert arms["mask"]["itt"]["n"] == 2
        assert 0 <= arms["mask"]["itt"]["p_holm"] <= 1
    assert results["summary"]["comparisons"] == (len(ALL) - 2) * len(regimes) + 1
    assert set(results["drift"]) == {"toy-v2", "toy-v2-ffn-u0", "toy-v2-attn-u0"}
    assert all(layer["attn_weight"] == 0 for layer in results["drift"]["toy-v2-ffn-u0"])  # the FFN-only update
    # every trained arm wrote a PEFT adapter and per-example evaluations; the upper bound one per update
    arm_dir = tmp_path / "study" / "seed1" / "drop"
    assert (arm_dir / "adapter" / "adapter_config.json").exists() and (arm_dir / "eval-toy-v2-attn-u0.jsonl").exists()
    assert (tmp_path / "study" / "seed1" / "refit" / "toy-v2" / "adapter" / "adapter_config.json").exists()
    if report.pyplot() is not None:
        assert (tmp_path / "study" / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "study" / "report.txt").read_text()
    assert "regime contrast" in text and "drift of each update" in text
    with pytest.raises(SystemExit, match="already holds a finished study"):
        train.main(["--quick", "--seeds", "2", "--out", str(tmp_path / "study")])
    # without --arms: every arm but the two run on request only (masking alone and the upper bound)
    train.main(["--quick", "--seeds", "1", "--out", str(tmp_path / "default")])
    results = json.loads((tmp_path / "default" / "results.json").read_text())
    assert [a["key"] for a in results["arms"]] == ["plain", "drop", "both", "attn_mask", "lora_dropout"]
    with pytest.raises(SystemExit, match="Unknown arm"):
        train.main(["--quick", "--arms", "plain,upper", "--out", str(tmp_path / "bad")])


def rows_for(pairs, arm="mask", regime="full", update=0):
    """Study rows of plain LoRA and one arm: pairs = (plain transfer, arm transfer, arm source) per seed."""
    rows = []
    for seed, (plain, other, source) in enumerate(pairs):
        rows += [{"arm": "plain", "seed": seed, "regime": regime, "update_seed": update, "source": 1.0,
                  "transfer": plain},
                 {"arm": arm, "seed": seed, "regime": regime, "update_seed": update, "source": source,
                  "transfer": other}]
    return rows


def test_study_summary_intention_to_treat_by_hand():
    """Primary: every seed, learned or not, 95% t interval mean ± t(0.975, n-1) SE, worked by hand: differences
    +0.3, +0.1, +0.3 -> mean 0.2333, std 0.11547, SE 0.06667, t(0.975, 2) = 4.303. The sign-flip p: of the 8 sign
    patterns of (0.3, 0.1, 0.3) only (+,+,+) and (-,-,-) reach |mean| 0.2333 ((+,-,+) gives 0.1667): p = 2/8. Secondary:
    seeds 0 and 1 only (seed 2's masked LoRA never learned: source 0.3), t(0.975, 1) = 12.706."""
    table, summary = report.summarize_study(rows_for([(0.2, 0.5, 1.0), (0.4, 0.5, 0.95), (0.6, 0.9, 0.3)]))
    mask = summary["regimes"]["full"]["arms"]["mask"]
    itt = mask["itt"]
    assert itt["n"] == 3 and itt["mean"] == pytest.approx(0.7 / 3)
    assert itt["std"] == pytest.approx(0.11547, abs=1e-5) and itt["ci95"] == pytest.approx(4.303 * 0.11547 / 3**0.5, abs=1e-5)
    assert not itt["excludes_0"] and itt["p"] == pytest.approx(0.25) and itt["p_holm"] == pytest.approx(0.25)  # one comparison
    sub = mask["learned_subset"]
    assert sub["n"] == 2 and sub["mean"] == pytest.approx(0.2) and sub["ci95"] == pytest.approx(12.706 * 0.1 * 2**0.5 / 2**0.5)
    assert summary["arms"]["mask"]["learned"] == 2 and summary["arms"]["mask"]["source"][0] == pytest.approx(2.25 / 3)
    assert mask["transfer"][0] == pytest.approx((0.5 + 0.5 + 0.9) / 3)
    # under 5 seeds a table gives the direction per seed, not an interval (here half-width 0.29; with 2 seeds 12.7 SE)
    assert "+0.23, better on 3 of 3 seeds" in table and "± 0.29" not in table
    many = report.summarize_study(rows_for([(0.2, 0.5, 1.0), (0.4, 0.5, 0.95), (0.6, 0.9, 0.3)] * 2))[0]
    assert "+0.23 ± 0.11 p 0.03 *" in many  # 6 seeds: the interval, 2.571 * 0.10328 / 6**0.5; p = 2/64


def test_study_summary_counts_seeds_not_update_pairs():
    """Every update seed of a regime evaluates the same trained LoRA of a seed: a seed's differences are averaged,
    and the standard error is over seeds (two here), not over the four (update, seed) pairs."""
    rows = rows_for([(0.2, 0.5, 1.0), (0.4, 0.5, 1.0)], update=0) + rows_for([(0.3, 0.8, 1.0), (0.5, 0.8, 1.0)], update=1)
    _, summary = report.summarize_study(rows)
    itt = summary["regimes"]["full"]["arms"]["mask"]["itt"]
    per_seed = [(0.3 + 0.5) / 2, (0.1 + 0.3) / 2]
    assert itt["n"] == 2 and itt["mean"] == pytest.approx(sum(per_seed) / 2)
    assert itt["se"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5 / 2**0.5)


def test_study_summary_is_per_regime_with_holm_over_every_comparison():
    """ffn: differences +0.1, +0.2, +0.3, +0.4: only the all-plus and all-minus of 16 sign patterns reach the mean,
    p = 2/16; attn: differences summing to 0, p = 1. Holm over the two: 2 * 0.125 = 0.25, then max(0.25, 1)."""
    rows = rows_for([(0.2, 0.3, 1.0), (0.2, 0.4, 1.0), (0.2, 0.5, 1.0), (0.2, 0.6, 1.0)], regime="ffn")
    rows += rows_for([(0.2, 0.1, 1.0), (0.4, 0.5, 1.0), (0.6, 0.6, 1.0)], regime="attn")
    _, summary = report.summarize_study(rows)
    ffn, attn = summary["regimes"]["ffn"]["arms"]["mask"]["itt"], summary["regimes"]["attn"]["arms"]["mask"]["itt"]
    assert ffn["mean"] == pytest.approx(0.25) and attn["mean"] == pytest.approx(0.0) and summary["comparisons"] == 2
    assert (ffn["p"], ffn["p_holm"]) == (pytest.approx(0.125), pytest.approx(0.25))
    assert (attn["p"], attn["p_holm"]) == (pytest.approx(1.0), pytest.approx(1.0))


def test_regime_contrast_by_hand():
    """The paper's prediction as one number per arm and seed: c = Δ(ffn update) − Δ(attn update). dropping: Δffn 0.3,
    0.2, 0.4 and Δattn 0.0, 0.1, −0.1, so c = 0.3, 0.1, 0.5: mean 0.3, std 0.2, t(0.975, 2) = 4.303; of the 8 sign
    patterns only all-plus and all-minus reach |mean| 0.3, p = 2/8. Control A: c = 0 on every seed, p = 1. Holm over
    the two arms: 2 * 0.25, then 1."""
    rows = rows_for([(0.2, 0.5, 1.0), (0.2, 0.4, 1.0), (0.2, 0.6, 1.0)], arm="drop", regime="ffn")
    rows += rows_for([(0.5, 0.5, 1.0), (0.5, 0.6, 1.0), (0.5, 0.4, 1.0)], arm="drop", regime="attn")
    rows += [r for r in rows_for([(0.2, 0.2, 1.0)] * 3, arm="attn_mask", regime="ffn") if r["arm"] != "plain"]
    rows += [r for r in rows_for([(0.5, 0.5, 1.0)] * 3, arm="attn_mask", regime="attn") if r["arm"] != "plain"]
    table, summary = report.summarize_study(rows)
    drop, control = summary["regime_contrast"]["drop"], summary["regime_contrast"]["attn_mask"]
    assert drop["n"] == 3 and drop["mean"] == pytest.approx(0.3) and drop["std"] == pytest.approx(0.2)
    assert drop["ci95"] == pytest.approx(4.303 * 0.2 / 3**0.5)
    assert (drop["p"], drop["p_holm"]) == (pytest.approx(0.25), pytest.approx(0.5))
    assert (control["mean"], control["p"], control["p_holm"]) == (pytest.approx(0.0), pytest.approx(1.0), pytest.approx(1.0))
    assert "plain" not in summary["regime_contrast"] and "regime contrast" in table
    assert report.summarize_study(rows_for([(0.2, 0.5, 1.0), (0.4, 0.5, 1.0)]))[1]["regime_contrast"] == {}  # full only


def test_sign_flip_holm_and_spearman_by_hand():
    assert stats.sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # only all-plus and all-minus reach |mean| 0.2
    assert stats.sign_flip_p([0.1, -0.1]) == pytest.approx(1.0)
    # Holm: sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # Spearman: ranks (1,2,3,4) vs (1,3,2,4): 1 - 6 * 2 / (4 * 15) = 0.8; ties share their mean rank
    assert stats.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert stats.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)


def test_the_study_bound_correlates_gradient_norms_with_loss_gaps():
    rows = []
    for seed, (g, gap) in enumerate([(0.1, 0.01), (0.2, 0.03), (0.3, 0.02), (0.4, 0.05)]):
        for arm in ("plain", "drop"):
            rows.append({"arm": arm, "seed": seed, "regime": "ffn", "update_seed": 0, "source": 1.0, "transfer": 0.5,
                         "ffn_grad_norm": g * (2 if arm == "drop" else 1), "loss_old": 1.0, "loss_new": 1.0 + gap})
    _, summary = report.summarize_study(rows)
    bound = summary["regimes"]["ffn"]["bound"]
    assert bound["arms"]["plain"]["grad_norm"] == pytest.approx(0.25) and bound["arms"]["drop"]["grad_norm"] == pytest.approx(0.5)
    assert bound["arms"]["plain"]["loss_gap"] == pytest.approx(0.0275)
    g = [r["ffn_grad_norm"] for r in rows]
    assert bound["n"] == 8 and bound["spearman"] == pytest.approx(stats.spearman(g, [r["loss_new"] - 1 for r in rows]))
    assert bound["n_learned"] == 8 and bound["spearman_learned"] == pytest.approx(bound["spearman"])
    # the arm-seeds that did not learn the task (source below report.LEARNED) are left out of the second ρ only
    for r in rows[:3]:
        r["source"] = 0.5
    bound = report.summarize_study(rows)[1]["regimes"]["ffn"]["bound"]
    assert bound["n"] == 8 and bound["n_learned"] == 5
    assert bound["spearman_learned"] == pytest.approx(stats.spearman(g[3:], [r["loss_new"] - 1 for r in rows[3:]]))


def test_chart_draws_the_gains(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    _, summary = report.summarize_study(rows_for([(0.2, 0.5, 1.0), (0.4, 0.5, 1.0), (0.6, 0.9, 1.0)]))
    assert report.chart(summary, tmp_path / "study.png")
    chart = plt.imread(tmp_path / "study.png")[..., :3]  # (H, W, 3) floats in [0, 1]
    grey = (abs(chart - 0.7) < 0.01).all(-1)
    assert grey.any()  # the gain's bar (grey: not beyond noise)


def test_spearman_with_ties_in_one_variable_only():
    # x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4): deviations (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 0.5, 1.5),
    # covariance 4.5, variances 4.5 and 5: rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9 ** 0.5)
    assert stats.spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(0.9 ** 0.5)


def bound_rows(points):
    """One plain-LoRA row per (G, L_old, L_new), a seed each."""
    return [{"arm": "plain", "seed": s, "regime": "ffn", "update_seed": 0, "source": 1.0, "transfer": 0.5,
             "ffn_grad_norm": g, "loss_old": old, "loss_new": new} for s, (g, old, new) in enumerate(points)]


def test_the_loss_gap_is_absolute_and_no_rank_correlation_from_two_points():
    bound = report.bound_summary(bound_rows([(0.1, 1.0, 0.8), (0.2, 1.0, 1.3)]), ["plain"])
    assert bound["arms"]["plain"]["loss_gap"] == pytest.approx((0.2 + 0.3) / 2)  # |0.8 - 1.0| counts as 0.2
    assert "spearman" not in bound  # two points always rank as +1 or -1: nothing to report
    bound = report.bound_summary(bound_rows([(0.1, 1.0, 0.8), (0.2, 1.0, 1.3), (0.3, 1.0, 1.1)]), ["plain"])
    # gaps 0.2, 0.3, 0.1 rank 2, 3, 1 against G 1, 2, 3: d = 1, 1, -2, rho = 1 - 6 * 6 / (3 * 8) = -0.5
    assert bound["n"] == 3 and bound["spearman"] == pytest.approx(-0.5)


def test_the_arms_the_docs_name():
    # docs/toy-study.md: masking alone and the upper bound run on request; --arms all adds them (not "transpeft",
    # which at the default flags repeats "drop")
    assert [a["key"] for a in arms_lib.select_arms(None)] == ["plain", "drop", "both", "attn_mask", "lora_dropout"]
    assert [a["key"] for a in arms_lib.select_arms(["all"])] == ["plain", "mask", "drop", "both", "attn_mask",
                                                              "adaptive", "lora_dropout", "refit"]


def test_an_arm_at_another_rate():
    """<arm>@<rate>: every rate the arm sets, at that rate, placed after its arm; names say the rate."""
    arms = arms_lib.select_arms(["plain", "drop@0.05", "both@0.2", "lora_dropout@0.5", "drop"])
    assert [a["key"] for a in arms] == ["plain", "drop", "drop@0.05", "both@0.2", "lora_dropout@0.5"]
    settings = {a["key"]: arms_lib.arm_settings(a) for a in arms}
    assert settings["drop@0.05"] == {"p_intra": 0.0, "p_cross": 0.05, "p_attn": 0.0}
    assert settings["both@0.2"] == {"p_intra": 0.2, "p_cross": 0.2, "p_attn": 0.0}
    assert settings["lora_dropout@0.5"]["lora_dropout"] == 0.5
    assert [a["name"] for a in arms][2:] == ["Trans-PEFT dropping (p_cross 0.05)", "Trans-PEFT masking + dropping (0.2)",
                                             "control B: LoRA dropout 0.5"]
    # an arm that sets two rates, one each, in rate_keys order: the paper's matched pairs
    pair = arms_lib.select_arms(["plain", "both@0.2/0.1"])[1]
    assert arms_lib.arm_settings(pair) == {"p_intra": 0.2, "p_cross": 0.1, "p_attn": 0.0}
    assert pair["name"] == "Trans-PEFT masking + dropping (0.2/0.1)"
    for bad in ("plain@0.1", "refit@0.1", "drop@1.5", "drop@x", "nosuch@0.1", "drop@0.1/0.2", "both@0.1/0.2/0.3",
                "both@0.1/"):
        with pytest.raises(ValueError, match="a dose is <arm>@<rate>"):
            arms_lib.select_arms([bad])


def test_an_interrupted_toy_study_is_continued_with_resume():
    args = train.parse_args(["--seeds", "4", "--out", "runs/x"])
    message = rundir.interrupted(args, ["--seeds", "4", "--out", "runs/x", "--overwrite"], Path("runs/x"))
    assert message.endswith("python train.py --seeds 4 --out runs/x --resume")


@pytest.mark.slow
def test_toy_study_side_by_side_and_resumed_gives_the_same_rows(tmp_path, monkeypatch):
    """--jobs 2 (two processes, one thread each) and a study resumed after losing arm-seeds, with more seeds added,
    give the rows of one uninterrupted run one arm-seed at a time; a finished arm-seed is not trained again unless
    what it depends on changed."""
    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path / "cache"))
    quick = ["--quick", "--arms", "plain,drop@0.2", "--regimes", "full,ffn"]
    train.main([*quick, "--seeds", "3", "--out", str(tmp_path / "one")])
    train.main([*quick, "--seeds", "3", "--jobs", "2", "--out", str(tmp_path / "two")])
    rows = json.loads((tmp_path / "one" / "results.json").read_text())["rows"]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["rows"] == rows
    assert all(r["ffn_grad_norm"] > 0 for r in rows)  # rows that hold real floats, not only zero accuracies

    train.main([*quick, "--seeds", "2", "--out", str(tmp_path / "part")])
    kept = tmp_path / "part" / "seed0" / "plain" / "rows.json"
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "part" / "seed1" / "drop@0.2" / "rows.json").unlink()  # as if killed before this arm-seed ended
    changed = tmp_path / "part" / "seed1" / "plain" / "rows.json"  # a recipe other than this one's: trained again
    record = json.loads(changed.read_text())
    stale = [{**r, "transfer": 9.0} for r in record["rows"]]  # what reusing it would put in the results
    changed.write_text(json.dumps({"key": {**record["key"], "recipe": {**record["key"]["recipe"], "lr": 1}},
                                   "rows": stale}))
    with pytest.raises(SystemExit, match="already holds a finished study.*--resume"):
        train.main([*quick, "--seeds", "3", "--out", str(tmp_path / "part")])
    train.main([*quick, "--seeds", "3", "--resume", "--out", str(tmp_path / "part")])
    assert json.loads((tmp_path / "part" / "results.json").read_text())["rows"] == rows
    assert kept.stat().st_mtime_ns == stamp  # not trained again
    with pytest.raises(SystemExit, match="holds no toy study to continue"):
        train.main([*quick, "--resume", "--out", str(tmp_path / "none")])


@pytest.mark.slow
def test_the_default_prints_no_interval_wider_than_1_and_the_published_study_beside_its_own(tmp_path, monkeypatch,
                                                                                           capsys):
    """The default's form (2 seeds, the default arms) on the quick bases: with too few seeds for an interval it says
    on how many seeds each arm is better; every interval it prints (the published study's) has a half-width <= 1;
    each arm's published transfer and difference, as docs/toy-study-results.json gives them, sit on its line."""
    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path / "cache"))
    train.main(["--quick", "--out", str(tmp_path / "default")])
    printed = capsys.readouterr().out.split("transfer: accuracy on the update", 1)[1]
    widths = [float(w) for w in re.findall(r"± (\d+\.\d+)", printed)]
    assert widths and max(widths) <= 1
    reference = report.published_study()
    assert f"published ({reference['seeds']} seeds)" in printed
    chunks = [c.strip("\n").split("\n", 1) for c in printed.split("\n\n")]
    blocks = {head.split(" update:")[0]: body for head, *body in chunks if " update: " in head for body in body}
    assert set(blocks) == {"full", "ffn", "attn"}
    for regime, block in blocks.items():
        lines = {line.split("  ")[1].strip(): line for line in block.splitlines()[1:-1]}
        for arm in arms_lib.select_arms(None):
            published = reference["regimes"][regime]["arms"][arm["key"]]
            line = lines[arm["name"]]
            assert "better on" in line or arm["key"] == "plain"  # this run: 2 seeds, the direction per seed
            assert f"{published['transfer'][0]:.2f}" in line.split("seeds")[-1]
            if arm["key"] != "plain":
                assert line.endswith(f"{published['itt']['mean']:+.2f} ± {published['itt']['ci95']:.2f} "
                                     f"p {published['itt']['p_holm']:.2f}" + (" *" if published['itt']['p_holm'] < 0.05
                                                                              else ""))
        assert "Published: plain LoRA answers" in block.splitlines()[-1]


def test_the_docs_quote_the_published_study_as_its_file_gives_it():
    """docs/toy-study.md's tables (results, regime contrast, bound, dose response) are the published file's rows
    summarised by the code a run uses (so the docs, the file and a default run's reference cannot drift apart)."""
    docs = (Path(__file__).parent.parent / "docs" / "toy-study.md").read_text()
    published = report.published_study()
    assert report.markdown_table(published) in docs
    for table in (report.markdown_contrast, report.markdown_bound, report.dose_table):
        assert table(published) in docs, table.__name__


def test_publish_gathers_every_arm_seed_of_a_study_directory(tmp_path):
    """report.publish: the rows.json of every arm-seed (from every command run there), in seed, arm and regime order,
    one row per line, and read back by published_study."""
    def row(arm, seed, regime, u):
        return {"arm": arm, "seed": seed, "regime": regime, "update_seed": u, "source": 1.0, "transfer": 0.5,
                "ffn_grad_norm": 0.1, "loss_old": 1.0, "loss_new": 1.5, "final_loss": 0.3}

    rows = {("drop", 1): [row("drop", 1, "attn", 0), row("drop", 1, "ffn", 1), row("drop", 1, "ffn", 0)],
            ("plain", 1): [row("plain", 1, "ffn", 0)], ("plain", 0): [row("plain", 0, "attn", 0)],
            **{(f"drop@{r}", 0): [row(f"drop@{r}", 0, "ffn", 0)] for r in (0.3, 0.05, 0.15, 0.2, 0.01)}}
    for (arm, seed), rs in rows.items():
        (tmp_path / "study" / f"seed{seed}" / arm).mkdir(parents=True)
        (tmp_path / "study" / f"seed{seed}" / arm / "rows.json").write_text(json.dumps({"key": {"arm": {"key": arm}},
                                                                                       "rows": rs}))
    report.publish(tmp_path / "study", ["python train.py ..."], tmp_path / "published.json")
    text = (tmp_path / "published.json").read_text()
    back = json.loads(text)
    doses = ["drop@0.01", "drop@0.05", "drop@0.15", "drop@0.2", "drop@0.3"]  # a family's doses in rate order
    assert back["commands"] == ["python train.py ..."] and back["arms"] == ["plain", "drop", *doses]
    assert [(r["seed"], r["arm"], r["regime"], r["update_seed"]) for r in back["rows"]] == [
        (0, "plain", "attn", 0), *((0, d, "ffn", 0) for d in doses), (1, "plain", "ffn", 0), (1, "drop", "ffn", 0),
        (1, "drop", "ffn", 1), (1, "drop", "attn", 0)]
    assert "final_loss" not in back["rows"][0] and text.count("\n") == 6 + len(back["rows"])
    assert list(report.published_study(tmp_path / "published.json")["arms"]) == ["plain", "drop", *doses]


def test_variance_components_recover_what_built_the_table():
    """d_su = μ + a_s + b_u (no residual): the ANOVA estimators give σ²_resid 0, σ²_seed = the sample variance of a,
    σ²_update = that of b. With normal draws of known variances (0.04, 0.01, 0.02) on 2,000 seeds × 8 update seeds,
    each estimate lies within 15% of its truth, and the half-width the design predicts is the spread of means that
    repeated studies show."""
    a, b = [0.1, -0.2, 0.4, 0.0], [0.05, -0.05, 0.3]
    c = stats.variance_components([[0.5 + x + y for y in b] for x in a])
    assert c["resid"] == pytest.approx(0, abs=1e-12) and c["mean"] == pytest.approx(0.5 + sum(a) / 4 + sum(b) / 3)
    assert c["seed"] == pytest.approx(torch.tensor(a).var().item()) and c["update"] == pytest.approx(
        torch.tensor(b).var().item())
    g = torch.Generator().manual_seed(0)
    seed, update, resid = 0.04, 0.01, 0.02
    d = (seed**0.5 * torch.randn(2000, 1, generator=g) + update**0.5 * torch.randn(1, 8, generator=g)
         + resid**0.5 * torch.randn(2000, 8, generator=g))
    c = stats.variance_components(d.tolist())
    assert c["seed"] == pytest.approx(seed, rel=0.15) and c["resid"] == pytest.approx(resid, rel=0.15)
    # 10 seeds x 2 update seeds per study, 4,000 studies: the 97.5% quantile of |mean - truth| is about the half-width
    # (the update effect b is drawn anew per study too, but half_width leaves it out: drawn at 0 here)
    studies = (seed**0.5 * torch.randn(4000, 10, 1, generator=g) + resid**0.5 * torch.randn(4000, 10, 2, generator=g))
    t_stats = studies.mean((1, 2)).abs() / (studies.mean(2).std(1) / 10**0.5)
    assert (t_stats <= stats.t975(9)).double().mean().item() == pytest.approx(0.95, abs=0.01)
    expected = stats.half_width({"seed": seed, "resid": resid}, 10, 2)
    assert expected == pytest.approx(2.262 * ((seed + resid / 2) / 10) ** 0.5)
    assert studies.mean((1, 2)).abs().quantile(0.95).item() == pytest.approx(expected / 2.262 * 1.96, rel=0.08)
    assert stats.seeds_needed({"seed": seed, "resid": resid}, 2, expected) == 10


def test_dose_response_is_the_change_of_the_regime_contrast_from_the_lowest_rate_to_the_highest():
    """Built so the answer is known: transfer = 0.3 + rate · (k[family][regime] + 0.1 · seed under the FFN-only
    update), the same on both update seeds, plain 0.3. A family's regime contrast at rate r is then
    r · (k_ffn − k_attn + 0.1 · seed), so per seed its change from the lowest rate to the highest is
    (high − low) · (k_ffn − k_attn + 0.1 · seed): over seeds 0-3 the mean is (high − low) · (k_ffn − k_attn + 0.15)
    and the spread (high − low) · 0.1 · std(0..3). Masking + dropping's default (0.1/0.1) is off its line: the line
    starts at both@0.1/0.05."""
    k = {"both": {"ffn": 0.4, "attn": 0.1}, "lora_dropout": {"ffn": 0.2, "attn": 0.3}, "plain": {"ffn": 0, "attn": 0}}
    arms = arms_lib.select_arms(["plain", "both", "both@0.1/0.05", "both@0.3/0.15", "lora_dropout@0.1",
                                 "lora_dropout", "lora_dropout@0.5", "drop"])
    rows = []
    for arm in arms:
        family = arm["key"].split("@")[0]
        rate = arm[arms_lib.rate_keys(arm)[0]] if family != "plain" else 0.0
        for seed in range(4):
            for regime in ("full", "ffn", "attn"):
                for u in (0, 1):
                    slope = k.get(family, {"ffn": 0.5, "attn": 0.5}).get(regime, 0) + 0.1 * seed * (regime == "ffn")
                    rows.append({"arm": arm["key"], "seed": seed, "regime": regime, "update_seed": u, "source": 1.0,
                                 "transfer": 0.3 + rate * slope + (0.9 if arm["key"] == "both" else 0)})
    _, summary = report.summarize_study(rows, arms)
    assert set(summary["dose"]) == {"both", "lora_dropout"}  # drop ran at one rate: no dose response
    d, b = summary["dose"]["both"], summary["dose"]["lora_dropout"]
    assert (d["low"], d["high"], d["rates"]) == ("both@0.1/0.05", "both@0.3/0.15", ["0.1/0.05", "0.3/0.15"])
    assert d["arms"] == ["both", "both@0.1/0.05", "both@0.3/0.15"]
    spread = stats.t975(3) * 0.1 * torch.tensor([0.0, 1, 2, 3]).std().item() / 2
    assert d["change"]["mean"] == pytest.approx(0.2 * (0.3 + 0.15))
    assert d["change"]["ci95"] == pytest.approx(0.2 * spread)
    assert b["change"]["mean"] == pytest.approx(0.4 * (-0.1 + 0.15)) and "minus_control_b" not in b
    # per seed: 0.2 · (0.3 + 0.1 s) − 0.4 · (−0.1 + 0.1 s) = 0.1 − 0.02 s
    assert d["minus_control_b"]["mean"] == pytest.approx(0.1 - 0.02 * 1.5)
    assert d["minus_control_b"]["ci95"] == pytest.approx(0.2 * spread)
    table = report.dose_table(summary)
    assert "| Trans-PEFT masking + dropping | 0.1/0.05 → 0.3/0.15 | +0.09 ± " in table
    assert "| control B: LoRA dropout | 0.1 → 0.5 | +0.02 ± " in table


def test_dose_chart_draws_one_line_per_family(tmp_path, monkeypatch):
    """dose.png: per regime, each family's gain against its rates; the family's default drawn apart where a dose
    shares its first rate (both 0.1/0.1 beside both@0.1/0.05). Nothing without doses."""
    pytest.importorskip("matplotlib")
    keys = ["plain", "drop", "drop@0.05", "drop@0.15", "both", "both@0.1/0.05", "both@0.2/0.1"]
    arms = arms_lib.select_arms(keys)
    rows = []
    for seed in range(3):
        for i, arm in enumerate(arms):
            rows.append({"arm": arm["key"], "seed": seed, "regime": "ffn", "update_seed": 0, "source": 1.0,
                         "transfer": 0.5 + 0.05 * i + 0.01 * seed * (i % 2)})
    _, summary = report.summarize_study(rows, arms)
    drawn = []
    real = report.pyplot()

    class Spy:  # records what each errorbar call draws
        def __getattr__(self, name):
            return getattr(real, name)

        def subplots(self, *a, **k):
            fig, axes = real.subplots(*a, **k)
            for ax in axes.flat:
                def errorbar(x, y, *a, _draw=ax.errorbar, **k):
                    drawn.append((list(x), k.get("mfc")))
                    return _draw(x, y, *a, **k)
                ax.errorbar = errorbar
            return fig, axes

    monkeypatch.setattr(report, "pyplot", lambda: Spy())
    assert report.dose_chart(summary, arms, tmp_path / "dose.png")
    assert (tmp_path / "dose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(drawn, key=str) == sorted([([0.05, 0.1, 0.15], None), ([0.1, 0.2], None), ([0.1], "none")], key=str)
    assert not report.dose_chart(summary, arms_lib.select_arms(["plain", "drop"]), tmp_path / "none.png")


def test_the_power_command_reads_a_study_and_refuses_what_is_not_one(tmp_path, capsys):
    rows = []
    for u in (0, 1):
        rows += rows_for([(0.2, 0.5, 1.0), (0.4, 0.5, 1.0), (0.6, 0.9, 1.0)], regime="ffn", update=u)
    rows[-1]["transfer"] = 0.8  # seed 2, update 1: a seed x update interaction
    (tmp_path / "results.json").write_text(json.dumps({"arms": arms_lib.select_arms(["plain", "mask"]), "rows": rows}))
    stats.main([str(tmp_path / "results.json"), "--updates", "2"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("mask")][0]
    seed_means = [0.3, 0.1, (0.3 + 0.2) / 2]
    c = stats.paired_interval(seed_means)
    assert f"{c['mean']:+.3f} ± {c['ci95']:.3f}" in line
    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad in ("bad.json", "missing.json"):
        with pytest.raises(SystemExit):
            stats.main([str(tmp_path / bad)])
        assert "is not a toy study's results.json" in capsys.readouterr().err


def test_the_headline_of_arms_without_plain():
    """Real bases' --arms need not name plain (e.g. transpeft,refit): the lines a run ends with still print."""
    rows = [r for r in rows_for([(0.2, 0.5, 1.0), (0.4, 0.6, 1.0)]) if r["arm"] == "mask"]
    _, summary = report.summarize_study(rows, arms_lib.select_arms(["mask"]))
    assert "0.55" in report.headline(summary) and "this run (2 seeds)" in report.headline(summary)


def test_the_bounds_gradient_norm_does_not_depend_on_the_thread_count():
    """G (transpeft.ffn_gradient) of the toy study's 256-question batch is the same, bit for bit, with one thread and
    with two, on six initialisations (a parallel sum of squares differs in its last bits on some): a study's arm-seeds
    side by side (one thread each) give the rows of one at a time (two threads)."""
    from model import ModelConfig, Transformer

    threads = torch.get_num_threads()
    try:
        for seed in range(6):
            torch.manual_seed(seed)
            model = Transformer(ModelConfig.from_hf({**toy.TOY_CONFIG, "vocab_size": 300}))
            with torch.no_grad():  # toy-v1's initialisation, so that the gradients are far from 0
                for name, weight in model.named_parameters():
                    weight.fill_(1.0) if name.endswith("norm.weight") else weight.normal_(0, 0.02)
            ids = torch.randint(0, 300, (256, 48))
            found = []
            for n in (1, 2):
                torch.set_num_threads(n)
                found.append(ffn_gradient(model, ids, ids))
            assert found[0] == found[1], seed
    finally:
        torch.set_num_threads(threads)
