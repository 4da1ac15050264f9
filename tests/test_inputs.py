"""Everything a command reads is checked before compute (issue 33's audit, case by case): token ids past the
embedding, config.json and adapter_config.json values of the wrong type or range, NaN or infinite weights, values
that decide memory, empty task lists, a batch larger than the data; each refused in one sentence that names the file
(and tensor), before the run directory is touched."""

import json
import math

import pytest
from safetensors.torch import load_file, save_file

import analysis
import eval as eval_cli
import experiment
import loop
import train
from test_runs import broken_copy, eval_out, no_training, refused, saved_lora  # noqa: F401 (eval_out: autouse)
from test_train_eval import run_args


def edit_config(**fields):
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **fields}))
    return edit


@pytest.mark.parametrize("field, value, phrase", [
    ("pad_token_id", 512, "config.json's pad_token_id is 512, but it must be a token id below vocab_size (512)"),
    ("eos_token_id", [3, 600], "config.json's eos_token_id is [3, 600]"),
    ("bos_token_id", -1, "config.json's bos_token_id is -1"),
    ("num_attention_heads", 0, "config.json's num_attention_heads is 0, but it must be a positive whole number"),
    ("vocab_size", "400", "config.json's vocab_size is '400'"),
    ("rms_norm_eps", "x", "config.json's rms_norm_eps is 'x', but it must be a positive number"),
    ("num_key_value_heads", 3, "a divisor of num_attention_heads (4)"),
    ("max_position_embeddings", True, "config.json's max_position_embeddings is True"),
])
def test_config_values_of_the_wrong_type_or_range_are_refused_before_the_run_directory(world, monkeypatch, field,
                                                                                        value, phrase):
    no_training(monkeypatch)
    out = world["tmp"] / "run"
    for role in ("--old", "--new"):
        refused(run_args(world, out, role, broken_copy(world, f"bad-{role[2:]}", edit_config(**{field: value}))), phrase)
    assert not out.exists()


def test_a_tokenizer_larger_than_the_evaluated_models_embedding_is_refused(world, hf_checkpoint):
    from test_tokenizer import write_checkpoint_tokenizer

    small, _ = hf_checkpoint("qwen2", vocab_size=300)  # the tiny tokenizer has 344 ids
    write_checkpoint_tokenizer(small, "qwen2")
    refused(["--model", str(small), "--data", world["data"]], "its model's embedding has 300 rows", main=eval_cli.main)
    # analyze feeds the old base's tokens to both bases: the new one's embedding must hold them
    refused(["analyze", "--old", world["old"], "--new", str(small), "--out", str(world["tmp"] / "a")],
            f"but {small}'s embedding has 300 rows", "do not share a vocabulary", main=analysis.main)


def nan_in(tensor_name):
    def edit(path):
        tensors = load_file(path / "model.safetensors")
        tensors[tensor_name] = tensors[tensor_name].clone()
        tensors[tensor_name].view(-1)[7] = math.nan
        save_file(tensors, path / "model.safetensors")
    return edit


def test_a_nan_in_either_base_or_in_an_adapter_is_named_by_file_and_tensor(world, monkeypatch):
    name = "model.layers.1.mlp.up_proj.weight"
    old = broken_copy(world, "nan-old", nan_in(name))
    refused(["--model", old, "--data", world["data"]], "model.safetensors: tensor " + name, "NaN or infinite",
            main=eval_cli.main)
    out = world["tmp"] / "run"
    refused(run_args(world, out, "--old", old, "--max-steps", "2"), name, "NaN or infinite")
    assert not (out / "train_log.jsonl").exists()  # refused as it loaded, before a step
    # the new base, read after training: named, not evaluated as 0%
    refused(run_args(world, world["tmp"] / "run2", "--new", old, "--max-steps", "2"), name, "NaN or infinite")

    lora = saved_lora(world)
    tensors = load_file(lora / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = math.inf
    save_file(tensors, lora / "adapter_model.safetensors")
    refused(["--model", world["new"], "--adapter", str(lora), "--data", world["data"]], "adapter_model.safetensors",
            "NaN or infinite", main=eval_cli.main)


@pytest.mark.parametrize("field, value, phrase", [
    ("lora_alpha", "16", "LoRA alpha must be in (0, 10000]"), ("lora_alpha", math.inf, "LoRA alpha must be in"),
    ("r", True, "rank r must be a positive integer"), ("lora_dropout", "0.1", "LoRA dropout must be in [0, 1)"),
    ("r", 100000, "more than the smaller side"),
])
def test_adapter_config_values_of_the_wrong_type_or_range_are_refused(world, field, value, phrase):
    lora = saved_lora(world)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))  # json writes inf as Infinity
    message = refused(["--model", world["new"], "--adapter", str(lora), "--data", world["data"]], phrase,
                      main=eval_cli.main)
    assert "adapter_config.json" in message


@pytest.mark.parametrize("extra, phrase", [
    (["--lora-r", "10000000"], "LoRA rank r=10000000 is more than the smaller side of"),
    (["--max-new-tokens", "1000000000"], "--max-new-tokens 1000000000 is more than the model's 256 positions"),
    (["--seed", str(2**64)], "--seed must be in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be in"),
    (["--lora-alpha", "1e300"], "--lora-alpha must be in (0, 10000]"),
    (["--weight-decay", "nan"], "--weight-decay must be zero or positive"),
    (["--weight-decay", "inf"], "--weight-decay must be zero or positive"),
    (["--eval-data", ","], "--eval-data names no task"),
    (["--batch-size", "100", "--micro-batch-size", "4"], "training examples do not fill one batch of 100"),
])
def test_values_that_decide_memory_or_nothing_are_refused_before_the_run_directory(world, monkeypatch, capsys, extra,
                                                                                    phrase):
    no_training(monkeypatch)
    out = world["tmp"] / "run"
    with pytest.raises(SystemExit) as e:
        train.main(run_args(world, out, *extra))
    said = str(e.value.code) + capsys.readouterr().err
    assert phrase in said and "Traceback" not in said and not out.exists()


def test_eval_refuses_an_empty_task_list_and_new_tokens_past_the_positions(world):
    refused(["--model", world["new"], "--data", ","], "--eval-data names no task", main=eval_cli.main)
    refused(["--model", world["new"], "--data", world["data"], "--max-new-tokens", "300"],
            "more than the model's 256 positions", main=eval_cli.main)


def test_an_unclosed_boxed_gold_is_named_by_the_missing_answer_warning(world, capsys):
    from tasks import load_eval_sets

    path = world["tmp"] / "math.jsonl"
    path.write_text(json.dumps({"problem": "1+4?", "solution": "It is $\\boxed{5$."}) + "\n")
    load_eval_sets([str(path)])
    assert "1 MATH solution(s) without a \\boxed answer" in capsys.readouterr().out


def test_every_training_flag_reaches_the_training_loop():
    """From the command line to TrainSettings, field by field, each flag at a value other than its default (written
    out here, so that a field dropped in between fails)."""
    argv = ["--old", "a", "--new", "b", "--lr", "0.002", "--batch-size", "12", "--micro-batch-size", "3",
            "--max-steps", "7", "--epochs", "2.5", "--warmup-ratio", "0.2", "--weight-decay", "0.01", "--grad-clip",
            "0.5", "--loss-mean", "micro-batch", "--seed", "9", "--save-every", "5", "--stop-after", "4", "--resume",
            "--device", "cpu"]
    settings = loop.TrainSettings.from_args(train.parse_args(argv))
    assert settings == loop.TrainSettings(lr=0.002, batch_size=12, micro_batch_size=3, max_steps=7, epochs=2.5,
                                           warmup_ratio=0.2, weight_decay=0.01, grad_clip=0.5, loss_mean="micro-batch",
                                           seed=9, save_every=5, stop_after=4, resume=True, fsdp=False)


def test_fsdp_in_one_process_and_a_released_run_with_an_adapter_are_refused(world, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    for extra, phrase in ((["--fsdp"], "--fsdp shards the model across the processes"),
                          (["--as-released", "--peft", "adapter"], "a bottleneck adapter cannot be merged")):
        with pytest.raises(SystemExit):
            train.main(run_args(world, world["tmp"] / "run", *extra))
        assert phrase in capsys.readouterr().err and not (world["tmp"] / "run").exists()


def test_the_data_fingerprint_covers_the_evaluation_sets(world):
    import shutil

    out, evals = world["tmp"] / "run", world["tmp"] / "eval.jsonl"
    shutil.copy(world["data"], evals)
    train.main(run_args(world, out, "--max-steps", "6", "--stop-after", "2", "--eval-data", str(evals)))
    evals.write_text(evals.read_text().replace("#### 5", "#### 6"))
    refused(run_args(world, out, "--max-steps", "6", "--resume", "--eval-data", str(evals)), "data changed")


def test_eval_merged_with_refit_evaluates_the_refit_adapter(world, monkeypatch):
    seen = []
    real = experiment.model_for_eval
    monkeypatch.setattr(experiment, "model_for_eval", lambda base, adapter, args: seen.append((base, adapter))
                        or real(base, adapter, args))
    out = world["tmp"] / "run"
    train.main(run_args(world, out, "--max-steps", "2", "--refit-new", "--eval-merged"))
    assert seen == [(world["old"], out / "adapter"), (world["new"], out / "adapter"),
                    (world["new"], out / "refit-new" / "adapter")]


def test_the_vocabulary_check_counts_added_tokens_and_is_exact_at_the_boundary(world, hf_checkpoint):
    from bases import check_tokenizer_fits, load_config, load_tokenizer

    tok = load_tokenizer(world["old"])
    tok.tok.add_special_tokens(["<|extra|>"])  # a token added past the BPE vocabulary
    n = tok.vocab_size
    assert n == tok.tok.get_vocab_size(with_added_tokens=False) + 1 == tok.tok.token_to_id("<|extra|>") + 1
    cfg = load_config(world["old"])
    cfg.vocab_size = n
    check_tokenizer_fits(tok, cfg, "x")  # exactly full: accepted
    cfg.vocab_size = n - 1
    with pytest.raises(ValueError, match=f"has {n} tokens but its model's embedding has {n - 1} rows"):
        check_tokenizer_fits(tok, cfg, "x")


def test_an_absolute_shard_path_in_an_index_is_refused(world):
    def absolute(path):  # the shard inside the directory, named by its absolute path
        (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"lm_head.weight": str(path / "model-00001-of-00001.safetensors")}}))

    refused(["--model", broken_copy(world, "absolute", absolute), "--data", world["data"]],
            "outside the checkpoint directory", main=eval_cli.main)


def test_a_stop_id_past_the_embedding_is_refused(world):
    """generation_config.json's eos_token_id is a stop id of decoding: past the embedding it is refused too."""
    base = broken_copy(world, "stop", lambda p: (p / "generation_config.json").write_text('{"eos_token_id": [0, 600]}'))
    refused(["--model", base, "--data", world["data"]], "The stop token id", "0, 600", "512 embedding rows",
            main=eval_cli.main)
