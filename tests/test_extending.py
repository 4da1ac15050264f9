"""A fork's variant in one file (docs/extending.md), proved here without editing any project file: an intervention of
its own (attention-sub-block dropping) through the command line, train(), a study arm, --resume and a 2-process DDP
run; a task of its own with its own answer checker through eval.py. (A LoRA variant with a parameter of its own:
tests/test_lora.py, GatedLoRA.)"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_cli
import rundir
import tasks
import train
import transpeft
from model import DecoderLayer
from tasks import Task, judged
from test_runs import eval_out, refused  # noqa: F401 (eval_out: autouse)
from test_train_eval import run_args
from transpeft import Intervention, step_generator

# -----------------------------------------------------------------------------------------------------------
# An intervention: skip the attention sub-block of a layer, one draw per layer per step (the FFN's twin of dropping)


class AttentionDroppingLayer(DecoderLayer):
    p_attn_drop: float = 0.0
    transpeft_rng: torch.Generator | None = None

    def forward(self, x, cos, sin, mask=None, cache=None):
        dropped = self.training and torch.rand((), generator=self.transpeft_rng).item() < self.p_attn_drop
        if not dropped:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def drop_attention(model, rates, seed):
    rng = step_generator(model, seed)  # reseeded per step with the FFN drops' generator
    for layer, rate in zip(model.model.layers, rates):
        layer.__class__, layer.p_attn_drop, layer.transpeft_rng = AttentionDroppingLayer, rate, rng


def keep_attention(model):
    for layer in model.model.layers:
        if isinstance(layer, AttentionDroppingLayer):
            layer.__class__ = DecoderLayer
            del layer.p_attn_drop, layer.transpeft_rng
    model.transpeft_rng = None


ATTN_DROP = Intervention(
    "p_attn_drop", "attndrop", "drop each layer's attention sub-block with this probability", drop_attention,
    keep_attention, unused=True, per_step=True,  # a LoRA on q/k/v/o gets no gradient in a layer that skips attention
    arms=(dict(key="attn_drop", name="control C: attention dropping (0.3)", p_attn_drop=0.3),))


@pytest.fixture
def attention_dropping():
    transpeft.INTERVENTIONS.append(ATTN_DROP)
    yield
    transpeft.INTERVENTIONS.remove(ATTN_DROP)


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_an_intervention_of_a_forks_own_runs_through_the_command_line_and_resumes(world, attention_dropping):
    dropping, plain = world["tmp"] / "dropping", world["tmp"] / "plain"
    train.main(run_args(world, dropping, "--max-steps", "4", "--p-attn-drop", "0.5", "--p-cross", "0", "--p-intra", "0"))
    train.main(run_args(world, plain, "--max-steps", "4", "--p-cross", "0", "--p-intra", "0"))
    assert json.loads((dropping / "results.json").read_text())["p_attn_drop"] == 0.5
    assert json.loads((dropping / "args.json").read_text())["p_attn_drop"] == 0.5
    assert any(not torch.equal(v, adapter(plain)[k]) for k, v in adapter(dropping).items())  # it changed training
    assert "-attndrop0.5-" in str(rundir.default_out(train.parse_args(run_args(world, None, "--p-attn-drop", "0.5"))))
    # stopped and resumed: the uninterrupted run, bit for bit (its drops follow the per-step reseed)
    parts = world["tmp"] / "parts"
    argv = run_args(world, parts, "--max-steps", "4", "--p-attn-drop", "0.5", "--p-cross", "0", "--p-intra", "0")
    train.main([*argv, "--stop-after", "2"])
    refused([*argv, "--p-attn-drop", "0.4", "--resume"], "--p-attn-drop 0.5", "says 0.4")  # another result
    train.main([*argv, "--resume"])
    assert all(torch.equal(v, adapter(parts)[k]) for k, v in adapter(dropping).items())


def test_an_intervention_of_a_forks_own_is_a_study_arm(world, attention_dropping):
    out = world["tmp"] / "arms"
    train.main(run_args(world, out, "--max-steps", "2", "--arms", "plain,attn_drop"))
    rows = json.loads((out / "arms.json").read_text())["rows"]
    assert {r["arm"] for r in rows} == {"plain", "attn_drop"}
    assert json.loads((out / "attn_drop-seed42" / "args.json").read_text())["p_attn_drop"] == 0.3


LAUNCH = """import sys
sys.path.insert(0, {tests!r})
import train, transpeft
from test_extending import ATTN_DROP
transpeft.INTERVENTIONS.append(ATTN_DROP)  # what the fork's own file does before train.main
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_an_intervention_that_leaves_weights_unused_trains_under_ddp(world, attention_dropping):
    """LoRA on attention, attention skipped at random: DDP must expect unused parameters, which the unit declares;
    two gloo processes train as one process does."""
    from test_distributed import args_for, assert_same_run, torchrun

    one, two = world["tmp"] / "one", world["tmp"] / "two"
    train.main(args_for(world, one, 0.0, 4, "--p-attn-drop", "0.5"))
    script = world["tmp"] / "launch.py"
    script.write_text(LAUNCH.format(tests=str(Path(__file__).parent)))
    torchrun(args_for(world, two, 0.0, 2, "--p-attn-drop", "0.5"), script=str(script))
    assert_same_run(one, two)


# -----------------------------------------------------------------------------------------------------------
# A task: a custom jsonl with its own answer checker


def read_yes_no(record, where):
    return {"question": record["prompt"], "expected": record["expected"]} if "expected" in record else None


YES_NO = Task("yesno", "yes/no agreement", "expected", read_yes_no,
              judged(lambda completion, reference: reference == "yes"),  # a checker of its own (here: trivially)
              max_new_tokens=4, gold=str.upper, fields="yesno's prompt/expected")


@pytest.fixture
def yes_no(world):
    tasks.TASKS[YES_NO.name] = YES_NO
    path = world["tmp"] / "yesno.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Is {i} even?", "expected": ["yes", "no"][i % 2]}) + "\n"
                            for i in range(5)))
    yield path
    del tasks.TASKS[YES_NO.name]


def test_a_task_of_a_forks_own_is_evaluated_by_eval_py_and_train_py(world, yes_no, capsys):
    out = world["tmp"] / "e.jsonl"
    eval_cli.main(["--model", world["new"], "--eval-data", str(yes_no), "--out", str(out)])
    assert "yes/no agreement (official scorer) 60.00% (3/5" in capsys.readouterr().out  # its checker: 3 of 5 "yes"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["gold"] for r in records] == ["YES", "NO", "YES", "NO", "YES"]
    assert [r["correct"] for r in records] == [True, False, True, False, True]
    assert all(len(r["completion"]) < 200 for r in records)  # its max_new_tokens, 4
    run = world["tmp"] / "run"
    train.main(run_args(world, run, "--max-steps", "2", "--eval-data", f"{world['data']},{yes_no}"))
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["gsm8k", "yesno"]
    assert results["yesno"]["transfer_new"]["accuracy"] == pytest.approx(2 / 3)  # --eval-limit 3: yes, no, yes
    assert (run / "eval-new-yesno.jsonl").exists()


def test_a_depth_schedule_is_kept_as_typed_and_resolved_per_layer(world, monkeypatch, capsys):
    """--p-cross linear:0:0.2: args.json keeps what was typed (so --resume compares it as typed), the layers get
    0 ... 0.2 evenly (here 2 layers: 0 and 0.2)."""
    import experiment

    seen, real = [], experiment.train

    def spy(model, *args, **kwargs):
        seen.append(model.intervention_rates["p_cross"])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(experiment, "train", spy)
    out = world["tmp"] / "run"
    argv = run_args(world, out, "--max-steps", "4", "--p-cross", "linear:0:0.2", "--p-intra", "0")
    train.main([*argv, "--stop-after", "2"])
    assert json.loads((out / "args.json").read_text())["p_cross"] == "linear:0:0.2"
    train.main([*argv, "--resume"])
    assert seen == [[0.0, 0.2], [0.0, 0.2]] and (out / "results.json").exists()
    with pytest.raises(SystemExit):
        train.main(run_args(world, world["tmp"] / "bad", "--p-cross", "linear:0:1.5"))
    assert "--p-cross takes" in capsys.readouterr().err and not (world["tmp"] / "bad").exists()
