"""The encoder against the official BEiT-3 layout and an independent functional reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from shared_ris.model import BEiT3, CheckpointError, load_beit3_checkpoint, resample_vision_positions


def official_base_layout(image_size=480, final_norm=True):
    """Key → shape of the official base checkpoint (without the beit3. prefix), from beit3.md."""
    D, ffn, vocab, patch = 768, 3072, 64010, 16
    n = (image_size // patch) ** 2
    keys = {
        "text_embed.weight": (vocab, D),
        "vision_embed.proj.weight": (D, 3, patch, patch),
        "vision_embed.proj.bias": (D,),
        "vision_embed.cls_token": (1, 1, D),
        "vision_embed.mask_token": (1, 1, D),
        "encoder.embed_positions.A.weight": (n + 3, D),
        "encoder.embed_positions.B.weight": (1024, D),
    }
    for i in range(12):
        p = f"encoder.layers.{i}."
        for e in "AB":
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                keys[f"{p}self_attn.{proj}.{e}.weight"] = (D, D)
                keys[f"{p}self_attn.{proj}.{e}.bias"] = (D,)
            for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                keys[f"{p}{ln}.{e}.weight"] = (D,)
                keys[f"{p}{ln}.{e}.bias"] = (D,)
            keys[f"{p}ffn.{e}.fc1.weight"] = (4 * D, D)
            keys[f"{p}ffn.{e}.fc1.bias"] = (4 * D,)
            keys[f"{p}ffn.{e}.fc2.weight"] = (D, 4 * D)
            keys[f"{p}ffn.{e}.fc2.bias"] = (D,)
            keys[f"{p}ffn.{e}.ffn_layernorm.weight"] = (4 * D,)
            keys[f"{p}ffn.{e}.ffn_layernorm.bias"] = (4 * D,)
    if final_norm:
        for e in "AB":
            keys[f"encoder.layer_norm.{e}.weight"] = (D,)
            keys[f"encoder.layer_norm.{e}.bias"] = (D,)
    return keys


def test_base_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = BEiT3(image_size=480)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_base_layout(480)
    assert len(expected) == 491
    assert ours == expected
    assert sum(v.numel() for v in model.parameters()) == 221_528_064  # 221.5 M at 480


def tiny_encoder(image_size=64, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(image_size=image_size, patch_size=16, embed_dim=32, depth=2, num_heads=4, ffn_dim=64,
                vocab_size=50, max_text_positions=24)
    args.update(kw)
    return BEiT3(**args).eval()


def reference_forward(sd, images, ids, pad, depth, heads, patch=16):
    """beit3.md's forward, step by step, from the raw state dict (no module code reused)."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)  # noqa: E731
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    B = images.shape[0]
    x = F.conv2d(images, sd["vision_embed.proj.weight"], sd["vision_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["vision_embed.cls_token"].expand(B, -1, -1), x], 1)
    s = x.shape[1]
    x = x + sd["encoder.embed_positions.A.weight"][2 : 2 + s]
    T = ids.shape[1]
    t = sd["text_embed.weight"][ids] + sd["encoder.embed_positions.B.weight"][2 : 2 + T]
    t = t * (~pad)[..., None]
    h = torch.cat([x, t], 1)
    key_pad = torch.cat([torch.zeros(B, s, dtype=torch.bool), pad], 1)

    def multi(fn, h, name):
        return torch.cat([fn(h[:, :s], name + ".A"), fn(h[:, s:], name + ".B")], 1)

    states = [h]
    for i in range(depth):
        p = f"encoder.layers.{i}."
        a = multi(ln, h, p + "self_attn_layer_norm")
        D = a.shape[-1]
        hd = D // heads
        q = multi(lin, a, p + "self_attn.q_proj") * hd**-0.5
        k = multi(lin, a, p + "self_attn.k_proj")
        v = multi(lin, a, p + "self_attn.v_proj")
        q, k, v = (z.view(B, -1, heads, hd).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)).masked_fill(key_pad[:, None, None], float("-inf"))
        o = (scores.float().softmax(-1) @ v).transpose(1, 2).reshape(B, -1, D)
        o = multi(lin, multi(ln, o, p + "self_attn.inner_attn_ln"), p + "self_attn.out_proj")
        h = h + o
        f = multi(ln, h, p + "final_layer_norm")

        def ffn(z, e):
            z = F.gelu(lin(z, e + ".fc1"), approximate="none")
            return lin(ln(z, e + ".ffn_layernorm"), e + ".fc2")

        h = h + multi(ffn, f, p + "ffn")
        states.append(h)
    return states


def random_state(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in model.state_dict().items()}


def test_encoder_matches_functional_reference():
    model = tiny_encoder()
    model.load_state_dict(random_state(model))
    images = torch.randn(2, 3, 64, 64)
    ids = torch.randint(0, 50, (2, 7))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    ours = model(images, ids, pad)
    ref = reference_forward(model.state_dict(), images, ids, pad, depth=2, heads=4)
    assert len(ours) == 3
    valid = torch.cat([torch.zeros(2, 17, dtype=torch.bool), pad], 1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a[~valid], b[~valid], atol=1e-4, rtol=1e-4)


def save_official(model, path, wrapper="model", extra=None, drop=()):
    sd = {"beit3." + k: v.clone() for k, v in model.state_dict().items() if not any(k.startswith(d) for d in drop)}
    sd.update(extra or {})
    torch.save({wrapper: sd} if wrapper else sd, path)


def test_224_checkpoint_loads_into_480_model_with_bicubic_positions(tmp_path):
    src = tiny_encoder(224, seed=3)
    save_official(src, tmp_path / "b3.pth", extra={"mlm_head.weight": torch.zeros(3)})
    dst = tiny_encoder(480, seed=4)
    report = load_beit3_checkpoint(dst, tmp_path / "b3.pth")
    assert report.missing == []
    assert report.ignored == ["mlm_head.weight"]
    old = src.encoder.embed_positions.A.weight.detach()
    new = dst.encoder.embed_positions.A.weight.detach()
    assert old.shape == (14 * 14 + 3, 32) and new.shape == (30 * 30 + 3, 32)
    # beit3.md: keep rows [:3]; rows [3:] → (1,14,14,D) → NCHW → bicubic 30×30 (align_corners=False) → (900, D)
    grid = old[3:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(30, 30), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(900, 32)
    torch.testing.assert_close(new[:3], old[:3], rtol=0, atol=0)
    torch.testing.assert_close(new[3:], expected, rtol=0, atol=0)
    for key, value in src.state_dict().items():
        if key != "encoder.embed_positions.A.weight":
            torch.testing.assert_close(dst.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("wrapper", ["model", "module", None])
def test_checkpoint_wrappers_and_optional_final_norm(tmp_path, wrapper):
    src = tiny_encoder(64, seed=5)
    save_official(src, tmp_path / "b3.pth", wrapper=wrapper, drop=("encoder.layer_norm.",))
    dst = tiny_encoder(64, seed=6)
    report = load_beit3_checkpoint(dst, tmp_path / "b3.pth")
    assert sorted(report.missing) == sorted(k for k in dst.state_dict() if k.startswith("encoder.layer_norm."))
    torch.testing.assert_close(dst.text_embed.weight, src.text_embed.weight)


def test_not_a_beit3_checkpoint_fails_in_one_line(tmp_path):
    torch.save({"model": {"layers.0.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, tmp_path / "swin.pth")
    with pytest.raises(CheckpointError, match="not a BEiT-3 checkpoint") as exc:
        load_beit3_checkpoint(tiny_encoder(), tmp_path / "swin.pth")
    assert "\n" not in str(exc.value) and "swin.pth" in str(exc.value)


def test_incomplete_and_mismatched_checkpoints_fail(tmp_path):
    src = tiny_encoder(64)
    save_official(src, tmp_path / "partial.pth", drop=("encoder.layers.1.",))
    with pytest.raises(CheckpointError, match="required keys are missing"):
        load_beit3_checkpoint(tiny_encoder(64), tmp_path / "partial.pth")
    save_official(tiny_encoder(64, embed_dim=64), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_beit3_checkpoint(tiny_encoder(64), tmp_path / "wide.pth")


def test_unsafe_or_missing_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_beit3_checkpoint(tiny_encoder(), tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_beit3_checkpoint(tiny_encoder(), tmp_path / "absent.pth")


def test_resample_is_identity_at_same_size():
    table = torch.randn(3 + 16, 8)
    assert resample_vision_positions(table, 16) is table
    with pytest.raises(ValueError):
        resample_vision_positions(torch.randn(3 + 15, 8), 16)
    assert math.isqrt(resample_vision_positions(table, 49).shape[0] - 3) == 7
