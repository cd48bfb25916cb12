import torch

from shared_ris.layers import Attention, Multiway, attention_naive, sdpa


def test_sdpa_equals_naive_with_padding_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 37, 16, generator=g) for _ in range(3))
    pad = torch.zeros(3, 37, dtype=torch.bool)
    pad[0, 30:] = True
    pad[2, 20:] = True
    out_naive, weights = attention_naive(q, k, v, pad)
    torch.testing.assert_close(sdpa(q, k, v, pad), out_naive, atol=1e-5, rtol=0)
    # masked keys get exactly zero weight; rows sum to one
    assert weights[0, :, :, 30:].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 37))


def test_naive_reference_is_softmax_qk_v():
    # An independent, loop-level computation for one head of one sample.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 3, generator=g) for _ in range(3))
    pad = torch.tensor([[False, False, False, True, True]])
    out, _ = attention_naive(q, k, v, pad)
    for i in range(5):
        scores = torch.tensor([float(q[0, 0, i] @ k[0, 0, j]) / 3**0.5 for j in range(3)])
        w = torch.exp(scores - scores.max())
        w = w / w.sum()
        expected = sum(w[j] * v[0, 0, j] for j in range(3))
        torch.testing.assert_close(out[0, 0, i], expected, atol=1e-6, rtol=0)


def test_attention_module_paths_agree():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 11, 32)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 7:] = True
    out_fast = attn(x, pad)
    q, k, v = (t.view(2, 11, 4, 8).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))
    out_naive, expected_weights = attention_naive(q, k, v, pad)
    out_naive = attn.proj(out_naive.transpose(1, 2).reshape(2, 11, 32))
    torch.testing.assert_close(out_fast, out_naive, atol=1e-5, rtol=0)
    weights = attn.attention_weights(x, pad)
    assert weights.shape == (2, 4, 11, 11)
    torch.testing.assert_close(weights, expected_weights, atol=0, rtol=0)


def test_multiway_routes_tokens_by_modality():
    mw = Multiway(torch.nn.Linear(4, 4))
    with torch.no_grad():
        mw.B.weight.mul_(-1)
    x = torch.randn(2, 6, 4)
    out = mw(x, split=4)
    torch.testing.assert_close(out[:, :4], mw.A(x[:, :4]))
    torch.testing.assert_close(out[:, 4:], mw.B(x[:, 4:]))
    torch.testing.assert_close(mw(x, split=6), mw.A(x))
