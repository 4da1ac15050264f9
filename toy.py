"""
The toy world: the paper's experiment in miniature, built from nothing on a CPU in minutes.

The paper's story needs three things: a base model that *knows* facts and has *skills*, an update of that base (new
training, some facts changed, new data), and a downstream task that needs both, whose answers do not change with the
update. Here:

    knowledge   the prices of 128 entities ("the price of e12 is 7 ."), learnable only by memorising them
    skills      multiplication in text ("3 * 7 = 21 .") and worked stories that combine the two
                ("ann buys 3 e12 . the price of e12 is 7 . so ann pays 3 * 7 = 21 coins .")
    toy-v1      a tiny Qwen2-style model (width 128, 4 layers, FFN 384, 4 query / 2 KV heads, tied embeddings)
                pretrained, all parameters, on that corpus
    updates     toy-v1 after continued pretraining on a refreshed corpus: 24 of the 32 "volatile" entities get new
                prices, 32 new entities appear, a new attribute (weights) and a new kind of data (addition) are added.
                Three regimes decide which weights the update may change (REGIMES; the others stay byte for byte):
                  full   every parameter, as real model versions are made (toy-v2, toy-v2-u<seed>)
                  ffn    the FFN projections only: a knowledge update, the paper's premise by construction
                         (toy-v2-ffn-u<seed>)
                  attn   the attention projections only: the premise reversed (toy-v2-attn-u<seed>)
    the task    GSM8K-format questions ("sue buys 6 e11 . how many coins ?" -> "e11 costs 15 . 6 * 15 = 90
                #### 90") about the 96 entities whose prices never change, so the gold answers are the same for
                every base. Training questions use entities e0..e31, test questions e32..e95 (256 questions, four per
                entity): a module that passes has learned to *use* the base's knowledge, not to memorise answers.

The vocabulary is one token per word (numbers 0..199 are single tokens; the update's entities are reserved from the
start, as real tokenizers do not change between versions), saved as an ordinary `tokenizer.json`; the models are
ordinary Hugging Face checkpoints (config.json, model.safetensors) that `load_model` and `transformers` both read.
They are cached under `$TRANSPEFT_CACHE` (default ~/.cache/transpeft) by the names above, so later runs skip
pretraining.

    python toy.py                              # build (or find) toy-v1 and toy-v2, print what they know
    python toy.py --regime ffn --update-seed 1 # another update of the same toy-v1: FFN weights only
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import eval_prompt
from bases import cache_dir, load_model, load_tokenizer
from model import ModelConfig, Transformer

# -----------------------------------------------------------------------------------------------------------
# The world

N_OLD, N_NEW = 128, 32  # entities of toy-v1; entities the update adds (tokens reserved from the start)
STABLE = range(0, 96)  # prices that never change: the task is about these
# Test entities outnumber training ones: a test question's errors cluster on its entity (the base's recall of that
# price), so the number of test entities, not of questions, bounds how much one evaluation can tell.
TASK_TRAIN, TASK_TEST = range(0, 32), range(32, 96)
N_TRAIN_QUESTIONS, N_TEST_QUESTIONS = 400, 256
VOLATILE = range(96, 128)  # an update re-prices N_CHANGED of these
N_CHANGED = 24
NAMES = ["ann", "bob", "tom", "sue", "max", "eva", "joe", "amy", "ben", "kim", "leo", "zoe"]
WORDS = ["the", "price", "of", "is", "weight", "buys", "carries", "so", "pays", "coins", "load", "costs", "how", "many",
         "?", ".", "*", "+", "=", "####", "The", "answer", "is:"]
# The words of data.py's prompts, so that the same prompts as for real models tokenize here without <unk>.
PROMPT_WORDS = ["Below", "an", "instruction", "that", "describes", "a", "task.", "Write", "response", "appropriately",
                "completes", "request.", "###", "Instruction:", "Response:", "Let's", "think", "step", "by", "step."]
EOS = "<|endoftext|>"
MAX_NUMBER = 199


def vocabulary() -> list[str]:
    words = [EOS, "<unk>"] + [str(i) for i in range(MAX_NUMBER + 1)] + [f"e{i}" for i in range(N_OLD + N_NEW)] + NAMES
    return words + [w for w in WORDS + PROMPT_WORDS if w not in words]


def make_world(update_seed: int = 0) -> dict:
    """Prices before and after the update, and the update's new facts. toy-v1's world is fixed (seed 0); the
    update's changes are drawn from update_seed."""
    base = random.Random(0)
    prices_v1 = {f"e{i}": base.randint(1, 20) for i in range(N_OLD)}
    upd = random.Random(1000 + update_seed)
    prices_v2 = dict(prices_v1)
    for i in upd.sample(list(VOLATILE), N_CHANGED):
        prices_v2[f"e{i}"] = upd.choice([p for p in range(1, 21) if p != prices_v1[f"e{i}"]])
    for i in range(N_OLD, N_OLD + N_NEW):
        prices_v2[f"e{i}"] = upd.randint(1, 20)
    weights = {f"e{i}": upd.randint(1, 20) for i in range(N_OLD + N_NEW)}
    return {"prices_v1": prices_v1, "prices_v2": prices_v2, "weights": weights}


def sentence(rng: random.Random, prices: dict, weights: dict | None = None) -> str:
    """One random line of the pretraining corpus: a fact, a multiplication, a worked story; with `weights` (the
    update's corpus) also weight facts and stories, and additions."""
    kinds = ["fact", "fact", "mult", "story", "story"] + (["weight", "carry", "add"] if weights else [])
    kind, e = rng.choice(kinds), rng.choice(list(prices))
    q, name = rng.randint(2, 9), rng.choice(NAMES)
    if kind == "fact":  # knowledge, in two phrasings
        return f"the price of {e} is {prices[e]} ." if rng.random() < 0.5 else f"{e} costs {prices[e]} ."
    if kind == "mult":
        a, b = rng.randint(2, 9), rng.randint(1, 20)
        return f"{a} * {b} = {a * b} ."
    if kind == "story":
        p = prices[e]
        story = f"{name} buys {q} {e} . the price of {e} is {p} . so {name} pays {q} * {p} = {q * p} coins ."
        return story + (f" The answer is: {q * p}" if rng.random() < 0.5 else "")
    if kind == "weight":
        return f"the weight of {e} is {weights[e]} ."
    if kind == "carry":
        w = weights[e]
        return f"{name} carries {q} {e} . the weight of {e} is {w} . so the load is {q} * {w} = {q * w} ."
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} + {b} = {a + b} ."


def task_examples(entities, n: int, seed: int, prices: dict) -> list[dict]:
    """GSM8K-format questions: price recall (knowledge) times a quantity (skill), answer ending '#### N'. The
    entities take turns, so each is asked about n / len(entities) times."""
    rng, entities = random.Random(seed), list(entities)
    out = []
    for k in range(n):
        e, q, name = f"e{entities[k % len(entities)]}", rng.randint(2, 9), rng.choice(NAMES)
        p = prices[e]
        out.append({"question": f"{name} buys {q} {e} . how many coins ?",
                    "answer": f"{e} costs {p} . {q} * {p} = {q * p}\n#### {q * p}"})
    return out


def train_prompt(example: dict) -> str:
    """The toy trains on the evaluation prompt itself (a 0.9M-parameter model does not bridge the training prompt and
    the evaluation prompt's extra "Let's think step by step." as large models do), ending in a space: the toy's
    tokenizer splits words at whitespace, so the response must not be glued to the prompt's last word."""
    return eval_prompt(example["question"]) + " "


def task(world: dict) -> tuple[list[dict], list[dict]]:
    """(train, test) of the downstream task; stable entities only, so gold answers hold for both bases."""
    prices = world["prices_v1"]
    assert all(world["prices_v2"][f"e{i}"] == prices[f"e{i}"] for i in STABLE)
    return (task_examples(TASK_TRAIN, N_TRAIN_QUESTIONS, seed=1, prices=prices),
            task_examples(TASK_TEST, N_TEST_QUESTIONS, seed=2, prices=prices))


# -----------------------------------------------------------------------------------------------------------
# The bases: pretraining from scratch, then the update

TOY_CONFIG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=128, intermediate_size=384,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                  use_sliding_window=False, torch_dtype="float32")
DEPTH = TOY_CONFIG["num_hidden_layers"]  # the default world's depth
MAX_DEPTH = 32  # --layers' bound: deeper toys would take hours per arm-seed on a CPU


def toy_config(layers: int = DEPTH) -> dict:
    """The toy model at a depth: every setting of TOY_CONFIG but the number of layers. Width is kept, so that at 8
    layers one arm-seed costs about twice the 4-layer one (the layers are nearly all of the compute) and the
    matrices a LoRA adapts are the same: depth is the one thing that changes."""
    return {**TOY_CONFIG, "num_hidden_layers": layers}


def world_prefix(layers: int = DEPTH) -> str:
    """The bases' names at a depth: toy-v1, toy-v2, ... for the default world; toy8-v1, toy8-v2, ... at 8 layers."""
    return "toy" if layers == DEPTH else f"toy{layers}"


# How each base is made; a cached base built with other settings is rebuilt. toy-v1's steps are the default depth's:
# a deeper world pretrains in proportion to its depth (pretraining_steps).
RECIPE = {"v1": dict(steps=800, batch=32, seq=64, lr=2e-3, weight_decay=0.1, seed=0, corpus=2),
          "v2": dict(steps=200, batch=32, seq=64, lr=5e-4, weight_decay=0.1)}


def pretraining_steps(steps: int, layers: int = DEPTH) -> int:
    """toy-v1's pretraining steps at a depth: the default depth's, times layers / DEPTH beyond it. At 8 layers and 800
    steps the model reaches 4 layers' final loss (0.680 against 0.678) but not its skill: a LoRA trained on it copies
    the question's entity into the answer for the 32 entities it trained on and not for the others (plain LoRA learned
    the task on 16 of 52 pilot arm-seeds, docs/toy-study.md); pretrained 1600 steps, a LoRA on it copies the entity
    of 95-100% of test questions from step 100-150 on, as at 4 layers, and plain LoRA learned on 6 of 6. Shallower
    worlds keep the default's steps."""
    return round(steps * max(1.0, layers / DEPTH))


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode() joins the words with spaces
    tok.add_special_tokens([EOS])
    tok.save(str(path / "tokenizer.json"))


def save_checkpoint(model: Transformer, path: Path, recipe: dict) -> None:
    """An ordinary HF checkpoint: config.json, model.safetensors (lm_head omitted: tied), tokenizer.json."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = vocabulary()
    config = {**toy_config(len(model.model.layers)), "vocab_size": len(vocab), "bos_token_id": None,
              "eos_token_id": vocab.index(EOS)}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    save_tokenizer(tmp)
    (tmp / "toy_recipe.json").write_text(json.dumps(recipe, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # a half-built base never sits under the real name


def pretrain(model: Transformer, lines, steps: int, batch: int, seq: int, lr: float, weight_decay: float,
             desc: str) -> float:
    """Language modelling of the parameters that require grad on a stream of text lines, packed into (batch, seq)
    windows. AdamW, 5% warmup, cosine decay. Returns the last loss."""
    tok_ids = {w: i for i, w in enumerate(vocabulary())}
    eos = tok_ids[EOS]
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones see no update, no weight decay either
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    buffer: list[int] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True)
    for step in bar:
        while len(buffer) < batch * (seq + 1):
            buffer += [tok_ids[w] for w in next(lines).split()] + [eos]
        x = torch.tensor(buffer[: batch * (seq + 1)]).view(batch, seq + 1)  # (B, seq+1)
        buffer = buffer[batch * (seq + 1) :]
        if step < warmup:
            scale = (step + 1) / warmup
        else:
            scale = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def line_stream(seed: int, prices: dict, weights: dict | None = None):
    rng = random.Random(seed)
    while True:
        yield sentence(rng, prices, weights)


# Which parameters an update trains, by name; the rest keep toy-v1's values byte for byte.
REGIMES = {"full": lambda name: True,
           "ffn": lambda name: ".mlp." in name,  # gate, up, down projections
           "attn": lambda name: ".self_attn." in name}  # q, k, v (and their biases), o projections


def update_name(update_seed: int = 0, regime: str = "full", layers: int = DEPTH) -> str:
    prefix = world_prefix(layers)
    if regime == "full":
        return f"{prefix}-v2" if update_seed == 0 else f"{prefix}-v2-u{update_seed}"
    return f"{prefix}-v2-{regime}-u{update_seed}"


def _is_built(path: Path, recipe: dict) -> bool:
    return (path / "toy_recipe.json").exists() and json.loads((path / "toy_recipe.json").read_text()) == recipe


def build_bases(update_seed: int = 0, force: bool = False, recipe: dict = RECIPE, root: Path | None = None,
                regime: str = "full", layers: int = DEPTH) -> tuple[str, str]:
    """toy-v1 and its update (regime: which weights it trains, REGIMES), built unless cached; returns their
    directories (under root, default the cache directory, where the aliases toy-v1, toy-v2, toy-v2-u<seed>,
    toy-v2-<regime>-u<seed> find them; at another depth toy<layers>-v1, ...). About 2 minutes for toy-v1 on 2
    cores, 30 s per update (at 8 layers about twice)."""
    if regime not in REGIMES:
        raise ValueError(f"Unknown update regime {regime!r}: choose one of {', '.join(REGIMES)}.")
    world = make_world(update_seed)
    root = root or cache_dir()
    v1_path = root / f"{world_prefix(layers)}-v1"
    v1_recipe = {**recipe["v1"], "steps": pretraining_steps(recipe["v1"]["steps"], layers),
                 "config": toy_config(layers), "vocab": len(vocabulary())}
    if force or not _is_built(v1_path, v1_recipe):
        t0 = time.time()
        torch.manual_seed(v1_recipe["seed"])
        cfg = ModelConfig.from_hf({**toy_config(layers), "vocab_size": len(vocabulary())})
        model = Transformer(cfg)
        with torch.no_grad():  # GPT-2-style init: N(0, 0.02) everywhere, norms at 1, biases at 0
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0, 0.02)
        r = v1_recipe
        loss = pretrain(model, line_stream(r["seed"], world["prices_v1"]), r["steps"], r["batch"], r["seq"], r["lr"],
                        r["weight_decay"], f"pretrain {v1_path.name}")
        save_checkpoint(model, v1_path, v1_recipe)
        print(f"built {v1_path.name} in {time.time() - t0:.0f}s (final loss {loss:.3f}) at {v1_path}")

    name = update_name(update_seed, regime, layers)
    v2_path = root / name
    v2_recipe = {**recipe["v2"], "update_seed": update_seed, "regime": regime, "from": v1_recipe}
    if force or not _is_built(v2_path, v2_recipe):
        t0 = time.time()
        torch.manual_seed(10_000 + update_seed)
        model = load_model(v1_path)  # continued pretraining, of the regime's parameters only: the update
        for param_name, p in model.named_parameters():
            p.requires_grad = REGIMES[regime](param_name)
        r = recipe["v2"]
        loss = pretrain(model, line_stream(100 + update_seed, world["prices_v2"], world["weights"]), r["steps"],
                        r["batch"], r["seq"], r["lr"], r["weight_decay"], f"update {name}")
        save_checkpoint(model, v2_path, v2_recipe)
        print(f"built {name} in {time.time() - t0:.0f}s (final loss {loss:.3f}) at {v2_path}")
    return str(v1_path), str(v2_path)


# -----------------------------------------------------------------------------------------------------------
# What the bases know


@torch.no_grad()
def price_recall(name: str, prices: dict, entities) -> float:
    """Fraction of entities whose price the base completes correctly after 'the price of eK is'."""
    model, tok = load_model(name), load_tokenizer(name)
    prompts = [f"the price of e{i} is" for i in entities]
    ids = torch.tensor([tok.encode(p) for p in prompts])  # all the same length: one word per token
    guesses = model(ids)[:, -1].argmax(-1).tolist()
    return sum(tok.decode([g]) == str(prices[f"e{i}"]) for g, i in zip(guesses, entities)) / len(prompts)


def describe(update_seed: int = 0, regime: str = "full", layers: int = DEPTH) -> None:
    """Print what the two bases know: the facts the task needs, the facts the update changed, and the new ones."""
    world = make_world(update_seed)
    v1, v2 = (Path(p).name for p in build_bases(update_seed, regime=regime, layers=layers))
    changed = [i for i in VOLATILE if world["prices_v1"][f"e{i}"] != world["prices_v2"][f"e{i}"]]
    rows = [("stable prices (the task's)", list(STABLE), "prices_v1"),
            ("re-priced by the update, old price", changed, "prices_v1"),
            ("re-priced by the update, new price", changed, "prices_v2"),
            ("new entities", list(range(N_OLD, N_OLD + N_NEW)), "prices_v2")]
    print(f"\n{'price recall':<40} {v1:>8} {v2:>18}")
    for title, ents, key in rows:
        print(f"{title:<40} {price_recall(v1, world[key], ents):>8.0%} {price_recall(v2, world[key], ents):>18.0%}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build (or find in the cache) the toy world's two base models.")
    parser.add_argument("--update-seed", type=int, default=0, help="which update of toy-v1 to build (0 = toy-v2)")
    parser.add_argument("--regime", choices=list(REGIMES), default="full", help="which weights the update trains")
    parser.add_argument("--layers", type=int, default=DEPTH, choices=range(1, MAX_DEPTH + 1), metavar="N",
                        help=f"the world's depth (default {DEPTH}; 1 to {MAX_DEPTH})")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    if args.force:
        build_bases(args.update_seed, force=True, regime=args.regime, layers=args.layers)
    describe(args.update_seed, args.regime, args.layers)
