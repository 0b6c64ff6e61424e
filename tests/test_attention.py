import pytest
import torch
import torch.nn.functional as F

from vit_mqa.models.attention import GroupedQueryAttention


def reference_mha(attn: GroupedQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention, written out, with each K/V head repeated for its group."""
    B, N, D = x.shape
    H, KV, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
    q = q.view(B, N, H, hd).permute(0, 2, 1, 3)
    k = k.view(B, N, KV, hd).permute(0, 2, 1, 3).repeat_interleave(H // KV, dim=1)
    v = v.view(B, N, KV, hd).permute(0, 2, 1, 3).repeat_interleave(H // KV, dim=1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(B, N, D)
    return out @ attn.proj.weight.T + attn.proj.bias, weights


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_matches_reference_multi_head_with_repeated_kv(kv_heads):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(64, 8, kv_heads).double().eval()
    x = torch.randn(3, 17, 64, dtype=torch.float64)
    expected, expected_weights = reference_mha(attn, x)
    out = attn(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn.attention_weights(x), expected_weights,
                               rtol=1e-10, atol=1e-10)
    attn.explicit_max_tokens = 0  # the fused kernel: the same output
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_multi_query_equals_mha_whose_kv_heads_are_one_shared_head():
    """An MHA layer whose 4 K/V heads all carry the same weights == MQA with that head."""
    torch.manual_seed(1)
    D, H = 32, 4
    hd = D // H
    mqa = GroupedQueryAttention(D, H, 1).double()
    mha = GroupedQueryAttention(D, H, H).double()
    wq, wk, wv = mqa.qkv.weight.split([D, hd, hd])
    bq, bk, bv = mqa.qkv.bias.split([D, hd, hd])
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([wq, wk.repeat(H, 1), wv.repeat(H, 1)]))
        mha.qkv.bias.copy_(torch.cat([bq, bk.repeat(H), bv.repeat(H)]))
        mha.proj.load_state_dict(mqa.proj.state_dict())
    x = torch.randn(2, 10, D, dtype=torch.float64)
    torch.testing.assert_close(mqa(x), mha(x), rtol=1e-10, atol=1e-10)


def test_kv_projection_is_shared_not_copied():
    attn = GroupedQueryAttention(64, 8, 1)
    head_dim = 8
    assert attn.qkv.weight.shape == (64 + 2 * head_dim, 64)


def test_uses_sdpa_on_the_ordinary_path(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape, k.shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = GroupedQueryAttention(48, 6, 2)
    assert attn.explicit_max_tokens == 32
    n = attn.explicit_max_tokens + 1
    attn(torch.randn(2, n, 48))
    # Queries of each group are folded into the sequence: (B, KV, G*N, hd) vs (B, KV, N, hd).
    assert calls == [(torch.Size([2, 2, 3 * n, 8]), torch.Size([2, 2, n, 8]))]
    attn.attention_weights(torch.randn(2, n, 48))
    assert len(calls) == 1  # the weights are computed explicitly
    attn(torch.randn(2, n - 1, 48))
    assert len(calls) == 1  # few tokens on a CPU: the explicit products are faster
    # The threshold is per layer: a constructor argument, and an attribute to change.
    few = GroupedQueryAttention(48, 6, 2, explicit_max_tokens=4)
    few(torch.randn(2, 5, 48))
    assert len(calls) == 2
    few.explicit_max_tokens = 5
    few(torch.randn(2, 5, 48))
    assert len(calls) == 2
    assert attn.explicit_max_tokens == 32  # other layers keep theirs


@pytest.mark.parametrize("kv", [1, 3, 6])
def test_explicit_and_fused_paths_agree_in_value_and_gradient(kv):
    torch.manual_seed(0)
    attn = GroupedQueryAttention(48, 6, kv)
    x = torch.randn(3, 17, 48, requires_grad=True)
    explicit = attn(x)
    (g_explicit,) = torch.autograd.grad(explicit.square().sum(), x)
    attn.explicit_max_tokens = 0
    fused = attn(x)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), x)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_explicit, g_fused, atol=1e-4, rtol=1e-4)


def test_qk_norm_normalises_queries_and_keys():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, 4, 2, qk_norm=True).double().eval()
    x = torch.randn(2, 6, 32, dtype=torch.float64) * 100
    q, k, _ = attn._grouped_qkv(x)
    torch.testing.assert_close(q.mean(-1), torch.zeros_like(q.mean(-1)), atol=1e-8, rtol=0)
    torch.testing.assert_close(k.var(-1, unbiased=False), torch.ones_like(k[..., 0]),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("kv", [0, 3, 5])
def test_bad_kv_head_count_is_a_clear_error(kv):
    with pytest.raises(ValueError, match="num_kv_heads"):
        GroupedQueryAttention(64, 4, kv)


@pytest.mark.parametrize("kv", [1, 2, 3])
def test_native_grouping_agrees_with_the_fold_in_value_and_gradient(kv):
    """SDPA's enable_gqa and the folded query groups compute the same attention."""
    torch.manual_seed(0)
    attn = GroupedQueryAttention(48, 6, kv, explicit_max_tokens=0, grouping="fold")
    x = torch.randn(3, 40, 48, requires_grad=True)
    assert not attn.native_grouping(x)
    folded = attn(x)
    grads_fold = torch.autograd.grad(folded.square().sum(), [x, *attn.parameters()])
    attn.grouping = "native"
    assert attn.native_grouping(x)
    native = attn(x)
    grads_native = torch.autograd.grad(native.square().sum(), [x, *attn.parameters()])
    torch.testing.assert_close(native, folded, atol=1e-5, rtol=1e-5)
    for g_native, g_fold in zip(grads_native, grads_fold):
        torch.testing.assert_close(g_native, g_fold, atol=1e-4, rtol=1e-4)


def test_grouping_auto_follows_the_device_table(monkeypatch):
    from vit_mqa.models import attention

    attn = GroupedQueryAttention(48, 6, 1, explicit_max_tokens=0)
    x = torch.randn(2, 8, 48)
    assert attn.grouping == "auto" and not attn.native_grouping(x)  # the CPU folds
    monkeypatch.setitem(attention.GROUPING_BY_DEVICE, "cpu", "native")
    assert attn.native_grouping(x)
    attn.explicit_max_tokens = 8  # few tokens off CUDA: the explicit products, either way
    assert not attn.native_grouping(x)
    mha = GroupedQueryAttention(48, 6, 6, explicit_max_tokens=0, grouping="native")
    assert not mha.native_grouping(x)  # nothing to group: plain multi-head SDPA
    with pytest.raises(ValueError, match="grouping"):
        GroupedQueryAttention(48, 6, 1, grouping="expand")
