"""
The decoder-only transformer behind Qwen2 / Qwen2.5, Llama 3 / 3.1 / 3.2 and InternLM2 / 2.5, and its training loss.
(bases.py reads their Hugging Face model files and tokenizers into it.)

All these families share one architecture (pre-norm, RMSNorm, rotary positions, grouped-query attention,
SwiGLU feed-forward):

    h = x + Attn(RMSNorm(x))                                   attention sub-block
    y = h + FFN(RMSNorm(h)),  FFN(u) = W_down (silu(W_gate u) * W_up u)   feed-forward sub-block

    RMSNorm(x)  = w * x / sqrt(mean(x^2) + eps)                computed in float32
    Attn(u)     = W_o softmax(RoPE(W_q u) RoPE(W_k u)^T / sqrt(d) + causal) (W_v u)
    RoPE(q)_pos = q * cos(pos * f) + rotate_half(q) * sin(pos * f)
                  f_j = theta^(-2j/d), rotate_half([q1, q2]) = [-q2, q1]

They differ only in configuration: Qwen2 puts a bias on q/k/v, Llama 3.1/3.2 rescale the RoPE frequencies
("llama3" scaling), InternLM2 packs q/k/v into one `wqkv` matrix and uses dynamic-NTK RoPE, some models tie
the output matrix to the embedding. Module names are Hugging Face's (`model.layers.0.self_attn.q_proj`, ...), so a
Qwen2/Llama checkpoint loads with no renaming and PEFT adapter keys are ours after a fixed prefix.

PEFT and Trans-PEFT are post-load steps (lora.py, adapter.py, transpeft.py) that this file does not know, with one
exception a reader meets: the loss falls back to plain logits when a PEFT method has wrapped the output head.

Shape legend: B batch, T new tokens in this call, S keys attended to (cached + new), C hidden size,
H query heads, K key/value heads, D head_dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------
# Configuration

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "internlm2")
# What two checkpoints must share for a PEFT module (or the drift analysis) to move between them.
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim")
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, named as in Hugging Face's config.json."""

    model_type: str = "llama"  # "qwen2" | "llama" | "internlm2": decides biases and key names, nothing else
    vocab_size: int = 32000  # rows of the embedding (often padded past the tokenizer's vocabulary)
    hidden_size: int = 4096  # C, the width of the residual stream
    intermediate_size: int = 11008  # width of the SwiGLU product, the FFN's "knowledge" channels
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 32  # K; H % K == 0, query head h reads key/value head h // (H/K)
    head_dim: int = 128  # D; explicit in Llama 3.2's config, else hidden_size / heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096  # positions trained on: dynamic NTK reads it, eval.py bounds by it
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None = plain RoPE; else {"rope_type": "llama3" | "dynamic" | "linear", ...}
    tie_word_embeddings: bool = False  # True: lm_head shares model.embed_tokens.weight
    qkv_bias: bool = False  # Qwen2: always True (hard-coded in HF); Llama: attention_bias; InternLM2: bias
    o_bias: bool = False  # Llama: attention_bias; InternLM2: bias; Qwen2: never
    mlp_bias: bool = False  # Llama: mlp_bias
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"  # the dtype the checkpoint's tensors are stored in

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a checkpoint's own config.json, in the hub's (transformers 4) or transformers 5 spelling."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"Unsupported model_type {model_type!r}: transpeft supports {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Qwen2/2.5, Llama 3/3.1/3.2, InternLM2/2.5)."
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Unsupported hidden_act {hf['hidden_act']!r}: these families use 'silu' (SwiGLU).")
        if hf.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported: every Qwen2/2.5 base model has it false.")

        # RoPE: transformers 5 writes rope_parameters = {rope_theta, rope_type, <scaling keys>}; the hub (v4)
        # writes rope_theta at top level plus rope_scaling = {rope_type or (older) type, <scaling keys>}.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        if scaling is not None and rope_type not in ("llama3", "dynamic", "linear"):
            raise ValueError(f"Unsupported RoPE scaling {rope_type!r}: supported are default, llama3, dynamic, linear.")

        missing = [k for k in REQUIRED_FIELDS if hf.get(k) is None]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: it is not a complete {model_type} "
                             "configuration; use the config.json that came with the checkpoint.")
        check_fields(hf, theta)
        heads = hf["num_attention_heads"]
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "llama":
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            mlp_bias = bool(hf.get("mlp_bias", False))
        else:  # internlm2: `bias` applies to wqkv and wo; the FFN never has one
            qkv_bias = o_bias = bool(hf.get("bias", False))
            mlp_bias = False
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )


def check_fields(hf: dict, rope_theta) -> None:
    """Refuse, in one sentence, a config.json value of the wrong type or range (a head count of 0, a size written as a
    string, a token id past the embedding), which would otherwise fail deep inside torch or train silently wrong."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def refuse(name, value, rule):
        raise ValueError(f"config.json's {name} is {value!r}, but it must be {rule}: use the config.json that came "
                         "with the checkpoint.")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if hf.get(name) is not None and not (whole(hf[name]) and hf[name] > 0):
            refuse(name, hf[name], "a positive whole number")
    for name, value in (("rms_norm_eps", hf.get("rms_norm_eps")), ("rope_theta", rope_theta)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 < value < math.inf):
            refuse(name, value, "a positive number")
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if heads % kv:
        refuse("num_key_value_heads", kv, f"a divisor of num_attention_heads ({heads})")
    if hf.get("head_dim") is None and hf["hidden_size"] % heads:
        refuse("num_attention_heads", heads, f"a divisor of hidden_size ({hf['hidden_size']}) where head_dim is absent")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = hf.get(name) if isinstance(hf.get(name), list) else [hf.get(name)]
        if any(i is not None and not (whole(i) and 0 <= i < hf["vocab_size"]) for i in ids):
            refuse(name, hf[name], f"a token id below vocab_size ({hf['vocab_size']}), or absent")


# -----------------------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_inv_freq(cfg: ModelConfig, seq_len: int = 0) -> torch.Tensor:
    """The D/2 rotation frequencies f_j = theta^(-2j/D), float32, after the config's scaling.

    llama3 (Llama 3.1/3.2) is static: it rescales the frequencies for every sequence length. dynamic NTK
    (InternLM2) changes nothing until the sequence outgrows max_position_embeddings, then raises theta.
    """
    d, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "dynamic":
        L, Lmax, factor = max(seq_len, cfg.max_position_embeddings), cfg.max_position_embeddings, s["factor"]
        theta = theta * ((factor * L / Lmax) - (factor - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]  # same as dividing the positions by the factor
    elif kind == "llama3":
        # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, the band between
        # interpolated smoothly; the band edges are wavelengths measured against the original context.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv_freq = torch.where(in_band, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos = [cos a, cos a] and sin = [-sin a, sin a], (B, 1, T, D), already in x's dtype.

    Split-halves convention (HF, GPT-NeoX): dimension j pairs with j + D/2, and the pair (x1, x2) turns by angle a
    into (x1 cos a - x2 sin a, x2 cos a + x1 sin a) = x * cos + roll(x, D/2) * sin with the signs folded into sin.
    HF writes the second term rotate_half(x) * [sin a, sin a] with rotate_half(x) = [-x2, x1]: the same numbers,
    with a negation and a concatenation more (in training, forward and backward; benchmarks/NOTES.md). The other
    convention (interleaved pairs 2j, 2j+1, as in Meta's original Llama code) would need permuted q/k weights; HF
    checkpoints are already permuted for this one, so using the interleaved form here gives fluent garbage."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# -----------------------------------------------------------------------------------------------------------
# The modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the activation dtype: mean(x^2) of bf16 values loses too much precision.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    `k[i]`, `v[i]` are (B, K, max_len, D); `length` counts the positions already written. Each forward
    writes its T new positions at [length, length + T) and the model advances `length` once per call.

    static=True keeps every shape fixed, for torch.compile and CUDA graphs: the write position is `slot`, a tensor
    on the cache's device (`length` is not kept), each call attends over all max_len slots with a mask that hides
    the ones not written yet, and the attention mask, if any, covers all max_len slots. A decoding step then has
    the same shapes and no changing Python number from one token to the next.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device,
                 static: bool = False):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0
        self.static = static
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        if static:  # CUDA graphs may then update these tensors in place at fixed addresses (torch.compile's cudagraphs)
            for t in (*self.k, *self.v, self.slot):
                torch._dynamo.mark_static_address(t)

    def reset(self):
        """Empty the cache for another batch of the same size. Old keys and values may stay: every query attends
        only to slots written since (causal mask), and a static cache keeps its tensors' addresses."""
        self.length = 0
        self.slot.zero_()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at the current position; return all keys/values so far (B, K, S, D), or all
        max_len slots (B, K, max_len, D) when static."""
        if self.static:
            slots = self.slot + torch.arange(k.shape[2], device=k.device)  # (T,)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, HD, KD = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(C, HD, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, KD, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, KD, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(HD, C, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        # mask None: plain causal attention over this call's tokens (no cache, or a cache still empty);
        # else a boolean (B, 1, T, S) mask, True = may attend. Query head h reads kv head h // G, G = H/K
        # (HF's repeat_kv gives the same pairing).
        G = self.n_heads // self.n_kv
        if mask is not None and G > 1:
            # SDPA takes enable_gqa with a mask only in its math kernel on CUDA, which copies every kv head G times
            # and computes in float32 (flash, which reads the kv heads in place, takes no mask). Instead the G query
            # heads of kv head k become G blocks of T query rows of head k: plain attention over K heads, with the
            # mask's rows repeated per block. Padded batches and every step of a static cache come this way.
            q = q.reshape(B, self.n_kv, G * T, self.head_dim)  # (B, K, G*T, D): row g*T + t is head k*G + g, token t
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, G, 1))  # mask (B, 1, G*T, S)
            y = y.view(B, self.n_heads, T, self.head_dim)  # (B, H, T, D)
        else:  # enable_gqa: query head h reads kv head h // G in place
            causal = mask is None and k.shape[2] == T
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=G > 1)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The product is what Trans-PEFT masks (see transpeft.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(I, C, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Transformer(nn.Module):
    """The causal language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                layers=nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)),
                norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, batch_size: int, max_len: int, static: bool = False) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.dtype, p.device, static)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, D) for integer positions (B, T) as apply_rope takes them; angles in float32, then
        cast (as HF does)."""
        inv_freq = self.inv_freq
        rs = self.config.rope_scaling
        if rs and rs["rope_type"] == "dynamic":  # frequencies depend on the longest position in use
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len).to(inv_freq.device)
        angles = position_ids[:, :, None].float() * inv_freq  # (B, T, D/2)
        cos, sin = angles.cos(), angles.sin()
        cos = torch.cat((cos, cos), dim=-1)[:, None]  # (B, 1, T, D)
        sin = torch.cat((-sin, sin), dim=-1)[:, None]  # (B, 1, T, D), the rotation's signs folded in
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T).

        attention_mask: (B, S) with 1 for real tokens and 0 for (left) padding, covering the cached
            positions too when a cache is used; S = cache.length + T (cache.max_len for a static cache).
        position_ids: (B, T); by default counted over the real tokens of attention_mask (so a left-padded
            row gets the same positions as the row alone), or cache.length + arange(T) without a mask.
        cache: a KVCache from new_cache(); this call appends its T positions to it (the caller sizes it: a static
            cache cannot check for room without reading its position back from the device).
        targets: (B, T) the token each position should predict, -100 where there is no loss (prompt, padding).
            If given, the result is the cross-entropy summed over the positions with a target (a scalar), computed
            by linear_cross_entropy without the (B, T, V) logits, the largest tensors of a training step.
        last_only: logits of the last position only, (B, 1, V): all that decoding needs from a prompt.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        static = cache is not None and cache.static
        past = cache.length if cache is not None and not static else 0  # positions already cached (dynamic cache)
        if static:  # the queries' slots as a tensor, all max_len slots as keys (see KVCache)
            slots, S = cache.slot + torch.arange(T, device=dev), cache.max_len  # (T,)
        else:
            slots, S = torch.arange(past, past + T, device=dev), past + T
            if cache is not None and S > cache.max_len:
                raise ValueError(f"The KV cache holds {cache.max_len} positions; this call needs {S}.")
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must be (batch, cached + new) = {(B, S)}, got "
                             f"{tuple(attention_mask.shape)}.")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, slots]  # (B, T)
            else:
                position_ids = slots.expand(B, T)

        # One boolean mask (B, 1, T, S) for all layers, built only when plain causal attention won't do.
        mask = None
        if attention_mask is not None or static or (past > 0 and T > 1):
            q_pos = slots[:, None]  # (T, 1) slots of the queries
            mask = torch.arange(S, device=dev)[None, :] <= q_pos  # (T, S) causal
            mask = mask.expand(B, 1, T, S)
            if attention_mask is not None:
                # A query may see its own slot even when it is padding: a row with no allowed key would make
                # softmax 0/0 = NaN. Padding queries produce ignored outputs either way.
                own = torch.arange(S, device=dev)[None, :] == q_pos  # (T, S)
                mask = (mask & attention_mask.bool()[:, None, None, :]) | own
        # (No mask for one new token without padding: it may see every cached key.)

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if static:
            cache.slot += T
        elif cache is not None:
            cache.length = S
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        if targets is None:
            return self.lm_head(self.model.norm(x))  # (B, T, V)
        keep = targets != -100
        h, t = self.model.norm(x[keep]), targets[keep]  # (N, C), (N,): the final norm and the head only where a loss is
        if not isinstance(self.lm_head, nn.Linear):  # a head wrapped by some PEFT method: plain logits
            return F.cross_entropy(self.lm_head(h).float(), t, reduction="sum")
        return linear_cross_entropy(h, self.lm_head.weight, t)


# -----------------------------------------------------------------------------------------------------------
# The training loss


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 128,
                         max_chunk_elements: int = 2**24) -> torch.Tensor:
    """sum_i CE(W h_i, t_i) = sum_i [logsumexp(W h_i) - (W h_i)_{t_i}] for h (N, C), W (V, C), targets (N,), equal to
    F.cross_entropy(h @ W.T, targets, reduction="sum") but without ever holding the (N, V) logits: rows go through in
    chunks, each one's logits freed before the next. A chunk is chunk_rows rows (at most max_chunk_elements logits,
    64 MB in float32, for large vocabularies): small enough that its logits are still in the CPU's cache for the passes
    after the matmul that writes them (log-softmax, exp, the gradient's matmul), large enough for an efficient matmul
    (benchmarks/NOTES.md, change 13)."""
    chunk = max(1, min(chunk_rows, max_chunk_elements // weight.shape[0]))
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss ends the graph, so each chunk's gradient is known as soon as its logits z = h W^T are:

        dL/dz = softmax(z) - onehot(t),   dL/dh = dL/dz W,   dL/dW = dL/dz^T h   (when W trains)

    forward computes them chunk by chunk and keeps only dL/dh (N, C) and dL/dW; backward scales them by the incoming
    gradient. The two matmuls are the ones autograd would do; what goes is the (N, V) tensors autograd keeps or
    builds around them (log-probabilities saved for backward, a zero-filled gradient for the one-hot, the softmax
    backward's output): two chunk-sized buffers live at a time, and fewer passes run over the logits."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, grad_enabled: bool):
        need_h, need_w = (grad_enabled and n for n in ctx.needs_input_grad[:2])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]  # (n, C), (n,)
            logp = torch.log_softmax((hc @ weight.t()).float(), dim=-1)  # (n, V), float32 even under autocast
            loss -= logp.gather(1, tc[:, None]).sum()
            if need_h or need_w:
                g = logp.exp_()  # softmax, in place
                g[torch.arange(len(tc), device=g.device), tc] -= 1  # dL/dz
                if need_h:
                    grad_h[s : s + chunk] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w += g.t() @ hc.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)
