"""Molmo 2 model (molmo_model/molmo2/): config.json round trips, the strict loader, the tiny
preset on fake processor tensors, the KV cache, and unit checks against independent math.
Fast (CPU, tiny widths, one thread)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from molmo_model.checkpoint import CheckpointError, load_checkpoint, model_family, save_checkpoint
from molmo_model.model import KVCache, rope_cos_sin
from molmo_model.molmo2.config import ConfigError, Molmo2Config, get_preset
from molmo_model.molmo2.model import (
    Molmo2Attention,
    Molmo2DecoderBlock,
    Molmo2ForConditionalGeneration,
    generate,
    yarn_inv_freq,
)
from molmo_model.vision import AttentionPooling, ViTBlockShape, ViTMLP

torch.set_num_threads(1)


def release_config_dict() -> dict:
    """A config.json as Ai2's save_pretrained writes Molmo2-4B's (HF bookkeeping included)."""
    d = get_preset("molmo2-4b").to_hf_dict()
    d.update(auto_map={"AutoModelForImageTextToText": "modeling_molmo2.Molmo2ForConditionalGeneration"},
             transformers_version="4.57.1", initializer_range=0.02, use_cache=True)  # fmt: skip
    for part in ("vit_config", "adapter_config", "text_config"):
        d[part].update(attn_implementation="sdpa", output_hidden_states=False)
    return d


# ---- fake processor tensors (the real preprocessor is elsewhere) ----


def pool_rows(rows: int, cols: int, offset: int) -> torch.Tensor:
    """2x2 windows over a rows x cols patch grid, -1 padded to even sides as Ai2 centres
    them: [ceil(rows/2) * ceil(cols/2), 4] indices (+ offset)."""
    idx = torch.arange(rows * cols).view(rows, cols) + offset
    ph, pw = rows % 2, cols % 2
    idx = F.pad(idx, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1)
    r, c = idx.shape
    return idx.view(r // 2, 2, c // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)


def fake_image(cfg: Molmo2Config, crops: int, seed: int) -> dict:
    """One image: a global view + (crops - 1) crops, every crop's 27x27 patches pooled 2x2
    (14x14 tokens each, ragged edges -1); grids (14, 14, 14, 14 * (crops - 1))."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.vit.num_patches
    side = cfg.vit.patch_grid[0]
    pooling = torch.cat([pool_rows(side, side, c * n) for c in range(crops)])
    t = (side + 1) // 2
    return dict(
        pixel_values=torch.randn(crops, n, cfg.vit.patch_pixels, generator=g),
        image_token_pooling=pooling,
        image_grids=torch.tensor([[t, t, t, t * (crops - 1)]]),
        image_num_crops=torch.tensor([crops]),
    )


def cat_images(*images: dict) -> dict:
    return {k: torch.cat([im[k] for im in images]) for k in images[0]}


def prompt(cfg: Molmo2Config, n_image_tokens: int, seed: int, text: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.text.vocab_size, (1, n_image_tokens + 2 * text), generator=g)
    ids[0, text : text + n_image_tokens] = cfg.image_patch_id
    return ids


@pytest.fixture(scope="module", params=["molmo2-tiny", "molmo2-o-tiny"])
def tiny(request) -> Molmo2ForConditionalGeneration:
    """The Qwen3 and the OLMo 3 (post-norm, q/k norm over all heads, yarn on 2 layers) decoder."""
    torch.manual_seed(0)
    return Molmo2ForConditionalGeneration(get_preset(request.param)).init_weights(std=0.05, seed=0).eval()


# ---- config ----


def test_release_config_round_trip():
    d = release_config_dict()
    cfg = Molmo2Config.from_hf_dict(d)
    assert cfg.text.hidden_size == 2560 and cfg.vit_blocks_built == 25 and cfg.image_patch_id == 151938
    again = Molmo2Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again == cfg
    assert again.extras["auto_map"] == d["auto_map"]  # what we do not read is written back
    assert model_family(d) == "molmo2" and model_family({"architectures": ["MolmoForCausalLM"]}) == "molmo"


def test_o_7b_preset_is_the_olmo3_release():
    """Molmo2-O-7B's text config as Ai2's converter writes it from OLMO3_7B_INSTRUCT, and the
    tensor shapes that implies (q/k norms over all 32 heads, MHA, untied 100278-row head)."""
    cfg = get_preset("molmo2-o-7b")
    text = cfg.text
    assert (text.norm_after, text.qk_norm_type, text.num_key_value_heads) == (True, "olmo", 32)
    assert text.scaled_rope_layers == frozenset(range(3, 32, 4))
    assert text.rope_scaling == {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.2079441541679836,
                                 "original_max_position_embeddings": 8192, "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    assert cfg.image_patch_id == 100280 and cfg.token_ids["image_start_token_id"] == 100278
    assert Molmo2Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg
    with torch.device("meta"):
        m = Molmo2ForConditionalGeneration(cfg)
    shapes = {n: tuple(p.shape) for n, p in m.state_dict().items()}
    b = "model.transformer.blocks.31."
    assert shapes[b + "self_attn.q_norm.weight"] == shapes[b + "self_attn.k_norm.weight"] == (4096,)
    assert shapes[b + "self_attn.att_proj.weight"] == (3 * 4096, 4096)
    assert shapes[b + "mlp.ff_proj.weight"] == (22016, 4096)
    assert shapes["lm_head.weight"] == shapes["model.transformer.wte.embedding"] == (100278, 4096)
    assert shapes["model.vision_backbone.image_projector.w2.weight"] == (4096, 11008)


@pytest.mark.parametrize(
    "theta, dim, scaling",
    [
        (500_000.0, 128, {"factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 1.2}),
        (10_000.0, 64, {"factor": 4.0, "original_max_position_embeddings": 2048, "beta_fast": 16, "truncate": False}),
    ],
)
def test_yarn_against_float64_formula(theta, dim, scaling):
    """YaRN from its definition in float64: keep the pairs turning more than beta_fast times
    over the original length, divide by the factor those turning less than beta_slow times,
    ramp linearly between; cos/sin scale = attention_factor, else 0.1 ln(factor) + 1."""
    inv, scale = yarn_inv_freq(dim, theta, {"rope_type": "yarn", **scaling})
    length, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    fast, slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def pair(turns: float) -> float:  # the pair index that turns `turns` times over `length`
        return dim * math.log(length / (turns * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = pair(fast), pair(slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    want = []
    for i in range(dim // 2):
        base = theta ** (-2 * i / dim)
        t = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        want.append(base * (1 - t) + base / factor * t)
    torch.testing.assert_close(inv.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert scale == scaling.get("attention_factor", 0.1 * math.log(factor) + 1)


def test_release_shapes_count_like_ai2s():
    """Parameter counts of the 4B shapes: vision side and text model (lm_head aside)."""
    with torch.device("meta"):
        m = Molmo2ForConditionalGeneration(get_preset("molmo2-4b"))
    assert sum(p.numel() for p in m.model.vision_backbone.parameters()) == 439_117_264
    assert sum(p.numel() for p in m.model.transformer.parameters()) == 4_022_795_776


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda d: d["text_config"].pop("head_dim"), "text_config.head_dim"),
        (lambda d: d["vit_config"].pop("image_num_pos"), "vit_config.image_num_pos"),
        (lambda d: d.pop("adapter_config"), "adapter_config"),
        (lambda d: d["text_config"].update(rope_scaling={"rope_type": "linear", "factor": 4}), "rope_scaling.rope_type"),
        (lambda d: d["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4}), "original_max_position_embeddings"),
        (lambda d: d["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 8,
                                                         "mscale": 1.0}), "mscale"),
        (lambda d: d["text_config"].update(rope_scaling_layers=[36]), "rope_scaling_layers"),
        (lambda d: d["vit_config"].update(hidden_act="gelu"), "vit_config.hidden_act"),
        (lambda d: d["text_config"].update(qk_norm_type="gemma"), "qk_norm_type"),
        (lambda d: d.update(model_type="qwen3"), "model_type"),
        (lambda d: d.pop("image_patch_id"), "image_patch_id"),
    ],
)
def test_config_refuses_missing_and_unsupported_fields(edit, named):
    d = release_config_dict()
    edit(d)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        Molmo2Config.from_hf_dict(d)


# ---- checkpoints ----


def test_save_load_round_trip_sharded(tiny, tmp_path):
    out = save_checkpoint(tiny, tmp_path / "ckpt", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Molmo2ForConditionalGeneration"]
    model, cfg, tok = load_checkpoint(out)
    assert tok is None and cfg == tiny.config
    mm = fake_image(tiny.config, 2, seed=1)
    ids = prompt(tiny.config, 2 * 196, seed=2)
    with torch.no_grad():
        assert torch.equal(model(ids, **mm).logits, tiny(ids, **mm).logits)


@pytest.mark.parametrize("damage", ["missing", "extra", "misshaped"])
def test_loader_names_each_bad_tensor(tiny, tmp_path, damage):
    out = save_checkpoint(tiny, tmp_path / "ckpt")
    state = load_file(str(out / "model.safetensors"))
    a = "model.transformer.blocks.1.self_attn.q_norm.weight"
    b = "model.vision_backbone.image_vit.transformer.resblocks.2.attention.wk.bias"
    if damage == "missing":
        del state[a], state[b]
        named = [a, b]
    elif damage == "extra":  # the untapped last ViT block a release does not store
        state["model.vision_backbone.image_vit.transformer.resblocks.3.ffn_norm.weight"] = torch.ones(64)
        named = ["resblocks.3.ffn_norm.weight"]
    else:
        state[a] = torch.ones(65)
        named = [a, "(65,)", f"({tiny.model.transformer.blocks[1].self_attn.q_norm.weight.numel()},)"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(out)
    for name in named:
        assert name in str(err.value)


def test_loader_names_an_unsupported_config(tiny, tmp_path):
    out = save_checkpoint(tiny, tmp_path / "ckpt")
    d = json.loads((out / "config.json").read_text())
    del d["text_config"]["num_hidden_layers"]
    (out / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"text_config\.num_hidden_layers"):
        load_checkpoint(out)


# ---- forward on fake processor tensors ----


def test_tiny_forward_shapes_and_image_effect(tiny):
    cfg = tiny.config
    one, two = fake_image(cfg, 2, seed=1), fake_image(cfg, 3, seed=2)
    n1, n2 = 2 * 196, 3 * 196
    assert one["image_token_pooling"].shape == (n1, 4) and one["pixel_values"].shape == (2, 729, 588)
    batch = cat_images(one, two)
    with torch.no_grad():
        feats = tiny.image_features(**batch)
        alone = tiny.image_features(**two)
    assert feats.shape == (n1 + n2, cfg.text.hidden_size)
    # The second image's indices are its own; offset over the batch they find its crops.
    torch.testing.assert_close(feats[n1:], alone, rtol=1e-5, atol=1e-5)

    ids = prompt(cfg, n1 + n2, seed=3)
    with torch.no_grad():
        logits = tiny(ids, **batch).logits
        text_only = tiny(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.text.vocab_size)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits[:, :6], text_only[:, :6])  # causal: text before the image
    assert not torch.allclose(logits[:, -1], text_only[:, -1])
    with pytest.raises(ValueError, match="image features"):
        tiny(ids[:, :-20].clone().fill_(1), **batch)


def test_greedy_generate_with_and_without_cache(tiny):
    cfg = tiny.config
    mm = fake_image(cfg, 2, seed=4)
    ids = prompt(cfg, 2 * 196, seed=5)
    res = generate(tiny, ids[0].tolist(), max_new_tokens=6, return_logprobs=True, **mm)
    seq = ids
    with torch.no_grad():
        embeds = tiny.embed(ids, **mm)
        for step, tok in enumerate(res.tokens):
            logits = tiny(seq, inputs_embeds=embeds).logits[0, -1]
            torch.testing.assert_close(torch.log_softmax(logits, -1), res.logprobs[step], rtol=1e-4, atol=1e-4)
            assert int(logits.argmax()) == tok
            nxt = torch.tensor([[tok]])
            seq = torch.cat([seq, nxt], 1)
            embeds = torch.cat([embeds, tiny.embed(nxt)], 1)
    assert len(res.tokens) == 6


def test_bidirectional_image_prefill(tiny):
    """token_type_ids: image tokens see later image tokens (Ai2's optional mask); text stays causal."""
    cfg = tiny.config
    ids = prompt(cfg, 8, seed=6, text=4)
    tt = (ids == cfg.image_patch_id).long()
    with torch.no_grad():
        e = tiny.embed(ids)
        e2 = e.clone()
        e2[0, 10] += 1.0  # the last image token
        causal = [tiny(ids, inputs_embeds=x).logits for x in (e, e2)]
        bidir = [tiny(ids, inputs_embeds=x, token_type_ids=tt).logits for x in (e, e2)]
        cache = KVCache.empty(cfg.text.num_hidden_layers)
        cached = tiny(ids, inputs_embeds=e, token_type_ids=tt, cache=cache).logits
    assert torch.equal(causal[0][:, :10], causal[1][:, :10])
    assert not torch.allclose(bidir[0][:, 4], bidir[1][:, 4])  # first image token sees the last
    assert torch.equal(bidir[0][:, :4], bidir[1][:, :4])  # text before the image does not
    torch.testing.assert_close(cached, bidir[0])


# ---- unit checks against independent math ----


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@pytest.mark.parametrize("norm_type", ["qwen3", "olmo"])
def test_qk_norm(norm_type):
    cfg = get_preset("molmo2-tiny").text
    cfg.qk_norm_type = norm_type
    attn = Molmo2Attention(cfg)
    torch.nn.init.normal_(attn.q_norm.weight)
    torch.nn.init.normal_(attn.k_norm.weight)
    q = torch.randn(2, 3, cfg.num_attention_heads * cfg.head_dim)
    k = torch.randn(2, 3, cfg.num_key_value_heads * cfg.head_dim)
    got_q, got_k = attn.normalize_qk(q, k)
    eps = cfg.layer_norm_eps
    if norm_type == "qwen3":  # each head on its own
        hd = cfg.head_dim
        want_q = torch.cat([rms(q[..., h * hd : (h + 1) * hd], attn.q_norm.weight, eps) for h in range(q.shape[-1] // hd)], -1)
        want_k = torch.cat([rms(k[..., h * hd : (h + 1) * hd], attn.k_norm.weight, eps) for h in range(k.shape[-1] // hd)], -1)
    else:  # all heads together
        want_q, want_k = rms(q, attn.q_norm.weight, eps), rms(k, attn.k_norm.weight, eps)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


def test_vit_mlp_is_gelu_tanh():
    shape = ViTBlockShape(width=8, num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=16,
                          activation="gelu_pytorch_tanh", norm_eps=1e-6)  # fmt: skip
    mlp = ViTMLP(shape)
    x = torch.randn(5, 8)
    h = mlp.w1(x)
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(mlp(x), mlp.w2(gelu))
    assert not torch.allclose(mlp(x), mlp.w2(F.gelu(h)), atol=1e-7)  # the tanh form, not erf's


def test_masked_pooling_pools_only_present_patches():
    pool = AttentionPooling(in_dim=6, num_heads=2, head_dim=3, out_dim=5)
    present = torch.randn(3, 6)  # a window with 3 of its 4 patches
    windows = torch.cat([present, torch.zeros(1, 6)])[None]
    valid = torch.tensor([[True, True, False, True]])
    windows = windows[:, [0, 1, 3, 2]]
    got = pool(windows, valid)
    q = pool.wq(present.mean(0)).view(2, 3)
    k, v = pool.wk(present).view(3, 2, 3), pool.wv(present).view(3, 2, 3)
    p = torch.einsum("hd,khd->hk", q, k).div(math.sqrt(3)).softmax(-1)
    want = pool.wo(torch.einsum("hk,khd->hd", p, v).reshape(6))
    torch.testing.assert_close(got[0], want)
    # Unmasked (pooling_attention_mask false) the zero member counts: the mean over 4.
    assert not torch.allclose(pool(windows), got)


def test_decoder_block_against_eager_math():
    """One Qwen3-style block: pre-RMSNorm, fused QKV, per-head q/k norm, RoPE (half
    rotation), GQA causal softmax, SwiGLU with (x, gate) halves."""
    cfg = get_preset("molmo2-tiny").text
    torch.manual_seed(3)
    block = Molmo2DecoderBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(1, 7, cfg.hidden_size)

        cos, sin = rope_cos_sin(torch.arange(7)[None], cfg.head_dim, cfg.rope_theta, x.dtype)
        got = block(x, cos, sin)

        a = block.self_attn
        h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        y = rms(x, block.attn_norm.weight, cfg.layer_norm_eps)
        q, k, v = (y @ a.att_proj.weight.T).split([h * hd, kv * hd, kv * hd], -1)
        q = rms(q.view(7, h, hd), a.q_norm.weight, cfg.layer_norm_eps)
        k = rms(k.view(7, kv, hd), a.k_norm.weight, cfg.layer_norm_eps)
        v = v.view(7, kv, hd)
        pos = torch.arange(7, dtype=torch.float64)[:, None]
        inv = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = (pos * inv).float()  # [7, hd/2]

        def rot(t):  # rotate (t[i], t[i + hd/2]) pairs by ang
            t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
            c, s = ang.cos()[:, None], ang.sin()[:, None]
            return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(1, 7, h * hd)
        x1 = x + att @ a.attn_out.weight.T
        z = rms(x1, block.ff_norm.weight, cfg.layer_norm_eps) @ block.mlp.ff_proj.weight.T
        up, gate = z.chunk(2, -1)
        want = x1 + (up * gate * torch.sigmoid(gate)) @ block.mlp.ff_out.weight.T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_imports_without_vllm():
    import subprocess
    import sys

    code = "import sys, molmo_model.molmo2.model, molmo_model.checkpoint; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
