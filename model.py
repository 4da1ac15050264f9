"""
The decoder-only transformer behind Qwen2 / Qwen2.5, Llama 3 / 3.1 / 3.2 and InternLM2 / 2.5, and the code
that loads their Hugging Face checkpoints (safetensors, straight from disk or the hub) and tokenizers.

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

PEFT and Trans-PEFT are post-load steps (lora.py, adapter.py, transpeft.py) that this file does not know, with two
exceptions a reader meets: the loss falls back to plain logits when a PEFT method has wrapped the output head, and the
loader knows the toy models' names (toy-v1, toy-v2, ...) as aliases of directories that toy.py builds.

Shape legend: B batch, T new tokens in this call, S keys attended to (cached + new), C hidden size,
H query heads, K key/value heads, D head_dim, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------
# Configuration

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
    max_position_embeddings: int = 4096  # only the dynamic-NTK RoPE reads it
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
    if name in TOY_MODELS or name.startswith("toy-v2-"):  # toy-v2-u<seed>, toy-v2-<regime>-u<seed>: other updates
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
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    except Exception as e:  # an empty, truncated or foreign file: torch and pickle raise many types
        raise ValueError(f"{path} is not a readable PyTorch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}): "
                         "it is truncated, empty or of another kind.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
    return obj


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: model.safetensors, its sharded index, or (if nothing else) .bin."""

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
        return read_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").exists():
        return {k: v for f in shards("model.safetensors.index.json") for k, v in read_safetensors(path / f).items()}
    index = "pytorch_model.bin.index.json"
    bins = shards(index) if (path / index).exists() else ["pytorch_model.bin"]
    if not (path / bins[0]).exists():
        raise FileNotFoundError(f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin.")
    return {k: v for f in bins for k, v in read_torch_file(path / f).items()}


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


@torch.no_grad()
def load_selected(model: nn.Module, tensors: dict[str, torch.Tensor], select, where: str, hint: str) -> None:
    """Copy `tensors` into the parameters whose names `select(name)` accepts, strictly (names and shapes checked)."""
    params = {n: p for n, p in model.named_parameters() if select(n)}
    check_tensors({n: p.shape for n, p in params.items()}, tensors, where, hint)
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

    sd = read_state_dict(path)
    if cfg.model_type == "internlm2":
        sd = convert_internlm2(sd, cfg)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the output matrix is the embedding; ignore a stored copy

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k,
                v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    check_tensors(expected, sd, str(path), hint="it does not match its config.json")

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

            self.tok, self.sp = HFTokenizer.from_file(str(path / "tokenizer.json")), None
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
    # A quick check that a checkpoint loads: `python model.py qwen2.5-0.5b --prompt "The capital of France is"`.
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
