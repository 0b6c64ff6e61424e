"""Levers: vit-mqa MQA's default path against one change at a time (torch.compile, bf16,
the attention kernel and formulation, the patch embedding, the optimizer, threads),
everything else fixed."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vit_mqa.models.attention import (
    DEFAULT_EXPLICIT_MAX_TOKENS,
    GROUPING_BY_DEVICE,
    GroupedQueryAttention,
)
from vit_mqa.models.vit import VisionTransformer

from .meters import BenchOptions, Runner, make_runner, math_attention, prepare, time_round_robin
from .peers import build_vit_mqa
from .shapes import Shape


class _AttentionVariant(nn.Module):
    """Another formulation of the same attention layer, sharing its weights."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn


class ExpandedKV(_AttentionVariant):
    """Reference formulation that copies each K/V head once per query head (repeat_interleave)
    and runs ordinary multi-head SDPA: what the folded formulation avoids."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        B, N, _ = x.shape
        H, KV, hd = a.num_heads, a.num_kv_heads, a.head_dim
        q, k, v = a.qkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, N, H, hd).transpose(1, 2)
        k = k.view(B, N, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        v = v.view(B, N, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        out = a.attend(q, k, v)
        return a.proj(out.transpose(1, 2).reshape(B, N, -1))


class SeparateQKV(_AttentionVariant):
    """Three projections (as Hugging Face's ViT has) instead of one fused matmul; same
    weights, sliced from the fused parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        H, KV, hd = a.num_heads, a.num_kv_heads, a.head_dim
        w, b = a.qkv.weight, a.qkv.bias
        sizes = [H * hd, KV * hd, KV * hd]
        ws, bs = w.split(sizes), (b.split(sizes) if b is not None else (None,) * 3)
        q, k, v = (F.linear(x, wi, bi) for wi, bi in zip(ws, bs))
        B, N, _ = x.shape
        G = H // KV
        q = q.view(B, N, KV, G, hd).permute(0, 2, 1, 3, 4).reshape(B, KV, N * G, hd)
        k = k.view(B, N, KV, hd).transpose(1, 2)
        v = v.view(B, N, KV, hd).transpose(1, 2)
        out = a.attend(q, k, v)
        out = out.view(B, KV, N, G, hd).permute(0, 2, 1, 3, 4).reshape(B, N, -1)
        return a.proj(out)


class ConvPatchEmbed(nn.Module):
    """The patch embedding as timm and Hugging Face run it: the strided convolution."""

    def __init__(self, proj: nn.Conv2d) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def swap_attention(model: VisionTransformer, wrapper: type[nn.Module]) -> VisionTransformer:
    for block in model.blocks:
        block.attn = wrapper(block.attn)
    return model


LEVERS: dict[str, str] = {
    "compile": "torch.compile",
    "bf16": "bf16 autocast",
    "fused-sdpa": "fused SDPA kernel at every token count",
    "sdpa-math": "SDPA math backend (no fused kernel)",
    "expanded-kv": "K/V copied per query head (repeat_interleave)",
    "native-gqa": "SDPA's enable_gqa instead of folding query groups (fused path)",
    "separate-qkv": "separate Q, K, V projections",
    "conv-patch": "patch embedding as a strided convolution",
    "adamw-foreach": "AdamW foreach instead of fused",
    "adamw-for-loop": "AdamW for-loop instead of fused",
    "no-grad": "inference under no_grad instead of inference_mode",
    "one-thread": "1 intra-op thread",
}


def lever_description(name: str, opts: BenchOptions) -> str:
    """What the changed runner does, given what the default path is on this run."""
    if name == "bf16" and opts.dtype == "bf16":
        return "fp32 instead of bf16 autocast"
    if name == "compile" and opts.compile:
        return "eager instead of torch.compile"
    if name == "native-gqa" and _native_by_default(opts):
        return "query groups folded instead of SDPA's enable_gqa (fused path)"
    return LEVERS[name]


def levers(shape: Shape, modes: list[str], batch_sizes: dict[str, int], opts: BenchOptions,
           say: Callable[[str], None], names: list[str] | None = None) -> list[dict[str, Any]]:
    """vit-mqa MQA's default path against one change at a time."""
    names = names or list(LEVERS)
    rows = []
    for mode in modes:
        if mode == "train" and opts.device.type == "cpu" and not shape.train_on_cpu:
            continue
        for name in names:
            if name == "no-grad" and mode == "train":
                continue
            if name.startswith("adamw") and mode == "infer":
                continue
            if name in ("one-thread", "fused-sdpa") and opts.device.type == "cuda":
                continue  # no intra-op threads to set; the fused kernel is always used there
            if (name == "native-gqa" and opts.device.type != "cuda"
                    and shape.tokens <= DEFAULT_EXPLICIT_MAX_TOKENS):
                continue  # few tokens off CUDA take the explicit products, either way
            variant_opts = opts
            if name == "compile":
                variant_opts = dataclasses.replace(opts, compile=not opts.compile)
            if name == "bf16":
                variant_opts = dataclasses.replace(
                    opts, dtype="fp32" if opts.dtype == "bf16" else "bf16")
            runners = []
            for variant in ("default", name):
                torch.manual_seed(0)
                model = build_vit_mqa(shape, 1)
                kwargs: dict[str, Any] = {}
                use = opts
                if variant != "default":
                    use = variant_opts
                    if name == "expanded-kv":
                        swap_attention(model, ExpandedKV)
                    elif name == "separate-qkv":
                        swap_attention(model, SeparateQKV)
                    elif name == "fused-sdpa":
                        fused_attention_everywhere(model)
                    elif name == "native-gqa":
                        _set_grouping(model, "fold" if _native_by_default(opts) else "native")
                    elif name == "conv-patch":
                        model.patch_embed = ConvPatchEmbed(model.patch_embed.proj)
                    elif name == "adamw-foreach":
                        kwargs["optimizer"] = "foreach"
                    elif name == "adamw-for-loop":
                        kwargs["optimizer"] = "for-loop"
                    elif name == "no-grad":
                        kwargs["inference"] = "no_grad"
                runner = make_runner(variant, LEVERS[name] if variant != "default" else
                                     "default", model, mode, shape, batch_sizes[mode], use,
                                     **kwargs)
                runner.flops_per_image = 0  # not needed here
                runners.append(runner)
            with _lever_context(name, opts, runners):
                for r in runners:
                    prepare(r, opts)
                time_round_robin(runners, opts)
            base, changed = (statistics.median(r.rates) for r in runners)
            rows.append({"shape": shape.name, "mode": mode, "lever": name,
                         "description": lever_description(name, opts),
                         "default_images_per_s": base,
                         "changed_images_per_s": changed, "ratio": changed / base})
            say(f"lever {name} ({mode}): {changed / base:.2f}x")
    return rows


@contextlib.contextmanager
def _lever_context(name: str, opts: BenchOptions, runners: list[Runner]) -> Iterator[None]:
    """Levers that are process settings wrap only the changed runner's step."""
    if name == "sdpa-math":
        _wrap_step(runners[1], math_attention)
    elif name == "one-thread":
        def one_thread() -> contextlib.AbstractContextManager[None]:
            return _threads(1)
        _wrap_step(runners[1], one_thread)
    yield


def _wrap_step(runner: Runner, context: Callable[[], contextlib.AbstractContextManager]) -> None:
    inner = runner.step

    def step() -> Any:
        with context():
            return inner()
    runner.step = step


def _native_by_default(opts: BenchOptions) -> bool:
    return GROUPING_BY_DEVICE.get(opts.device.type, "fold") == "native"


def _set_grouping(model: nn.Module, grouping: str) -> None:
    for module in model.modules():
        if isinstance(module, GroupedQueryAttention):
            module.grouping = grouping


def fused_attention_everywhere(model: nn.Module) -> None:
    """Make every attention layer of ``model`` take the fused SDPA kernel at any length."""
    for module in model.modules():
        if isinstance(module, GroupedQueryAttention):
            module.explicit_max_tokens = 0


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
