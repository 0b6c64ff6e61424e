"""Grouped-query self-attention (multi-query when ``num_kv_heads == 1``).

``num_heads`` query heads share ``num_kv_heads`` key/value heads: query head ``h``
reads key/value head ``h // (num_heads // num_kv_heads)`` (the order of
``torch.repeat_interleave`` and of SDPA's ``enable_gqa``).

The K/V heads are never copied per query head. Instead, the query heads of one
group are folded into the sequence axis: a group's ``G`` query heads over ``N``
tokens become one "head" of ``G * N`` queries that attends over the group's ``N``
keys. Without a mask this is exactly grouped-query attention, runs through
``scaled_dot_product_attention`` on every torch >= 2.4, and makes the score
matrix product one large GEMM per K/V head instead of ``G`` small ones.

Off CUDA, sequences of at most ``explicit_max_tokens`` keys (an attribute of each
layer, 32 by default) take three plain products instead of the fused kernel (faster
there; measured by ``python benchmarks/throughput.py --levers``); both paths are tested to agree.
The fused path has a second formulation, SDPA's own grouped-query support
(``enable_gqa=True``, torch >= 2.5), which keeps the query heads apart and lets the kernel
map each one to its K/V head. ``grouping`` (an attribute of each layer) picks "fold",
"native", or "auto": the entry of ``GROUPING_BY_DEVICE`` for the device at hand. Both
formulations are tested to agree in values and gradients; ``python
benchmarks/throughput.py --levers native-gqa`` times one against the other on a device.
``attention_weights(x)`` computes a layer's probabilities on their own, for
explanations; the ordinary forward returns only the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Default token count up to which attention off CUDA runs as explicit matmul-softmax-matmul.
DEFAULT_EXPLICIT_MAX_TOKENS = 32
# The fused formulation that grouping="auto" takes per device type. On the CPU the whole
# step measured equal both ways (docs/benchmarks.md, "Levers"). CUDA keeps the fold until
# the native kernel is measured faster there (benchmarks/gpu.sh).
GROUPING_BY_DEVICE: dict[str, str] = {"cpu": "fold", "cuda": "fold"}
GROUPINGS = ("auto", "fold", "native")
# SDPA's enable_gqa argument arrived in torch 2.5; older versions always fold.
_HAS_NATIVE_GQA = torch.__version__ >= (2, 5)


class GroupedQueryAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int = 1,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        explicit_max_tokens: int = DEFAULT_EXPLICIT_MAX_TOKENS,
        grouping: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads {num_kv_heads} must be a divisor of num_heads {num_heads}"
            )
        self.num_heads = num_heads
        # Off CUDA, up to this many keys take the explicit products; 0 = always fused SDPA.
        self.explicit_max_tokens = explicit_max_tokens
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        # How the fused kernel shares K/V heads: fold query groups into the sequence, or
        # SDPA's enable_gqa; "auto" looks the device up in GROUPING_BY_DEVICE.
        self.grouping = grouping
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        # One fused projection: [q heads | k heads | v heads] along the output axis.
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return q as (B, H, N, hd) and k, v as (B, KV, N, hd)."""
        B, N, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = self.q_norm(q.view(B, N, H, hd)).transpose(1, 2)
        k = self.k_norm(k.view(B, N, KV, hd)).transpose(1, 2)
        v = v.view(B, N, KV, hd).transpose(1, 2)
        return q, k, v

    def _grouped_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return q as (B, KV, G*N, hd) and k, v as (B, KV, N, hd)."""
        q, k, v = self._heads(x)
        B, H, N, hd = q.shape
        # Heads h = g*G .. g*G+G-1 belong to group g: fold them into the sequence.
        return q.reshape(B, self.num_kv_heads, (H // self.num_kv_heads) * N, hd), k, v

    def native_grouping(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` calls SDPA with ``enable_gqa`` instead of folding."""
        grouping = self.grouping
        if grouping == "auto":
            grouping = GROUPING_BY_DEVICE.get(x.device.type, "fold")
        return (grouping == "native" and _HAS_NATIVE_GQA and self.num_kv_heads < self.num_heads
                and (x.device.type == "cuda" or x.shape[1] > self.explicit_max_tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` (B, N, dim); returns (B, N, dim)."""
        B, N, _ = x.shape
        if self.native_grouping(x):
            q, k, v = self._heads(x)
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0, enable_gqa=True)
        else:
            q, k, v = self._grouped_qkv(x)
            # (B, KV, G*N, hd) -> (B, H, N, hd)
            out = self.attend(q, k, v).reshape(B, self.num_heads, N, self.head_dim)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, -1)))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention probabilities (B, num_heads, N, N) that ``forward(x)`` applies
        (without dropout), computed explicitly whichever path ``forward`` takes."""
        B, N, _ = x.shape
        q, k, _ = self._grouped_qkv(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, KV, G*N, N)
        return attn.reshape(B, self.num_heads, N, N)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v over (..., L, hd) x (..., S, hd)."""
        drop = self.attn_drop if self.training else 0.0
        # Off CUDA, with few keys, three plain products beat the fused kernel, whose tiling
        # is built for long sequences (`python benchmarks/throughput.py --levers`;
        # docs/benchmarks.md, "Levers").
        if q.device.type == "cuda" or k.shape[-2] > self.explicit_max_tokens:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return F.dropout(attn, drop) @ v
