"""The PyTorch Molmo: module shapes, KV-cache decoding, checkpoints (strict, Ai2 names), configs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import OFFICIAL_FIELDS, REMOTE_CODE_FIELDS

from molmo_model.checkpoint import (
    CheckpointError,
    init_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from molmo_model.config import MolmoConfig, get_preset, tiny
from molmo_model.generate import generate
from molmo_model.model import KVCache, MolmoForCausalLM


@pytest.fixture(scope="module")
def model() -> MolmoForCausalLM:
    torch.manual_seed(0)
    return MolmoForCausalLM(tiny()).init_weights(std=0.05, seed=0).eval()


def _inputs(model: MolmoForCausalLM, seq: int = 24, n_crops: int = 2, n_patch: int = 10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 400, (1, seq), generator=g)
    ids[0, 2 : 2 + n_patch] = model.im_patch_id
    geo = model.config.preprocess
    images = torch.randn(n_crops, geo.num_patches, geo.patch_pixels, generator=g)
    masks = torch.ones(n_crops, geo.num_patches)
    masks[1, -50:] = 0.0
    masks[1, -60:-50] = 0.5
    order = torch.randperm(n_crops * geo.tokens_per_side**2, generator=g)[:n_patch]
    return ids, images, masks, order


def test_official_config_loads_with_7b_d_defaults():
    cfg = MolmoConfig.from_hf_dict(OFFICIAL_FIELDS)
    assert cfg.llm.hidden_size == 3584 and cfg.llm.head_dim == 128
    assert cfg.llm.mlp_hidden_size == 18944
    assert cfg.vision.image_emb_dim == 1024 and cfg.vision.image_num_layers == 23
    assert cfg.vision.vit_layers == (-2, -9) and cfg.vision.pooled_dim == 2048
    assert cfg.preprocess.crop_size == 336 and cfg.preprocess.max_crops == 12
    assert cfg.preprocess.overlap_margins == (4, 4)
    assert cfg.preprocess.image_mask_rule == "ai2"  # no field: the rule Ai2 trained with
    # Our own config writes every official field with the same value.
    ours = get_preset("molmo-7b-d").to_hf_dict()
    for k, v in OFFICIAL_FIELDS.items():
        if k not in REMOTE_CODE_FIELDS:
            assert ours[k] == v, k
    assert not set(REMOTE_CODE_FIELDS) & set(ours)  # no remote code in our checkpoints


def test_config_roundtrip_and_validation():
    cfg = tiny()
    again = MolmoConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again == cfg
    demo = get_preset("demo")
    assert demo.to_hf_dict()["image_mask_rule"] == "per_crop"
    assert MolmoConfig.from_hf_dict(demo.to_hf_dict()).preprocess.image_mask_rule == "per_crop"
    with pytest.raises(ValueError, match="num_attention_heads"):
        MolmoConfig.from_hf_dict({**cfg.to_hf_dict(), "num_attention_heads": 3})
    with pytest.raises(ValueError, match="vit_layers"):
        MolmoConfig.from_hf_dict({**cfg.to_hf_dict(), "vit_layers": [-9]})
    with pytest.raises(ValueError, match="model_type"):
        MolmoConfig.from_hf_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_module_shapes(model: MolmoForCausalLM):
    cfg = model.config
    geo, v, llm = cfg.preprocess, cfg.vision, cfg.llm
    vb = model.model.vision_backbone
    x = torch.randn(3, geo.num_patches, geo.patch_pixels)
    states = vb.image_vit(x, list(v.vit_layers))
    assert [s.shape for s in states] == [(3, geo.num_positions, v.image_emb_dim)] * 2
    windows = torch.randn(7, 4, v.pooled_dim)
    assert vb.image_pooling_2d(windows).shape == (7, v.image_emb_dim)
    assert vb.image_projector(torch.randn(5, v.image_emb_dim)).shape == (5, llm.hidden_size)
    feats = vb(x, torch.ones(3, geo.num_patches))
    assert feats.shape == (3, geo.tokens_per_side**2, llm.hidden_size)
    ids, images, masks, order = _inputs(model)
    out = model(ids, images, masks, order)
    assert out.logits.shape == (1, ids.shape[1], llm.embedding_size)
    assert torch.isfinite(out.logits).all()


def test_7b_d_parameter_names_and_shapes():
    with torch.device("meta"):
        m = MolmoForCausalLM(get_preset("molmo-7b-d"))
    sd = {k: tuple(t.shape) for k, t in m.state_dict().items()}
    expect = {
        "model.transformer.wte.embedding": (152064, 3584),
        "model.transformer.wte.new_embedding": (128, 3584),
        "model.transformer.blocks.0.att_proj.weight": (3584 + 2 * 512, 3584),
        "model.transformer.blocks.0.att_proj.bias": (3584 + 2 * 512,),
        "model.transformer.blocks.27.attn_out.weight": (3584, 3584),
        "model.transformer.blocks.0.ff_proj.weight": (37888, 3584),
        "model.transformer.blocks.0.ff_out.weight": (3584, 18944),
        "model.transformer.blocks.0.attn_norm.weight": (3584,),
        "model.transformer.blocks.0.ff_norm.weight": (3584,),
        "model.transformer.ln_f.weight": (3584,),
        "model.transformer.ff_out.weight": (152064, 3584),
        "model.vision_backbone.image_vit.class_embedding": (1024,),
        "model.vision_backbone.image_vit.positional_embedding": (577, 1024),
        "model.vision_backbone.image_vit.patch_embedding.weight": (1024, 588),
        "model.vision_backbone.image_vit.pre_ln.weight": (1024,),
        "model.vision_backbone.image_vit.transformer.resblocks.22.attention.wq.weight": (
            1024,
            1024,
        ),
        "model.vision_backbone.image_vit.transformer.resblocks.0.feed_forward.w1.weight": (
            4096,
            1024,
        ),
        "model.vision_backbone.image_vit.transformer.resblocks.0.ffn_norm.bias": (1024,),
        "model.vision_backbone.image_pooling_2d.wq.weight": (1024, 2048),
        "model.vision_backbone.image_pooling_2d.wo.bias": (1024,),
        "model.vision_backbone.image_projector.w1.weight": (18944, 1024),
        "model.vision_backbone.image_projector.w2.weight": (3584, 18944),
        "model.vision_backbone.pad_embed": (2, 2048),
    }
    for k, shape in expect.items():
        assert sd[k] == shape, k
    assert not any("resblocks.23" in k for k in sd)
    assert "model.transformer.blocks.0.att_proj.bias" in sd and not any(
        ".attn_out.bias" in k for k in sd
    )


def test_image_features_are_added_at_patch_tokens(model: MolmoForCausalLM):
    ids, images, masks, order = _inputs(model)
    text_only = model.embed(ids)
    with_img = model.embed(ids, images, masks, order)
    where = ids[0] == model.im_patch_id
    assert torch.equal(with_img[0, ~where], text_only[0, ~where])
    feats = model.model.vision_backbone(images, masks).flatten(0, 1)[order]
    torch.testing.assert_close(with_img[0, where] - text_only[0, where], feats)
    with pytest.raises(ValueError, match="im_patch"):
        model.embed(ids, images, masks, order[:-1])


def test_pad_embed_applies_by_mask(model: MolmoForCausalLM):
    vb = model.model.vision_backbone
    geo = model.config.preprocess
    x = torch.randn(1, geo.num_patches, geo.patch_pixels)
    full = vb(x, torch.ones(1, geo.num_patches))
    saved = vb.pad_embed.detach().clone()  # the module fixture is shared: restored bit for bit
    with torch.no_grad():
        vb.pad_embed.add_(1.0)
    try:
        assert torch.allclose(vb(x, torch.ones(1, geo.num_patches)), full)  # no padding: unused
        assert not torch.allclose(vb(x, torch.zeros(1, geo.num_patches)), full)
        assert not torch.allclose(vb(x, torch.full((1, geo.num_patches), 0.5)), full)
    finally:
        with torch.no_grad():
            vb.pad_embed.copy_(saved)


@pytest.mark.parametrize("rule", ["ai2", "per_crop"])
def test_pad_embed_follows_the_mask_rule(rule: str):
    config = tiny()
    config.preprocess.image_mask_rule = rule
    torch.manual_seed(0)
    vb = MolmoForCausalLM(config).init_weights(std=0.05, seed=0).eval().model.vision_backbone
    geo = config.preprocess
    x = torch.randn(1, geo.num_patches, geo.patch_pixels)
    with torch.no_grad():
        vb.pad_embed[0].normal_()
        vb.pad_embed[1].normal_()
        full = vb(x, torch.ones(1, geo.num_patches))
        partial = vb(x, torch.full((1, geo.num_patches), 0.5))
        last_crop = vb(x, torch.full((1, geo.num_patches), -1.0))  # Ai2's rule's last crop
    assert not torch.allclose(partial, full)
    # Ai2's backbone counts -1 as partial padding; -1 never occurs under the per-crop rule.
    want = partial if rule == "ai2" else full
    torch.testing.assert_close(last_crop, want, rtol=0, atol=0)


def test_kv_cache_decoding_equals_full_forward(model: MolmoForCausalLM):
    ids, images, masks, order = _inputs(model)
    with torch.no_grad():
        full = model(ids, images, masks, order).logits
        cache = KVCache.empty(model.config.llm.num_hidden_layers)
        emb = model.embed(ids, images, masks, order)
        parts = [model(ids[:, :16], cache=cache, inputs_embeds=emb[:, :16]).logits]
        for t in range(16, ids.shape[1]):
            parts.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_argmax_of_full_forward(model: MolmoForCausalLM):
    ids, images, masks, order = _inputs(model)

    class Img:  # one preprocessed image, as the preprocessor returns it
        pass

    img = Img()
    img.images, img.image_masks, img.patch_order = images, masks, order
    out = generate(model, ids[0].tolist(), [img], max_new_tokens=6, return_logprobs=True)
    seq = ids.clone()
    with torch.no_grad():
        for tok, lp in zip(out.tokens, out.logprobs, strict=True):
            logits = model(seq, images, masks, order).logits[0, -1]
            assert int(logits.argmax()) == tok
            torch.testing.assert_close(lp, torch.log_softmax(logits, -1), atol=1e-4, rtol=1e-4)
            seq = torch.cat([seq, torch.tensor([[tok]])], 1)


def test_sampling_is_seeded(model: MolmoForCausalLM):
    ids, *_ = _inputs(model)
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, ids[0].tolist(), seed=3, **kw).tokens
    b = generate(model, ids[0].tolist(), seed=3, **kw).tokens
    c = generate(model, ids[0].tolist(), seed=4, **kw).tokens
    assert a == b and a != c


def test_loss_and_segment_attention(model: MolmoForCausalLM):
    ids, images, masks, order = _inputs(model)
    labels = ids.clone()
    labels[:, :14] = -100
    out = model(ids, images, masks, order, labels=labels)
    assert out.num_loss_tokens == 10 and out.loss.item() > 0
    # One segment (all zeros) is plain causal attention.
    seg = torch.zeros_like(ids)
    same = model(ids, images, masks, order, segment_ids=seg).logits
    torch.testing.assert_close(same, out.logits, atol=1e-5, rtol=1e-5)
    # Separate annotations do not see each other: changing annotation 1 leaves annotation 2 as is.
    seg[0, 14:19], seg[0, 19:] = 1, 2
    pos = torch.cat([torch.arange(14), torch.arange(14, 19), torch.arange(14, 19)])[None]
    a = model(ids, images, masks, order, segment_ids=seg, position_ids=pos).logits
    ids2 = ids.clone()
    ids2[0, 15] = (ids2[0, 15] + 1) % 400
    b = model(ids2, images, masks, order, segment_ids=seg, position_ids=pos).logits
    torch.testing.assert_close(a[0, 19:], b[0, 19:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0, 15:19], b[0, 15:19])


def test_save_load_identical_logits(tmp_path, tok):
    cfg = tiny(vocab_size=tok.embedding_size)
    m = MolmoForCausalLM(cfg, im_patch_id=tok.im_patch_id).init_weights(std=0.05, seed=1).eval()
    save_checkpoint(m, tmp_path / "ck", tok)
    m2, cfg2, tok2 = load_checkpoint(tmp_path / "ck")
    assert cfg2 == cfg and tok2.im_patch_id == tok.im_patch_id
    ids, images, masks, order = _inputs(m)
    with torch.no_grad():
        torch.testing.assert_close(
            m2.eval()(ids, images, masks, order).logits,
            m(ids, images, masks, order).logits,
            atol=0,
            rtol=0,
        )


def test_loading_is_strict_and_names_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    path = init_checkpoint("tiny", tmp_path / "ck")
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("model.transformer.ln_f.weight")
    weights["model.transformer.blocks.0.extra.weight"] = torch.zeros(2)
    weights["model.vision_backbone.pad_embed"] = torch.zeros(3, 5)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "missing tensors: model.transformer.ln_f.weight" in msg
    assert "unexpected tensors: model.transformer.blocks.0.extra.weight" in msg
    assert "model.vision_backbone.pad_embed: checkpoint (3, 5)" in msg


def test_sharded_save_loads(tmp_path, tok):
    m = MolmoForCausalLM(tiny(vocab_size=tok.embedding_size), im_patch_id=tok.im_patch_id)
    m.init_weights(seed=2)
    out = save_checkpoint(m, tmp_path / "sh", tok, max_shard_bytes=1 << 20)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    m2, _, _ = load_checkpoint(out)
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_cli_init_writes_a_loadable_checkpoint(tmp_path):
    from molmo_cli import main

    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "t")]) == 0
    m, cfg, tok = load_checkpoint(tmp_path / "t")
    assert cfg.llm.embedding_size == tok.embedding_size
    assert m.im_patch_id == tok.im_patch_id
    assert {p.name for p in (tmp_path / "t").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }


def test_bf16_autocast_forward_with_segments(model: MolmoForCausalLM):
    # Under autocast the residual stream stays fp32 while projections run in bf16: RoPE must
    # not turn q and k back to fp32 (attention refuses mixed dtypes).
    ids, images, masks, order = _inputs(model)
    labels = ids.clone()
    labels[:, :14] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, images, masks, order, segment_ids=torch.zeros_like(ids), labels=labels)
    assert torch.isfinite(out.loss)


def test_checkpoint_files_are_readable_by_others(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = init_checkpoint("tiny", tmp_path / "ck")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) == 0o644
