"""toy.py: the task's answers are right by construction, the toy checkpoints are ordinary HF checkpoints that
transformers loads with our logits, and a reduced toy study runs end to end."""

import json
import re

import pytest
import torch

import toy
import train
from data import gold_answer, gsm8k_response, is_correct, tokenize_example
from model import load_model, load_tokenizer

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
    assert any(not torch.equal(a, b) for a, b in zip(ours_v1.parameters(), ours_v2.parameters()))  # the update moved weights


@pytest.mark.slow
def test_reduced_toy_study_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSPEFT_CACHE", str(tmp_path / "cache"))
    train.main(["--quick", "--seeds", "2", "--out", str(tmp_path / "study")])
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert {r["arm"] for r in results["rows"]} == {a["key"] for a in toy.ARMS}
    assert len(results["rows"]) == 2 * len(toy.ARMS)
    assert set(results["summary"]) == {a["key"] for a in toy.ARMS}
    assert results["summary"]["mask"]["n"] == 2 and 0 <= results["summary"]["mask"]["transfer_mean"] <= 1
    assert len(results["drift"]["toy-v2"]) == toy.TOY_CONFIG["num_hidden_layers"]
    # every arm wrote a PEFT adapter and per-example evaluations
    arm_dir = tmp_path / "study" / "u0" / "seed1" / "drop"
    assert (arm_dir / "adapter" / "adapter_config.json").exists() and (arm_dir / "eval-toy-v2.jsonl").exists()
    with pytest.raises(SystemExit, match="already holds a finished study"):
        train.main(["--quick", "--seeds", "2", "--out", str(tmp_path / "study")])


def test_study_summary_pairs_seeds_and_skips_arms_that_did_not_learn():
    rows = []
    for seed, (plain, mask, mask_source) in enumerate([(0.2, 0.5, 1.0), (0.4, 0.5, 0.95), (0.6, 0.9, 0.3)]):
        rows += [{"arm": "plain", "seed": seed, "update_seed": 0, "source": 1.0, "transfer": plain},
                 {"arm": "mask", "seed": seed, "update_seed": 0, "source": mask_source, "transfer": mask}]
    table, summary = train.summarize_study(rows)
    m = summary["mask"]
    assert m["learned"] == 2 and m["diff_n"] == 2  # seed 2's masked LoRA never learned (source 0.3): not compared
    assert m["diff_mean"] == pytest.approx((0.3 + 0.1) / 2) and m["diff_std"] == pytest.approx(0.1 * 2**0.5)
    assert m["transfer_mean"] == pytest.approx((0.5 + 0.5 + 0.9) / 3)
    assert "0.90*" in table  # the seed that did not learn is marked


def test_study_summary_counts_seeds_not_update_pairs():
    """Every update seed evaluates the same trained LoRA of a seed: the differences of one seed are averaged, and the
    standard error is over seeds (two here), not over the four (update, seed) pairs."""
    rows = []
    for update in (0, 1):
        for seed, (plain, mask) in enumerate([(0.2, 0.5), (0.4, 0.5)]):
            rows += [{"arm": "plain", "seed": seed, "update_seed": update, "source": 1.0, "transfer": plain + 0.1 * update},
                     {"arm": "mask", "seed": seed, "update_seed": update, "source": 1.0, "transfer": mask + 0.3 * update}]
    _, summary = train.summarize_study(rows)
    m = summary["mask"]
    per_seed = [(0.3 + 0.5) / 2, (0.1 + 0.3) / 2]  # seed 0: +0.3 on update 0, +0.5 on update 1; seed 1: +0.1, +0.3
    assert m["diff_n"] == 2 and m["diff_mean"] == pytest.approx(sum(per_seed) / 2)
    assert m["diff_se"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5 / 2**0.5)


def test_study_summary_intention_to_treat_with_t_intervals():
    """The primary comparison keeps every seed, learned or not; its 95% interval is mean ± t(0.975, n-1) * SE, here
    worked by hand: differences +0.3, +0.1, +0.3 -> mean 0.2333, std 0.11547, SE 0.06667, t(0.975, 2) = 4.303."""
    rows = []
    for seed, (plain, mask, mask_source) in enumerate([(0.2, 0.5, 1.0), (0.4, 0.5, 0.95), (0.6, 0.9, 0.3)]):
        rows += [{"arm": "plain", "seed": seed, "update_seed": 0, "source": 1.0, "transfer": plain},
                 {"arm": "mask", "seed": seed, "update_seed": 0, "source": mask_source, "transfer": mask}]
    table, summary = train.summarize_study(rows)
    itt = summary["mask"]["itt"]
    assert itt["n"] == 3 and itt["mean"] == pytest.approx(0.7 / 3)
    assert itt["std"] == pytest.approx(0.11547, abs=1e-5) and itt["ci95"] == pytest.approx(4.303 * 0.11547 / 3**0.5, abs=1e-5)
    assert not itt["excludes_0"] and "+0.23 ± 0.29 (n 3) " in table  # 0.233 < 0.287: the interval holds 0
    learned_only = summary["mask"]  # the secondary comparison: seeds 0 and 1 only, t(0.975, 1) = 12.706
    assert learned_only["diff_n"] == 2 and learned_only["diff_ci95"] == pytest.approx(12.706 * 0.1 * 2**0.5 / 2**0.5)
    assert not learned_only["beyond_noise"]
