"""
Reading base models (Hugging Face model directories) into model.py's Transformer: finding them (an alias, a local
directory, a hub repo id, the offline hub cache), reading their files (config.json, safetensors straight or sharded,
legacy .bin) strictly (every tensor accounted for, every shape checked, errors that name the tensor), converting
InternLM2's names and packed `wqkv`, and the tokenizer that the model's own files describe.

    python bases.py qwen2.5-0.5b --prompt "The capital of France is"   # does it load, and what does it say?

Also here, because lora.py and adapter.py save and load through them: the process that writes files under torchrun
(is_main_process), gathering an FSDP-sharded tensor (full_tensor), and the check that a saved PEFT module was
trained on this architecture (check_made_for).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from model import ARCH_FIELDS, ModelConfig, Transformer, rope_inv_freq

ALIASES = {
    "qwen2": "Qwen/Qwen2-7B",
    "qwen2.5": "Qwen/Qwen2.5-7B",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "llama3": "meta-llama/Meta-Llama-3-8B",
    "llama3.1": "meta-llama/Llama-3.1-8B",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "internlm2": "internlm/internlm2-7b",
    "internlm2.5": "internlm/internlm2_5-7b",
}
# The toy world's two base models are built locally by toy.py and cached on disk; they are aliases too.
TOY_MODELS = ("toy-v1", "toy-v2")

# -----------------------------------------------------------------------------------------------------------
# Finding a checkpoint: alias, local directory or hub repo id

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json"]


def cache_dir() -> Path:
    """Where transpeft keeps what it builds (the toy world's checkpoints): $TRANSPEFT_CACHE or ~/.cache/transpeft."""
    return Path(os.environ.get("TRANSPEFT_CACHE") or Path.home() / ".cache" / "transpeft")


def resolve_checkpoint(name_or_path: str | os.PathLike, config_only: bool = False) -> Path:
    """A local directory holding the checkpoint, downloading config, weights and tokenizer from the hub if needed
    (config.json alone with config_only)."""
    name = str(name_or_path)
    if re.fullmatch(r"toy\d*-v(1|2(-[\w-]+)?)", name):  # toy-v2-u<seed>, toy-v2-<regime>-u<seed>; toy8-v1: depth 8
        path = cache_dir() / name
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"The toy model {name} has not been built yet (looked in {path}): run `python "
                                    "train.py` or `python toy.py` first.")
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: pass the directory of a Hugging Face checkpoint.")
        return path
    repo_id = ALIASES.get(name.lower(), name)
    if repo_id.count("/") != 1 or path.exists():
        known = ", ".join(list(ALIASES) + list(TOY_MODELS))
        raise ValueError(f"Unknown model {name!r}: not a directory, not a hub repo id (org/name), and not an alias "
                         f"({known}).")
    return _download(repo_id, config_only)


def _download(repo_id: str, config_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    def fetch(patterns):
        return Path(snapshot_download(repo_id, allow_patterns=patterns))

    try:
        path = fetch(["config.json"] if config_only else HUB_FILES + ["*.safetensors", "model.safetensors.index.json"])
        if not config_only and not any(path.glob("*.safetensors")):  # internlm2-7b publishes only .bin shards
            path = fetch(HUB_FILES + ["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    except Exception as e:  # offline, no network, gated or missing repo: huggingface_hub raises many types
        raise OSError(
            f"Could not get {repo_id} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Pass a local checkpoint directory instead, or set HF_HUB_OFFLINE=1 to use a copy already in the hub cache "
            "(gated models such as Llama also need `huggingface-cli login`)."
        ) from None
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{repo_id} has no config.json on the hub: is it a model repository?")
    return path


# -----------------------------------------------------------------------------------------------------------
# Loading weights


def read_json(path: Path) -> dict | list:
    """A JSON file's content; a missing or malformed file is one sentence that names it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): restore the file, or write it again.") from None


def read_safetensors(path: Path, with_metadata: bool = False):
    """Every tensor of one .safetensors file (and its string metadata, with_metadata); a truncated or foreign file is
    one sentence that names it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except Exception as e:  # safetensors raises its own error type (and OSError) for a truncated or garbage file
        raise ValueError(f"{path} is not a readable safetensors file ({str(e)[:120]}): it is truncated or corrupt; "
                         "download or save it again.") from None
    return (tensors, metadata) if with_metadata else tensors


def read_torch_file(path: Path) -> dict:
    """A torch.save'd dict (weights_only: unpickling arbitrary objects can run code); one sentence if unreadable."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except Exception as e:  # an empty, truncated or foreign file: torch and pickle raise many types
        raise ValueError(f"{path} is not a readable PyTorch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}): "
                         "it is truncated, empty or of another kind.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
    return obj


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: model.safetensors, its sharded index's files, or (if nothing
    else) pytorch_model.bin or its shards."""

    def shards(index_name):
        index = read_json(path / index_name)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{path / index_name} has no weight_map: it is not a sharded checkpoint's index.")
        files = sorted(set(index["weight_map"].values()))
        for f in files:  # checked by name, not by resolving: a hub snapshot's files are symlinks into blobs/
            if Path(f).is_absolute() or ".." in Path(f).parts:
                raise ValueError(f"{path / index_name} names the file {f!r}, outside the checkpoint directory: "
                                 "refused.")
        return files

    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    if (path / "model.safetensors.index.json").exists():
        return [path / f for f in shards("model.safetensors.index.json")]
    index = "pytorch_model.bin.index.json"
    bins = shards(index) if (path / index).exists() else ["pytorch_model.bin"]
    if not (path / bins[0]).exists():
        raise FileNotFoundError(f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin.")
    return [path / f for f in bins]


def read_state_dict(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (weight_files). shapes_only: `meta` tensors of the stored shapes, read
    from the safetensors headers alone (a .bin file is read whole)."""
    found = {}
    for f in weight_files(path):
        if f.suffix != ".safetensors":
            tensors = read_torch_file(f)
        elif shapes_only:
            tensors = {k: torch.empty(shape, device="meta") for k, shape in read_safetensors_shapes(f).items()}
        else:
            tensors = read_safetensors(f)
        if not shapes_only:
            check_finite(tensors, str(f))
        found.update({k: v.to("meta") if shapes_only else v for k, v in tensors.items()})
    return found


def read_safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a .safetensors file, from its header (safetensors checks there that the file holds all
    the data the header promises); a truncated or foreign file is one sentence that names it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({str(e)[:120]}): it is truncated or corrupt; "
                         "download or save it again.") from None


def check_tensors(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], where: str, hint: str) -> None:
    """Strict loading: the names must be exactly `expected` and every shape must fit; else one sentence naming the
    first mismatch."""
    missing = [k for k in expected if k not in found]
    if missing:
        k = missing[0]
        raise ValueError(f"{where} is missing tensor {k} (shape {tuple(expected[k])}) and {len(missing) - 1} more: "
                         f"{hint}.")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise ValueError(f"{where} has tensor {unexpected[0]}, which the model does not have ({len(unexpected)} such "
                         f"tensors): {hint}.")
    for k, shape in expected.items():
        if found[k].shape != shape:
            raise ValueError(f"Tensor {k} in {where} has shape {tuple(found[k].shape)}, but the model expects "
                             f"{tuple(shape)}: {hint}.")


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a file holding a NaN or an infinity: loaded, it would decode nothing and report 0%, or end training with
    a loss of NaN. Read in chunks, so that a large tensor needs no mask of its own size."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.device.type != "meta":
            if not all(torch.isfinite(chunk).all() for chunk in t.detach().reshape(-1).split(1 << 24)):
                raise ValueError(f"{where}: tensor {name} holds NaN or infinite values: the file is corrupt or was "
                                 "saved from a diverged run; use another copy.")


@torch.no_grad()
def load_selected(model: nn.Module, tensors: dict[str, torch.Tensor], select, where: str, hint: str) -> None:
    """Copy `tensors` into the parameters whose names `select(name)` accepts, strictly (names, shapes and finite
    values checked)."""
    params = {n: p for n, p in model.named_parameters() if select(n)}
    check_tensors({n: p.shape for n, p in params.items()}, tensors, where, hint)
    check_finite(tensors, where)
    for n, p in params.items():
        p.copy_(tensors[n])


def check_made_for(model: nn.Module, model_type: str | None, where: str, allow_other: bool = False) -> None:
    """Refuse a PEFT module trained on another model_type than model's: the shapes can agree (a Llama and a Qwen2 of
    one size) while the function is another. model_type None (unknown) passes."""
    if model_type and model_type != model.config.model_type and not allow_other:
        raise ValueError(f"{where} was trained on a {model_type} model and this base is a {model.config.model_type} "
                         "model: load it on a base of its own architecture (or pass allow_other_architecture=True / "
                         "--allow-other-architecture if you mean it).")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter sharded across processes by FSDP2 (a DTensor), gathered whole; every process must call this
    together. A plain tensor comes back as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def is_main_process() -> bool:
    """True in a single-process run, and in process 0 of a torchrun job: the one that prints and writes files."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print_trainable(model: nn.Module) -> None:
    if not is_main_process():
        return
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")


def convert_internlm2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename InternLM2 tensors to HF Llama names and split the packed `wqkv` into q_proj / k_proj / v_proj.

    wqkv's rows are grouped by key/value head: for each of the K kv heads, its G = H/K query heads, then its
    key head, then its value head, D rows each (InternLM's own code views the output as (K, G + 2, D)).
    Query head number kv * G + j is therefore the j-th slot of group kv, the same pairing as repeat_kv.
    """
    K, G, D = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    renames = {
        "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    }
    out = {}
    for key, t in sd.items():
        if key == "model.tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif key == "output.weight":
            out["lm_head.weight"] = t
        elif ".attention.wqkv." in key:
            prefix, kind = key.split(".attention.wqkv.")  # kind: "weight" or "bias"
            packed = t.view(K, G + 2, D, -1)  # (K, G+2, D, C) for the weight, (K, G+2, D, 1) for the bias
            parts = {"q_proj": packed[:, :G], "k_proj": packed[:, G], "v_proj": packed[:, G + 1]}
            for proj, p in parts.items():
                p = p.reshape(-1, t.shape[-1]) if kind == "weight" else p.reshape(-1)
                out[f"{prefix}.self_attn.{proj}.{kind}"] = p
        else:
            for old, new in renames.items():
                key = key.replace(f".{old}.", f".{new}.")
            out[key] = t
    return out


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A checkpoint's ModelConfig, downloading nothing but config.json for a hub id."""
    path = resolve_checkpoint(name_or_path, config_only=True) / "config.json"
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a {type(hf).__name__}, not a model configuration.")
    try:
        return ModelConfig.from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def check_same_architecture(a: ModelConfig, b: ModelConfig, name_a: str, name_b: str) -> None:
    """Refuse two checkpoints that a PEFT module (or the drift analysis) cannot move between: they must agree in every
    field of model.ARCH_FIELDS."""
    for field in ARCH_FIELDS:
        if getattr(a, field) != getattr(b, field):
            raise ValueError(f"{name_a} and {name_b} differ in {field} ({getattr(a, field)} vs {getattr(b, field)}): a "
                             "module or analysis made for one does not fit the other; pick two versions of the same "
                             "architecture and size.")


def check_device(name: str) -> torch.device:
    """torch.device(name), or a ValueError that says what is wrong with it (before any work starts)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name} is not a device torch knows: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but this torch sees no CUDA device: run on a GPU machine with a CUDA "
                         "build of torch, or pass --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}, but there are only {torch.cuda.device_count()} CUDA devices.")
    return device


def _checked_tensors(path: Path, cfg: ModelConfig, shapes_only: bool = False) -> tuple[Transformer, dict]:
    """A weightless (meta) model of cfg, and the checkpoint's tensors in its names, checked strictly against it."""
    sd = read_state_dict(path, shapes_only)
    if cfg.model_type == "internlm2":
        sd = convert_internlm2(sd, cfg)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the output matrix is the embedding; ignore a stored copy
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k,
                v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    check_tensors(expected, sd, str(path), hint="it does not match its config.json")
    return model, sd


def check_checkpoint(name_or_path: str | os.PathLike) -> None:
    """Everything load_model and load_tokenizer will check, read now and without the weights' data (safetensors
    headers): so that a base used late in a run (the new base, after training) is refused before any compute. The
    tokenizer must also fit the embedding: no id past its rows."""
    path = resolve_checkpoint(name_or_path)
    cfg = load_config(path)
    _checked_tensors(path, cfg, shapes_only=True)
    check_tokenizer_fits(Tokenizer(path), cfg, name_or_path)


def check_tokenizer_fits(tokenizer: "Tokenizer", cfg: ModelConfig, name: str, model: str = "its model") -> None:
    """No id the tokenizer of `name` gives (its vocabulary with the added tokens, BOS, EOS, the pad and every stop id)
    may be past the embedding rows of `model` (config cfg): it would end a run at its first step, or decode garbage."""
    why = ("the files belong to different models" if model == "its model" else
           "the two do not share a vocabulary: pick two versions of the same model")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"The tokenizer of {name} has {tokenizer.vocab_size} tokens but {model}'s embedding has "
                         f"{cfg.vocab_size} rows (config.json vocab_size): {why}.")
    special = {"BOS": [tokenizer.bos_token_id], "EOS": [tokenizer.eos_token_id], "pad": [tokenizer.pad_token_id],
               "stop": sorted(i for i in tokenizer.stop_ids if i is not None)}
    for what, ids in special.items():
        if any(i is not None and not 0 <= i < cfg.vocab_size for i in ids):
            raise ValueError(f"The {what} token id of {name} ({', '.join(map(str, ids))}, from its tokenizer or "
                             f"config files) is past {model}'s {cfg.vocab_size} embedding rows: {why}.")


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> Transformer:
    """Load a checkpoint (alias, local directory or hub repo id) strictly: every tensor must be used, and fit.

    dtype None keeps the dtype the checkpoint stores (bf16 for the real models). The model is built on the
    `meta` device (no memory, no random init) and the loaded tensors are assigned in place of its parameters.
    """
    path = resolve_checkpoint(name_or_path)
    cfg = load_config(path)
    if dtype is None:
        dtype = getattr(torch, cfg.torch_dtype.replace("torch.", ""), torch.float32)

    model, sd = _checked_tensors(path, cfg)

    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    # Non-persistent buffers are not in the checkpoint: recompute RoPE on the real device (in float32),
    # and re-tie, since assign=True replaced the embedding Parameter that lm_head was sharing.
    model.inv_freq = rope_inv_freq(cfg).to(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.name_or_path = str(name_or_path)
    return model.eval()


# -----------------------------------------------------------------------------------------------------------
# Tokenizer

# The families' conventions for base models, used only where a checkpoint's files do not say:
# (bos, eos, whether a SentencePiece tokenizer.model starts every sequence with BOS).
FAMILY_TOKENS = {
    "qwen2": (None, "<|endoftext|>", False),
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", True),
    "internlm2": ("<s>", "</s>", True),
}


class Tokenizer:
    """A checkpoint's tokenizer, giving the ids transformers' AutoTokenizer gives (transformers 5, checked in
    tests/test_tokenizer.py), from the checkpoint's own files:

    tokenizer.json (through the `tokenizers` library): its post-processor decides which special tokens surround a
        text: Llama 3's adds <|begin_of_text|>, Llama 2's <s>, Qwen2's (ByteLevel) nothing, a missing one nothing.
        transformers 5 ignores tokenizer_config.json's add_bos_token / add_eos_token for these, and so does this.
    tokenizer.model alone (SentencePiece, e.g. internlm/internlm2-7b; through the `sentencepiece` library): BOS as
        tokenizer_config.json's add_bos_token says, else as the family does (InternLM2, Llama: yes); EOS likewise
        from add_eos_token (default no), as transformers' slow SentencePiece tokenizers do.

    eos_token_id is what training appends to a response (tokenizer_config.json's eos_token, else the family's,
    else config.json's); stop_ids is every id that ends generation: eos_token_id and generation_config.json's
    eos_token_id, which may be a list (Llama 3.1 Instruct: [128001, 128008, 128009]).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        hf = read_json(path / "config.json") if (path / "config.json").exists() else {}
        tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        gen = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
        bos, eos, sp_add_bos = FAMILY_TOKENS.get(hf.get("model_type"), (None, None, False))
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self.tok, self.sp = HFTokenizer.from_file(str(path / "tokenizer.json")), None
            except Exception as e:  # the tokenizers library raises its own error type for a malformed file
                raise ValueError(f"{path / 'tokenizer.json'} is not a readable tokenizer ({str(e)[:120]}): restore "
                                 "it from the checkpoint.") from None
            self.add_bos = self.add_eos = False  # the post-processor adds what the checkpoint wants
        elif (path / "tokenizer.model").exists():
            self.tok, self.sp = None, self._load_sentencepiece(path / "tokenizer.model")
            self.add_bos, self.add_eos = bool(tc.get("add_bos_token", sp_add_bos)), bool(tc.get("add_eos_token", False))
        else:
            raise FileNotFoundError(f"{path} has no tokenizer.json or tokenizer.model: pass a checkpoint directory "
                                    "that has its tokenizer.")
        # Precedence: tokenizer_config.json's token strings, then the family's, then config.json's ids.
        self.bos_token_id = self._token_id(tc.get("bos_token", bos), hf.get("bos_token_id"))
        self.eos_token_id = self._token_id(tc.get("eos_token", eos), hf.get("eos_token_id"))
        pad = self._token_id(tc.get("pad_token"), hf.get("pad_token_id"))
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        more = gen.get("eos_token_id")
        more = more if isinstance(more, list) else [more] if more is not None else []
        self.stop_ids = {self.eos_token_id} | set(more)
        self.stop_ids.discard(None)
        if self.add_bos and self.bos_token_id is None:
            raise ValueError(f"{path}: this tokenizer starts sequences with a BOS token, but none is known "
                             "(tokenizer_config.json's bos_token).")

    @staticmethod
    def _load_sentencepiece(model_file: Path):
        try:
            import sentencepiece
        except ImportError:
            raise ValueError(f"{model_file.parent} has only a SentencePiece tokenizer.model, which needs the "
                             "sentencepiece package: pip install -r requirements.txt.") from None
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file} is not a readable SentencePiece model "
                             f"({str(e).splitlines()[0][:120]}).") from None
        return sp

    def token_to_id(self, token: str) -> int | None:
        if self.sp is None:
            return self.tok.token_to_id(token)
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i

    def _token_id(self, token, fallback_id) -> int | None:
        if isinstance(token, dict):  # tokenizer_config may store {"content": "<s>", ...}
            token = token.get("content")
        tid = self.token_to_id(token) if token else None
        if tid is None and fallback_id is not None:
            tid = fallback_id[0] if isinstance(fallback_id, list) else fallback_id
        return tid

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() if self.sp is not None else self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text with the special tokens the checkpoint puts around every text (see the class)."""
        if self.sp is None:
            return self.tok.encode(text).ids
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_token_id] * self.add_bos + ids + [self.eos_token_id] * self.add_eos

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if self.sp is None:
            return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not self.sp.IsControl(i)]
        return self.sp.DecodeIds(ids)


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint given as alias, local directory or hub repo id."""
    return Tokenizer(resolve_checkpoint(name_or_path))


if __name__ == "__main__":
    # A quick check that a base model loads: `python bases.py qwen2.5-0.5b --prompt "The capital of France is"`.
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Load a checkpoint, print its shape and (with --prompt) its "
                                                 "next-token guesses.")
    parser.add_argument("model", help="an alias, a local checkpoint directory or a hub repo id")
    parser.add_argument("--prompt", help="print the 5 most likely next tokens after this text")
    args = parser.parse_args()
    try:
        model = load_model(args.model)
        tokenizer = load_tokenizer(args.model) if args.prompt else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {c.model_type}, {n_params / 1e6:.1f}M parameters, {c.num_hidden_layers} layers, hidden "
          f"{c.hidden_size}, "
          f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, dtype {model.lm_head.weight.dtype}")
    if tokenizer is not None:
        ids = torch.tensor([tokenizer.encode(args.prompt)])
        with torch.no_grad():
            probs = model(ids)[0, -1].float().softmax(-1)
        for p, i in zip(*probs.topk(5)):
            print(f"{p.item():6.3f}  {tokenizer.decode([i.item()], skip_special_tokens=False)!r}")
