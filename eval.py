"""
Evaluation on GSM8K and MATH: batched greedy decoding with the KV cache, and each completion scored as the released
evaluation scores it (scoring.py).

Decoding (the official protocol: greedy, the prompt ending "### Response: Let's think step by step.", stop
strings "Instruction:", "Instruction", "Response:", "Response", and EOS):

    prompts of a batch are LEFT-padded to one length, with an attention mask; positions are counted over the real
    tokens (model.py), so every row computes exactly what it would alone
    prefill: one forward over the padded prompts fills the preallocated KV cache
    decode:  feed the argmax token of every row, one position per step, until each row has emitted EOS or a stop
             string, or max_new_tokens is reached

Prompts are sorted by length before batching, so that rows of a batch need little padding, and the results are
put back in input order. Each completion is scored by scoring.is_correct (both scorers) and written, with the
question, both scorers' predictions and verdicts and the gold answer, to a jsonl file a reader can inspect.

    python eval.py --model qwen2.5 --adapter runs/<run>/adapter [--eval-data gsm8k,math|PATH] [--eval-limit N]
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads ends in one line, not a traceback of the imports
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted while starting"))

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import STOP_STRINGS, eval_prompt
from scoring import SCORERS
from tasks import TASKS, load_eval_sets


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 512, batch_size: int = 16,
             stop_strings: list[str] = STOP_STRINGS, progress=None, lockstep: bool = False,
             compile: bool = False, lookahead: bool | None = None, cuda_graphs: bool | None = None) -> list[str]:
    """Greedy completions of prompts (text after the prompt, cut before the first stop string).
    lockstep: stop a batch only when every process's batch is done (processes must call this with as many prompts).
    compile: run the one-token steps through torch.compile, on a static KV cache (model.KVCache) of one length for
        every batch (the longest prompt + max_new_tokens), so that each batch size compiles once. The first batch
        pays the compilation (10-20 s on a CPU); benchmarks/NOTES.md has what it gives.
    cuda_graphs: with compile, replay each step as a CUDA graph (torch.compile's mode "reduce-overhead"): one launch
        per token instead of one per kernel. Default: on CUDA.
    lookahead: queue each next step before the host reads the current tokens (default: on CUDA; same completions)."""
    model.eval()
    device = model.lm_head.weight.device
    encoded = [tokenizer.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    completions: list[str] = [""] * len(prompts)
    longest_stop = max((len(s) for s in stop_strings), default=0)
    graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
    # With lookahead the next step is queued before the host reads this step's tokens (.tolist() waits for the
    # device): a GPU computes while the host checks stop strings, at the price of one unused step per batch that
    # stops early.
    ahead = device.type == "cuda" if lookahead is None else lookahead
    step = torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None) if compile else model
    static_len = max(map(len, encoded), default=0) + max_new_tokens  # a static cache's length, the same for every batch
    static_caches = {}  # batch size -> its static cache, reused by every batch of that size: a CUDA graph reads and
    # writes the cache at the addresses it was recorded with
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        B, T = len(rows), max(len(encoded[i]) for i in rows)
        max_len = static_len if compile else T + max_new_tokens
        ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.ones((B, max_len), dtype=torch.long)  # every generated position is real
        for b, i in enumerate(rows):  # left padding: the prompt ends at the last column of every row
            ids[b, T - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[b, : T - len(encoded[i])] = 0
        ids, mask = ids.to(device), mask.to(device)
        padded = not bool(mask.all())  # without padding, plain causal attention needs no mask at all

        def visible(n):  # the attention mask for n positions; a static cache always gets all its slots (one graph)
            return mask if compile else mask[:, :n] if padded else None

        if not compile:
            cache = model.new_cache(B, max_len)
        elif B in static_caches:
            cache = static_caches[B]
            cache.reset()
        else:
            cache = static_caches[B] = model.new_cache(B, max_len, static=True)
        logits = model(ids, attention_mask=visible(T), cache=cache, last_only=True)[:, -1]  # (B, V) prefill
        generated = [[] for _ in range(B)]
        done = [False] * B
        for k in range(max_new_tokens):
            next_ids = logits.argmax(-1)  # (B,)
            more = k + 1 < max_new_tokens  # the cache holds max_new_tokens - 1 more steps after the prefill's
            if ahead and more:  # the cache then holds T + k + 1 positions
                logits = step(next_ids[:, None], attention_mask=visible(T + k + 1), cache=cache)[:, -1]
            for b, t in enumerate(next_ids.tolist()):
                if done[b]:
                    continue
                if t in tokenizer.stop_ids:  # EOS, or any end id of generation_config.json
                    done[b] = True
                    continue
                generated[b].append(t)
                if stop_strings:  # only the tail can hold a stop string that just appeared: decode a few tokens
                    tail = tokenizer.decode(generated[b][-(longest_stop + 2) :])
                    done[b] = any(s in tail for s in stop_strings)
            finished = all(done)
            if lockstep:  # continue while any process still decodes: FSDP's forward needs all of them
                flag = torch.tensor([0 if finished else 1], device=device)
                dist.all_reduce(flag)
                finished = flag.item() == 0
            if finished or not more:
                break
            if not ahead:
                logits = step(next_ids[:, None], attention_mask=visible(T + k + 1), cache=cache)[:, -1]
        for b, i in enumerate(rows):
            text = tokenizer.decode(generated[b])
            cut = min([text.find(s) for s in stop_strings if s in text], default=len(text))
            completions[i] = text[:cut]
        if progress is not None:
            progress(rows, completions)
    return completions


def evaluate(model, tokenizer, examples: list[dict], max_new_tokens: int = 512, batch_size: int = 16,
             out_jsonl: str | os.PathLike | None = None, desc: str = "eval", compile: bool = False,
             scorer: str = "official", task: str = "gsm8k") -> dict:
    """Accuracy of model on examples of `task` (a name of tasks.TASKS: GSM8K {question, answer}, MATH {question,
    solution}, a fork's own) by `scorer` (scoring.SCORERS); the other scorer's accuracy is reported beside it, so a
    reader sees how much the rule matters. Per-example records (both predictions and verdicts) to out_jsonl if given.

    Under torchrun every process decodes every N-th example and the records are gathered; process 0 writes them.
    The shares are padded to one length and decoding runs in lockstep, since a model sharded by FSDP needs every
    process in each forward pass."""
    rank, n_proc = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    entry = TASKS[task]
    references = [e[entry.reference] for e in examples]
    mine = list(range(rank, len(examples), n_proc))
    share = math.ceil(len(examples) / n_proc)
    mine += [mine[-1] if mine else 0] * (share - len(mine))  # padding, dropped again below
    prompts = [eval_prompt(examples[i]["question"]) for i in mine]
    bar = tqdm(total=len(mine), desc=desc, unit="q", dynamic_ncols=True, disable=rank != 0)
    correct = seen = 0

    def progress(rows, completions):
        nonlocal correct, seen
        correct += sum(entry.judge(completions[r], references[mine[r]], scorer)[0] for r in rows)
        seen += len(rows)
        bar.update(len(rows))
        bar.set_postfix(acc=f"{correct / seen:.1%}")  # of this process's share

    positions = model.config.max_position_embeddings  # a longer prompt decodes past what the model was trained on
    past = [len(tokenizer.encode(eval_prompt(e["question"]))) > positions for e in examples]
    t0 = time.time()
    completions = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress,
                           lockstep=n_proc > 1, compile=compile)
    bar.close()
    done = {i: c for i, c in zip(mine, completions)}
    if n_proc > 1:
        gathered = [None] * n_proc
        dist.all_gather_object(gathered, done)
        done = {i: c for part in gathered for i, c in part.items()}
    records = []
    for i, e in enumerate(examples):
        judged = {name: entry.judge(done[i], references[i], name) for name in SCORERS}
        record = {"question": e["question"], "completion": done[i], "gold": entry.gold(references[i])}
        for key, value in entry.predictions(done[i]).items():  # what each scorer read (GSM8K: and its rule)
            record["prediction_" + key if key in SCORERS else key] = value
        record.update({f"correct_{name}": verdict for name, (verdict, _) in judged.items()})
        record.update({f"unjudged_{name}": why for name, (_, why) in judged.items() if why})  # scored unequal
        if past[i]:
            record["prompt_past_positions"] = True
        records.append({**record, "correct": judged[scorer][0]})
    if out_jsonl is not None and rank == 0:
        Path(out_jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(out_jsonl, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    n_correct = sum(r["correct"] for r in records)
    result = {"task": task, "scorer": scorer, "accuracy": n_correct / len(records), "correct": n_correct,
              "total": len(records)}
    for name in SCORERS:
        result[f"accuracy_{name}"] = sum(r[f"correct_{name}"] for r in records) / len(records)
        result[f"unjudged_{name}"] = sum(f"unjudged_{name}" in r for r in records)  # counted unequal
    result["prompts_past_positions"] = sum(past)
    return {**result, "seconds": time.time() - t0}


def attach_peft(model, adapter_dir: str | os.PathLike, allow_other_architecture: bool = False):
    """Load a LoRA (PEFT format) or a bottleneck adapter from adapter_dir onto model, whichever the directory holds."""
    import adapter
    import lora

    path = Path(adapter_dir)
    if (path / lora.CONFIG_NAME).exists():
        return lora.load_lora(model, path, allow_other_architecture)
    if (path / adapter.CONFIG_NAME).exists():
        return adapter.load_adapter(model, path, allow_other_architecture)
    raise FileNotFoundError(f"{path} holds no adapter: expected {lora.CONFIG_NAME} (LoRA) or {adapter.CONFIG_NAME}.")


def load_for_eval(base: str, adapter_dir=None, device: str = "cpu", merged: bool = False,
                  allow_other_architecture: bool = False):
    """A base model for decoding, with the adapter in adapter_dir (if any) attached.

    merged=False: the base in bfloat16 on CUDA and float32 elsewhere, the adapter applied beside it (float32 weights).
    merged=True, the released evaluation's path (math_infer/load_peft_utils.py: the base loaded in bfloat16, the
    adapter merged by its bundled peft 0.9.0, the merged bf16 model decoded): W <- W + (alpha/r) B A with every step
    in bfloat16 (lora.merge_lora(in_base_dtype=True)), on any device, and decoding in bfloat16."""
    from lora import lora_layers, merge_lora
    from bases import load_model

    dtype = torch.bfloat16 if merged or device.startswith("cuda") else torch.float32
    model = load_model(base, dtype=dtype, device=device)
    if adapter_dir is not None:
        attach_peft(model, adapter_dir, allow_other_architecture)
        if merged:
            if not lora_layers(model):
                raise ValueError(f"{adapter_dir} is not a LoRA: only a LoRA can be merged into its base (drop "
                                 "--eval-merged).")
            merge_lora(model, in_base_dtype=True)
    return model.eval()


def check_new_tokens(max_new_tokens: int | None, cfg) -> None:
    """--max-new-tokens decides the KV cache's memory: it may not pass the model's positions."""
    if max_new_tokens is not None and max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"--max-new-tokens {max_new_tokens} is more than the model's {cfg.max_position_embeddings} "
                         "positions (config.json max_position_embeddings): give at most that.")


def check_writable(path: Path) -> None:
    """Refuse an output file that cannot be written now, rather than after the whole evaluation."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory: give a file name (e.g. {path / 'eval.jsonl'}).")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"--out {path} cannot be written ({e.strerror}): choose another file.") from None
    if not existed:
        path.unlink()


def unjudged_note(result: dict) -> str:
    """"" or what a reader of the accuracy must know: answers no scorer could judge (scored wrong; the per-example
    file says why), prompts longer than the model's positions."""
    counts = {name: result.get(f"unjudged_{name}", 0) for name in SCORERS}
    notes = []
    if any(counts.values()):
        notes.append("answers that could not be judged, scored wrong (unjudged_* in the per-example file): "
                     + ", ".join(f"{n} by the {name} scorer" for name, n in counts.items()))
    if result.get("prompts_past_positions"):
        notes.append(f"{result['prompts_past_positions']} prompt(s) longer than the model's positions "
                     "(prompt_past_positions in the per-example file)")
    return "; ".join(notes)


def results_table(r: dict) -> str:
    """train.py's final table from its results.json: per task and setting, the accuracy by the chosen scorer, and both
    scorers'."""
    settings = [("source_old", "trained on old, on old (source)", r["old"]),
                ("transfer_new", "same module on new (direct transfer)", r["new"]),
                ("refit_new", "trained on new, on new (upper bound)", r["new"])]
    width = max(len(str(r["old"])), len(str(r["new"])))
    lines = []
    for task in r["tasks"]:
        rows = [(name, base, r[task][key]) for key, name, base in settings if r[task][key]]
        lines += ["", f"{'setting':<38} {'base':<{width}}  {TASKS[task].title} ({rows[0][2]['scorer']} scorer)   "
                  "lenient / official scorer"]
        lines += [f"{name:<38} {str(base):<{width}}  {res['accuracy']:7.2%}  ({res['correct']}/{res['total']}){'':16}"
                  f"{res['accuracy_lenient']:7.2%} / {res['accuracy_official']:.2%}" for name, base, res in rows]
        lines += [f"  {name}: {unjudged_note(res)}" for name, _, res in rows if unjudged_note(res)]
    return "\n".join(lines)


def eval_sources(text: str) -> list[str]:
    """--eval-data's comma list (gsm8k, math, local files), each once."""
    return list(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))


def task_file(path: Path, task: str, several: bool) -> Path:
    """The per-example file of one task: path itself, or path with -<task> before its suffix when there are several."""
    return path.with_name(f"{path.stem}-{task}{path.suffix}") if several else path


def main(argv=None) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C is KeyboardInterrupt again
    import argparse

    from bases import check_checkpoint, check_device, load_config, load_tokenizer

    p = argparse.ArgumentParser(description="GSM8K and MATH accuracy of a base model, with or without an adapter.")
    p.add_argument("--model", required=True, help="alias, local checkpoint directory or hub repo id of the base")
    p.add_argument("--adapter", help="a LoRA (PEFT format) or bottleneck-adapter directory to load onto the base")
    # The evaluation flags are spelled as in train.py; the short spellings are kept as aliases.
    p.add_argument("--eval-data", "--data", dest="eval_data", default="gsm8k",
                   help="comma-separated: gsm8k, math (from the hub), or local .jsonl/.json/.parquet files")
    p.add_argument("--eval-limit", "--limit", dest="eval_limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--eval-batch-size", "--batch-size", dest="eval_batch_size", type=int, default=16,
                   help="prompts decoded at once")
    p.add_argument("--max-new-tokens", type=int,
                   help="default per task, as released: "
                   + ", ".join(f"{name} {task.max_new_tokens}" for name, task in TASKS.items()))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="per-example jsonl (default: beside the adapter, or eval.jsonl; -<task> is added "
                   "before the suffix when several tasks are evaluated)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a static KV cache and the step compiled by torch.compile, replayed as a CUDA "
                        "graph on CUDA (the first batch of each size compiles)")
    p.add_argument("--scorer", choices=SCORERS, default="official",
                   help="official: the released evaluation's rules; lenient: ours (see scoring.py)")
    p.add_argument("--eval-merged", "--merged", dest="eval_merged", action="store_true",
                   help="merge the LoRA into the base in bfloat16 and decode that, as the released evaluation does")
    p.add_argument("--allow-other-architecture", action="store_true",
                   help="load an adapter trained on another model_type")
    args = p.parse_args(argv)
    for name in ("eval_limit", "eval_batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive number")
    try:
        check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    default = Path(args.adapter) / f"eval-{Path(str(args.model)).name}.jsonl" if args.adapter else "eval.jsonl"
    out = Path(args.out or default)
    try:
        sets = load_eval_sets(eval_sources(args.eval_data), args.eval_limit)
        for task in sets:
            check_writable(task_file(out, task, len(sets) > 1))
        check_checkpoint(args.model)
        check_new_tokens(args.max_new_tokens, load_config(args.model))
        model = load_for_eval(args.model, args.adapter, args.device, args.eval_merged, args.allow_other_architecture)
        tokenizer = load_tokenizer(args.model)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    other = next(name for name in SCORERS if name != args.scorer)
    for task, examples in sets.items():
        path = task_file(out, task, len(sets) > 1)
        result = evaluate(model, tokenizer, examples, args.max_new_tokens or TASKS[task].max_new_tokens,
                          args.eval_batch_size, path, desc=f"eval {task}", compile=args.compile, scorer=args.scorer,
                          task=task)
        print(f"{args.model}{' + ' + args.adapter if args.adapter else ''}: {TASKS[task].title} ({args.scorer} scorer) "
              f"{result['accuracy']:.2%} ({result['correct']}/{result['total']}; {other} scorer "
              f"{result['accuracy_' + other]:.2%}) in {result['seconds']:.0f}s; per-example results in {path}")
        if unjudged_note(result):
            print(unjudged_note(result))


if __name__ == "__main__":
    main()
