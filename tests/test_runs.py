"""What users do by mistake never loses a run or mixes two, and bad input is refused in one sentence before any
compute: unfinished runs, changed flags on --resume, interrupted saves, Ctrl-C, malformed data, checkpoints and
adapters, impossible settings."""

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import analysis
import eval as eval_cli
import rundir
import experiment
import loop
import train
from lora import add_lora, load_lora, save_lora
from bases import load_model
from test_train_eval import run_args


def refused(argv, *phrases, main=train.main):
    """main(argv) ends with one line (no traceback) holding every phrase."""
    if main is eval_cli.main and "--out" not in argv:
        argv = [*argv, "--out", str(TMP / "eval.jsonl")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert "\n" not in message.strip() and all(p in message for p in phrases), message
    return message


ROOT = Path(__file__).resolve().parents[1]
TMP = None  # set per test by the fixture below: where eval.py's per-example file goes


@pytest.fixture(autouse=True)
def eval_out(tmp_path):
    global TMP
    TMP = tmp_path


def files(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# -----------------------------------------------------------------------------------------------------------
# No run is lost or mixed


def test_an_unfinished_run_is_refused_without_resume_or_overwrite(world):
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2"))
    before = files(out)
    refused(run_args(world, out, "--max-steps", "6"), "unfinished run", "--resume", "--overwrite")
    assert files(out) == before  # the log and the checkpoint untouched


def test_resume_refuses_changed_flags_and_keeps_args_json(world):
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2"))
    before = files(out)
    refused(run_args(world, out, "--max-steps", "6", "--resume", "--lora-r", "8"), "--lora-r 4", "says 8")
    refused(run_args(world, out, "--max-steps", "6", "--resume", "--lr", "1e-3"), "--lr 0.03", "0.001")
    refused(run_args(world, out, "--max-steps", "7", "--resume"), "--max-steps 6", "says 7")
    assert files(out) == before
    # how it runs may change: here the evaluation's batch size
    train.main(run_args(world, out, "--max-steps", "6", "--resume", "--eval-batch-size", "2"))
    assert (out / "results.json").exists() and (out / "args.json").read_bytes() == before["args.json"]


def test_overwrite_clears_the_old_run_first_and_stale_temporaries_go(world):
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "2"))
    assert {"results.json", "eval-old-gsm8k.jsonl", "eval-new-gsm8k.jsonl", "adapter/adapter_model.safetensors"} <= set(files(out))
    refused(run_args(world, out, "--max-steps", "2"), "finished run", "--overwrite")
    # an --overwrite that stops early leaves nothing of the old run beside the new one
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2", "--overwrite"))
    assert set(files(out)) == {"args.json", "train_log.jsonl", "checkpoint.pt"}
    # what a killed save leaves behind is removed on the next start
    (out / "checkpoint.pt.tmp").write_bytes(b"half")
    (out / "adapter.tmp").mkdir()
    (out / "adapter.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    train.main(run_args(world, out, "--max-steps", "6", "--resume"))
    assert not (out / "checkpoint.pt.tmp").exists() and not (out / "adapter.tmp").exists()


def test_an_interrupted_adapter_save_leaves_the_old_adapter_whole(world, monkeypatch):
    model = add_lora(load_model(world["old"]), r=2, alpha=4, targets=["q_proj"], verbose=False)
    out = world["tmp"] / "adapter"
    rundir.save_peft(model, out, world["old"])
    before = files(out)

    def killed(model, out_dir, **kw):  # the weights are written, then the process dies before the config
        out_dir.mkdir(parents=True)
        (out_dir / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir.lora_lib, "save_lora", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.save_peft(model, out, world["old"])
    assert files(out) == before


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(world, monkeypatch):
    out = world["tmp"] / "run"
    argv = run_args(world, out, "--max-steps", "6")
    real_get_lr = loop.get_lr

    def get_lr(step, *a):
        if step == 3:  # after the checkpoint of step 2 (--save-every 2)
            raise KeyboardInterrupt
        return real_get_lr(step, *a)

    monkeypatch.setattr(loop, "get_lr", get_lr)
    message = refused(argv, f"{out / 'checkpoint.pt'}", "--resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(loop, "get_lr", real_get_lr)
    command = shlex.split(message.split("continue with: ")[1])
    assert command[:2] == ["python", "train.py"]
    train.main(command[2:])  # the printed command finishes the run
    assert json.loads((out / "results.json").read_text())["gsm8k"]["transfer_new"]["total"] == 3


def test_ctrl_c_before_any_checkpoint_says_so(world, monkeypatch):
    monkeypatch.setattr(loop, "get_lr", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    refused(run_args(world, world["tmp"] / "run", "--max-steps", "6"), "before the first checkpoint", "--overwrite")


def test_divergence_before_any_checkpoint_does_not_advise_resume(world, monkeypatch):
    import model as model_py

    monkeypatch.setattr(model_py, "linear_cross_entropy", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    message = refused(run_args(world, world["tmp"] / "nan", "--max-steps", "4"), "no checkpoint was written yet")
    assert "and --resume" not in message


# -----------------------------------------------------------------------------------------------------------
# Bad data: named by file and line, before any compute


def write_lines(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


GOOD = {"question": "What is 1 plus 1?", "answer": "1 + 1 = 2\n#### 2"}


@pytest.mark.parametrize("line, phrase", [
    ({"question": "q", "answer": "no final number here"}, "no '#### '"),
    ({"question": "q", "answer": "It is two.\n#### two"}, "no number after '#### '"),
    ({"question": "q", "answer": 2}, "'answer' is a int, not text"),
    ('{"question": "q", "answer": ', "is not valid JSON"),
    ("[1, 2]", "is a JSON list, not a record"),
    ({"prompt": "q", "completion": "a"}, "has fields ['completion', 'prompt']"),
])
@pytest.mark.parametrize("flag", ["--eval-data", "--train-data"])
def test_bad_records_are_named_by_file_and_line_before_anything_runs(world, monkeypatch, line, phrase, flag):
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("training started"))
    data = write_lines(world["tmp"] / "bad.jsonl", GOOD, line)
    out = world["tmp"] / "run"
    refused(run_args(world, out, flag, data), "bad.jsonl, line 2", phrase)
    assert not out.exists()  # nothing written


def test_json_data_must_be_a_list(world):
    path = world["tmp"] / "data.json"
    path.write_text(json.dumps({"data": [GOOD]}))
    refused(run_args(world, world["tmp"] / "run", "--train-data", str(path)), "data.json holds a JSON dict", "list of records")


def test_eval_cli_validates_data_and_out_before_decoding(world, monkeypatch):
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    bad = write_lines(world["tmp"] / "bad.jsonl", GOOD, {"question": "q", "answer": "#### x"})
    refused(["--model", world["old"], "--eval-data", bad], "bad.jsonl, line 2", "no number", main=eval_cli.main)
    (world["tmp"] / "a_file").write_text("")
    refused(["--model", world["old"], "--data", world["data"], "--out", str(world["tmp"] / "a_file" / "e.jsonl")],
            "cannot be written", main=eval_cli.main)
    refused(["--model", world["old"], "--data", world["data"], "--out", str(world["tmp"])], "is a directory", main=eval_cli.main)


@pytest.mark.parametrize("flag", ["--batch-size", "--eval-batch-size", "--max-new-tokens", "--limit"])
def test_eval_cli_refuses_non_positive_numbers(world, capsys, flag):
    with pytest.raises(SystemExit):
        eval_cli.main(["--model", world["old"], flag, "0"])
    assert "must be a positive number" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------------
# Bad checkpoints, adapters and settings


def broken_copy(world, name, edit):
    path = world["tmp"] / name
    shutil.copytree(world["old"], path)
    edit(path)
    return str(path)


def test_config_missing_a_field_is_named(world):
    def drop_hidden(path):
        cfg = json.loads((path / "config.json").read_text())
        del cfg["hidden_size"]
        (path / "config.json").write_text(json.dumps(cfg))

    old = broken_copy(world, "nohidden", drop_hidden)
    refused(run_args(world, world["tmp"] / "run", "--old", old), "config.json", "lacks hidden_size")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])  # None: the real file cut in half
def test_unreadable_weights_are_named(world, content):
    def spoil(path):
        f = path / "model.safetensors"
        f.write_bytes(content if content is not None else f.read_bytes()[: f.stat().st_size // 2])

    old = broken_copy(world, "spoiled", spoil)
    refused(["--model", old, "--data", world["data"]], "model.safetensors is not a readable safetensors file", main=eval_cli.main)


def test_sharded_index_may_not_leave_the_checkpoint(world):
    def escape(path):
        other = world["tmp"] / "other"
        other.mkdir()
        (path / "model.safetensors").rename(other / "model.safetensors")
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../other/model.safetensors"}}))

    old = broken_copy(world, "escaping", escape)
    refused(["--model", old, "--data", world["data"]], "outside the checkpoint directory", main=eval_cli.main)


@pytest.mark.parametrize("content, phrase", [(b"", "not a readable PyTorch file"), (b"\x80\x04garbage", "not a readable PyTorch file"),
                                             (None, "not a checkpoint written by train.py")])
def test_bad_checkpoint_on_resume_is_named(world, content, phrase):
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2"))
    if content is None:
        torch.save({"model": torch.zeros(2)}, out / "checkpoint.pt")  # a foreign checkpoint
    else:
        (out / "checkpoint.pt").write_bytes(content)
    refused(run_args(world, out, "--max-steps", "6", "--resume"), str(out / "checkpoint.pt"), phrase)


def saved_lora(world):
    model = add_lora(load_model(world["old"]), r=2, alpha=4, targets=["q_proj"], verbose=False)
    out = world["tmp"] / "lora"
    save_lora(model, out)
    return out


def test_bad_adapter_files_are_named(world):
    out = saved_lora(world)
    (out / "adapter_model.safetensors").write_bytes(b"junk")
    refused(["--model", world["new"], "--adapter", str(out), "--data", world["data"]], "adapter_model.safetensors is not a readable",
            main=eval_cli.main)
    (out / "adapter_config.json").write_text("{not json")
    refused(["--model", world["new"], "--adapter", str(out), "--data", world["data"]], "adapter_config.json is not valid JSON",
            main=eval_cli.main)


def test_bottleneck_config_missing_keys_is_named(world):
    from adapter import add_adapter, save_adapter

    model = add_adapter(load_model(world["old"]), bottleneck=4, verbose=False)
    out = world["tmp"] / "bottleneck"
    save_adapter(model, out)
    cfg = json.loads((out / "bottleneck_adapter.json").read_text())
    del cfg["placement"], cfg["act"]
    (out / "bottleneck_adapter.json").write_text(json.dumps(cfg))
    refused(["--model", world["new"], "--adapter", str(out), "--data", world["data"]], "lacks act, placement", main=eval_cli.main)


def test_an_adapter_for_another_architecture_is_refused_unless_forced(world, hf_checkpoint):
    llama, _ = hf_checkpoint("llama3", vocab_size=512)  # the same shapes as the Qwen2 bases
    out = saved_lora(world)
    with pytest.raises(ValueError, match="trained on a qwen2 model and this base is a llama model"):
        load_lora(load_model(llama), out)
    assert load_lora(load_model(llama), out, allow_other_architecture=True) is not None
    # a peft-written adapter (no metadata) naming its base's directory is checked through that base's config.json
    save_file(load_file(out / "adapter_model.safetensors"), out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": world["old"]}))
    with pytest.raises(ValueError, match="trained on a qwen2 model"):
        load_lora(load_model(llama), out)


@pytest.mark.parametrize("extra, phrase", [(["--p-cross", "0.1,0.2,0.3"], "--p-cross has 3 values but the model has 2 layers"),
                                           (["--lora-targets", "q_proj,w_pack"], "Unknown LoRA target 'w_pack'"),
                                           (["--peft", "adapter", "--adapter-bottleneck", "0"], "bottleneck must be a positive integer")])
def test_impossible_settings_are_refused_before_anything_is_written(world, extra, phrase):
    out = world["tmp"] / "run"
    refused(run_args(world, out, *extra), phrase)
    assert not out.exists()


def test_analyze_refuses_other_architectures_and_sizes_in_one_sentence(world, hf_checkpoint, capsys):
    llama, _ = hf_checkpoint("llama3", vocab_size=512)
    refused(["analyze", "--old", world["old"], "--new", world["other"]], "differ in intermediate_size (128 vs 96)", main=analysis.main)
    refused(["analyze", "--old", world["old"], "--new", str(llama)], "differ in model_type (qwen2 vs llama)", main=analysis.main)
    with pytest.raises(SystemExit):
        analysis.main(["analyze", "--old", world["old"], "--new", world["new"], "--max-tokens", "0"])
    assert "--max-tokens must be a positive number" in capsys.readouterr().err


@pytest.mark.slow
def test_paper_command_runs_offline_from_a_hub_cache(tmp_path):
    """The paper's command, unchanged but for its length, on a hub cache laid out as huggingface_hub writes it (tiny
    random Qwen2 models under Qwen/Qwen2-7B and Qwen/Qwen2.5-7B, MetaMathQA's JSON, GSM8K's test parquet)."""
    import os
    import subprocess
    import sys

    import fake_hub

    pytest.importorskip("pyarrow")
    fake_hub.build(tmp_path / "hub", n_train=32)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    root = fake_hub.Path(fake_hub.__file__).resolve().parents[1]
    run = tmp_path / "paper"
    cmd = [sys.executable, "train.py", "--old", "qwen2", "--new", "qwen2.5", "--max-steps", "2", "--eval-limit", "4",
           "--max-new-tokens", "4", "--out", str(run)]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["gsm8k"]["transfer_new"]["total"] == 4 and results["old"] == "qwen2"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "qwen2"


@pytest.mark.parametrize("device, phrase", [("gpu", "not a device torch knows"),
                                            ("cuda:7", "no CUDA device" if not torch.cuda.is_available() else "only")])
def test_a_device_that_is_not_there_is_refused_in_one_line(world, capsys, device, phrase):
    for main, argv in ((train.main, ["--quick", "--device", device]),
                       (eval_cli.main, ["--model", world["old"], "--device", device])):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err


def test_unknown_or_repeated_evaluation_sets_are_refused_before_anything_runs(world, monkeypatch):
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("training started"))
    out = world["tmp"] / "run"
    refused(run_args(world, out, "--eval-data", "gsm9k"), "--eval-data gsm9k", "give gsm8k, math, or a local")
    copy = world["tmp"] / "copy.jsonl"
    copy.write_text(Path(world["data"]).read_text())
    refused(run_args(world, out, "--eval-data", f"{world['data']},{copy}"), "names two gsm8k sets", "give each task once")
    refused(["--model", world["old"], "--eval-data", "math9"], "--eval-data math9", main=eval_cli.main)
    assert not out.exists()


# -----------------------------------------------------------------------------------------------------------
# One run per directory, every input checked before compute


def no_training(monkeypatch):
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("training started"))


def test_a_second_process_on_a_locked_directory_is_refused(world, monkeypatch):
    """The lock names a live process of this host (this one): a second run in the directory is refused, and the lock
    and the directory stay as they were."""
    no_training(monkeypatch)
    out = world["tmp"] / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}")
    before = files(out)
    refused(run_args(world, out), "is in use by another run", f"process {os.getpid()}")
    refused(run_args(world, out, "--overwrite"), "is in use by another run")
    assert files(out) == before


def test_a_stale_lock_is_named_and_taken_over_by_resume_or_overwrite(world):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = world["tmp"] / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}")
    refused(run_args(world, out, "--max-steps", "2"), "stale lock", dead.stdout.strip(), "--overwrite")
    train.main(run_args(world, out, "--max-steps", "2", "--overwrite"))
    assert (out / "results.json").exists() and not (out / ".lock").exists()  # released at the end


def test_an_interrupted_overwrite_never_leaves_a_finished_looking_run(world, monkeypatch):
    """--overwrite deletes results.json first: killed after that, the directory is an unfinished run, never a
    finished one with another run's adapter."""
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "2"))
    real_remove = rundir.remove

    def killed(*paths):
        real_remove(paths[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "remove", killed)
    with pytest.raises(SystemExit):
        train.main(run_args(world, out, "--max-steps", "2", "--overwrite"))
    monkeypatch.setattr(rundir, "remove", real_remove)
    assert not (out / "results.json").exists() and (out / "adapter").exists()
    refused(run_args(world, out, "--max-steps", "2"), "holds an unfinished run")


def test_resume_refuses_data_that_changed_under_the_same_path(world):
    out = world["tmp"] / "run"
    data = world["tmp"] / "train.jsonl"
    shutil.copy(world["data"], data)
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2", "--train-data", str(data)))
    data.write_text(data.read_text().replace("What is 2 plus 3?", "What is 2 plus 4?"))
    before = files(out)
    refused(run_args(world, out, "--max-steps", "6", "--resume", "--train-data", str(data)), "data changed", "--overwrite")
    assert files(out) == before


# The flags a resumed run may change, written out here (not read from rundir.HOW_FLAGS, so that a flag added there by
# mistake fails this test): they decide how a run runs, not what it computes.
MAY_CHANGE = {"device", "micro_batch_size", "eval_batch_size", "save_every", "stop_after", "compile",
              "grad_checkpointing", "out"}


def test_every_result_deciding_flag_is_compared_on_resume(world):
    """Every flag but MAY_CHANGE refuses a change on --resume; those are accepted."""
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2", "--lora-dropout", "0"))
    stored = json.loads((out / "args.json").read_text())
    args = train.parse_args(run_args(world, out, "--max-steps", "6", "--resume", "--lora-dropout", "0"))
    for name, value in vars(args).items():
        if name in ("resume", "overwrite"):  # the mode itself
            continue
        changed = argparse.Namespace(**{**vars(args), name: "changed" if value != "changed" else "other"})
        if name in MAY_CHANGE:
            rundir.check_run_dir(out, changed)  # accepted
        else:
            with pytest.raises(ValueError, match=f"--{name.replace('_', '-')}"):
                rundir.check_run_dir(out, changed)
    assert json.loads((out / "args.json").read_text()) == stored
    for flag, value in (("--batch-size", "3"), ("--eval-limit", "2")):  # through the command line too
        refused(run_args(world, out, "--max-steps", "6", "--resume", "--lora-dropout", "0", flag, value), flag)


def test_another_micro_batch_split_is_refused_where_lora_dropout_draws_per_forward(world):
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2"))  # --lora-dropout 0.05 by default
    refused(run_args(world, out, "--max-steps", "6", "--resume", "--micro-batch-size", "2"), "LoRA dropout", "--micro-batch-size 4")


def test_arms_resume_refuses_a_finished_arm_run_with_other_flags(world):
    out = world["tmp"] / "arms"
    train.main(run_args(world, out, "--max-steps", "2", "--arms", "plain"))
    before = files(out)
    refused(run_args(world, out, "--max-steps", "3", "--arms", "plain", "--resume"), "--max-steps 2", "3")
    assert files(out) == before


@pytest.mark.parametrize("flag, value, phrase", [
    ("--lr", "0", "--lr must be in (0, 10)"), ("--lr", "-1", "--lr must be"), ("--lr", "inf", "--lr must be"),
    ("--lr", "nan", "--lr must be"), ("--lr", "1e38", "--lr must be"), ("--grad-clip", "0", "--grad-clip must be positive"),
    ("--grad-clip", "-1", "--grad-clip must be positive"), ("--weight-decay", "-1", "--weight-decay must be zero or positive"),
    ("--lora-dropout", "1", "--lora-dropout must be in [0, 1)"), ("--lora-alpha", "0", "--lora-alpha must be in (0, 10000]"),
    ("--epochs", "inf", "--epochs must be positive"), ("--fsdp", None, "--fsdp shards the model across the processes"),
])
def test_numeric_flags_are_bounded_where_parsed(world, capsys, flag, value, phrase):
    out = world["tmp"] / "run"
    with pytest.raises(SystemExit):
        train.main(run_args(world, out, flag, *([value] if value is not None else [])))
    assert phrase in capsys.readouterr().err and not out.exists()


def test_the_new_base_and_both_tokenizers_are_checked_before_training(world, monkeypatch):
    no_training(monkeypatch)
    cut = broken_copy(world, "cut", lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]))
    refused(run_args(world, world["tmp"] / "a", "--new", cut), "model.safetensors is not a readable safetensors file")

    def drop_tensor(path):
        tensors = load_file(path / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, path / "model.safetensors")

    refused(run_args(world, world["tmp"] / "b", "--new", broken_copy(world, "missing", drop_tensor)),
            "is missing tensor model.layers.1.mlp.up_proj.weight")
    bad_json = broken_copy(world, "badtok", lambda p: (p / "tokenizer.json").write_text('{"version": '))
    refused(run_args(world, world["tmp"] / "c", "--new", bad_json), "tokenizer.json is not a readable tokenizer")

    def small_vocab(path):
        cfg = json.loads((path / "config.json").read_text())
        tensors = load_file(path / "model.safetensors")
        rows = 100
        save_file({k: (v[:rows] if v.shape[0] == cfg["vocab_size"] else v).contiguous() for k, v in tensors.items()},
                  path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}))

    small = broken_copy(world, "small", small_vocab)
    refused(run_args(world, world["tmp"] / "d", "--old", small, "--new", small), "tokens but its model's embedding has 100 rows")
    for name in "abcd":
        assert not (world["tmp"] / name).exists()


def test_an_out_that_cannot_be_a_directory_is_one_sentence(world, monkeypatch):
    no_training(monkeypatch)
    (world["tmp"] / "a_file").write_text("x")
    refused(run_args(world, world["tmp"] / "a_file"), "is a file, not a directory")
    refused(run_args(world, world["tmp"] / "a_file" / "run"), "is a file, not a directory")


def test_analysis_outputs_are_checked_before_compute(world, monkeypatch):
    monkeypatch.setattr(analysis, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (world["tmp"] / "a_file").write_text("x")
    refused(["analyze", "--old", world["old"], "--new", world["new"], "--out", str(world["tmp"] / "a_file")], "is a file",
            main=analysis.main)
    refused(["drop-cost", "--model", world["old"], "--out", str(world["tmp"])], "is a directory", main=analysis.main)


def test_non_utf8_data_names_the_file_and_line(world, monkeypatch):
    no_training(monkeypatch)
    data = world["tmp"] / "latin1.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps({"question": "Caf\u00e9?", "answer": "#### 1"}).encode("utf-8")
                     .replace(b"\\u00e9", "\u00e9".encode("latin-1")) + b"\n")
    refused(run_args(world, world["tmp"] / "run", "--train-data", str(data)), "latin1.jsonl, line 2 is not UTF-8")
    text = world["tmp"] / "text.txt"
    text.write_bytes("caf\u00e9\n".encode("latin-1"))
    refused(["drop-cost", "--model", world["old"], "--text", str(text), "--out", str(world["tmp"] / "d.json")],
            "is not UTF-8 text", main=analysis.main)


def test_a_legacy_non_zip_adapter_bin_loads(world):
    """peft's older adapter_model.bin, written by torch.save without the zip container: read with weights_only."""
    from lora import WEIGHTS_NAME

    out = saved_lora(world)
    tensors = load_file(out / WEIGHTS_NAME)
    torch.save(tensors, out / "adapter_model.bin", _use_new_zipfile_serialization=False)
    (out / WEIGHTS_NAME).unlink()
    loaded = load_lora(load_model(world["new"]), out)
    assert all(torch.equal(p, tensors["base_model.model." + n]) for n, p in loaded.named_parameters() if "lora_" in n)


def test_a_full_disk_while_saving_is_one_sentence_and_keeps_the_last_checkpoint(world, monkeypatch):
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2"))
    saved = (out / "checkpoint.pt").read_bytes()

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/3: "
                           "file write failed")

    monkeypatch.setattr(rundir.torch, "save", full)
    message = refused(run_args(world, out, "--max-steps", "6", "--resume"), "checkpoint.pt failed", "--resume")
    assert "inline_container" not in message and (out / "checkpoint.pt").read_bytes() == saved


def test_a_peft_lora_naming_a_cached_hub_base_of_another_architecture_is_refused(world, tmp_path, monkeypatch, capsys):
    """peft records the base as a hub id: its config.json in the local hub cache tells the architecture; where it is
    not cached, one note says that the architecture could not be checked."""
    from fake_hub import put_snapshot

    out = saved_lora(world)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"}))
    tensors = load_file(out / "adapter_model.safetensors")
    save_file(tensors, out / "adapter_model.safetensors")  # peft's files carry no model_type of ours
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    load_lora(load_model(world["new"]), out)
    assert "could not be checked" in capsys.readouterr().out
    put_snapshot(tmp_path / "hub", "model", "meta-llama/Llama-3.2-1B", {"config.json": b'{"model_type": "llama"}'})
    refused(["--model", world["new"], "--adapter", str(out), "--data", world["data"]], "trained on a llama model",
            main=eval_cli.main)


@pytest.mark.slow
def test_two_live_processes_on_one_out(world):
    """A real second process: while one train.py runs in --out (its lock on disk), another on the same --out is
    refused in one sentence, and the first one's files are left alone."""
    out = world["tmp"] / "run"
    argv = run_args(world, out, "--max-steps", "100000", "--save-every", "100000")
    first = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until its lock is taken (its checks done)
            if (out / ".lock").exists() and (out / "args.json").exists():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first run never took its lock")
        before = (out / "args.json").read_bytes()
        second = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert "is in use by another run" in second.stderr and f"process {first.pid}" in second.stderr
        assert (out / "args.json").read_bytes() == before and first.poll() is None  # the first one runs on
    finally:
        first.kill()
        first.wait()


HELD = """import sys, time
from pathlib import Path
import experiment, train
gate = Path(sys.argv[1])
lock = experiment.acquire_lock
def held(*args, **kwargs):  # this run has checked --out and read its data; it waits here, at its lock, until the gate
    gate.with_suffix(".checked").touch()  # opens
    while not gate.exists():
        time.sleep(0.05)
    return lock(*args, **kwargs)
experiment.acquire_lock = held
train.main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_run_that_finished_while_another_read_its_data_is_not_overwritten(world):
    """Process B checks an empty --out, reads its data and is held just before its lock while A runs to the
    end in the same --out: B, let go, decides again under its lock and refuses; A's run is intact."""
    out, gate = world["tmp"] / "run", world["tmp"] / "gate"
    argv = run_args(world, out, "--max-steps", "2")
    b = subprocess.Popen([sys.executable, "-c", HELD, str(gate), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for _ in range(1200):
            if gate.with_suffix(".checked").exists() or b.poll() is not None:
                break
            time.sleep(0.1)
        assert gate.with_suffix(".checked").exists(), b.communicate()
        train.main(argv)  # A, start to finish
        finished = files(out)
        gate.touch()
        _, err = b.communicate(timeout=300)
    finally:
        b.kill()
    assert b.returncode != 0 and "Traceback" not in err
    assert "already holds a finished run" in err and "--overwrite" in err
    assert files(out) == finished


def stopped_run(world, *extra, name="run"):
    out = world["tmp"] / name
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2", *extra))
    return out


def test_resume_refuses_a_foreign_args_json_checkpoint_or_step(world):
    out = stopped_run(world)
    resume = run_args(world, out, "--max-steps", "6", "--resume")
    good_args, good_ckpt = (out / "args.json").read_bytes(), (out / "checkpoint.pt").read_bytes()
    (out / "args.json").write_text("[1, 2]")
    refused(resume, "args.json holds no flags")
    (out / "args.json").write_bytes(good_args)
    for step in ("2", -3, 99, True):
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        torch.save({**state, "step": step}, out / "checkpoint.pt")
        refused(resume, "which is not a step of this run's 6")
        (out / "checkpoint.pt").write_bytes(good_ckpt)
    other = stopped_run(world, "--lora-r", "2", name="r2") / "checkpoint.pt"  # the same names, other shapes
    shutil.copy(other, out / "checkpoint.pt")
    refused(resume, "other names or shapes: another --lora-r?")


def test_a_run_from_before_data_fingerprints_is_not_resumed_on_unknown_data(world):
    out = stopped_run(world)
    args = json.loads((out / "args.json").read_text())
    del args["data_sha256"]
    (out / "args.json").write_text(json.dumps(args))
    refused(run_args(world, out, "--max-steps", "6", "--resume"), "did not record its data's fingerprint",
            "--overwrite")


def test_resume_takes_over_a_stale_lock(world):
    out = stopped_run(world)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}")
    train.main(run_args(world, out, "--max-steps", "6", "--resume"))
    assert (out / "results.json").exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("content, phrase", [
    (b"\xff\xfe\x00", "is not a lock that a run wrote"), (b"", "is not a lock that a run wrote"),
    (b"garbage", "is not a lock that a run wrote"), (b"12345", "is not a lock that a run wrote"),
    (None, "is a directory, not a run's lock"),
])
def test_a_lock_this_code_did_not_write_is_named(world, monkeypatch, content, phrase):
    no_training(monkeypatch)
    out = world["tmp"] / "run"
    out.mkdir()
    (out / ".lock").mkdir() if content is None else (out / ".lock").write_bytes(content)
    for extra in ([], ["--overwrite"], ["--resume"]):
        refused(run_args(world, out, *extra), str(out / ".lock"), phrase)


def test_a_lock_with_a_trailing_newline_is_read_as_this_hosts(world):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = world["tmp"] / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")  # as an editor saves it
    refused(run_args(world, out, "--max-steps", "2"), "stale lock", dead.stdout.strip())


def test_another_hosts_lock_and_another_users_live_process_are_not_stale(world, monkeypatch):
    no_training(monkeypatch)
    out = world["tmp"] / "run"
    out.mkdir()
    (out / ".lock").write_text("12345 some-other-host")
    refused(run_args(world, out, "--overwrite"), "in use by another run", "on some-other-host")

    def not_ours(pid, sig):  # a process of another user: signal 0 is not permitted, but it runs
        raise PermissionError

    monkeypatch.setattr(rundir.os, "kill", not_ours)
    (out / ".lock").write_text(f"12345 {socket.gethostname()}")
    refused(run_args(world, out, "--resume"), "in use by another run", "process 12345")


def test_only_process_0_decides_the_run_directory(monkeypatch):
    monkeypatch.setattr(rundir, "is_main_process", lambda: False)  # rank 1 of a job without a process group
    assert rundir.decided_by_rank0(lambda: pytest.fail("a process other than 0 looked at the directory")) is None


def test_ctrl_c_during_the_refit_names_the_refits_checkpoint(world, monkeypatch):
    out = world["tmp"] / "run"
    real = experiment.train

    def interrupt_the_refit(model, dataset, settings, run_dir, *args, **kwargs):
        log = real(model, dataset, settings, run_dir, *args, **kwargs)
        if run_dir.name == "refit-new":
            raise KeyboardInterrupt
        return log

    monkeypatch.setattr(experiment, "train", interrupt_the_refit)
    argv = run_args(world, out, "--max-steps", "2", "--refit-new")
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert str(out / "refit-new" / "checkpoint.pt") in str(e.value.code) and "--resume" in str(e.value.code)


def test_a_flag_added_after_a_run_began_keeps_it_resumable_at_its_default(world):
    """An args.json from before a flag existed (here --p-attn, deleted from it) resumes with the flag at its default;
    the flag set otherwise is a change of the result, and refused."""
    out = stopped_run(world)
    args = json.loads((out / "args.json").read_text())
    del args["p_attn"]
    (out / "args.json").write_text(json.dumps(args))
    refused(run_args(world, out, "--max-steps", "6", "--resume", "--p-attn", "0.2"), "before --p-attn existed",
            "(as at its default, 0.0)", "says 0.2")
    train.main(run_args(world, out, "--max-steps", "6", "--resume"))
    assert (out / "results.json").exists()
