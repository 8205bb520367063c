"""Tests for molmo_model/tokenizer.py: our small BPE, the HF files, loading other layouts.

Run: PYTHONPATH=. pytest tests/test_tokenizer.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer

from molmo_model.config import tiny
from molmo_model.tokenizer import EOS_TOKEN, IMAGE_TOKENS, MolmoTokenizer, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLES = [
    " User: Point to all the red circles. Assistant:",
    ' <points x1="10.0" y1="12.5" x2="20.0" y2="30.1" alt="dogs">dogs</points>',
    " User: How many blue squares are there? Assistant: 3",
    "The time is 10:35.",
    "héllo wörld, 世界 🙂 naïve café",
    "tabs\tand\nnewlines  and   spaces ",
]


def test_special_ids_and_sizes(tok):
    assert tok.vocab_size == tok.embedding_size == 512 == tiny().llm.embedding_size
    assert tok.bos_id == tok.eos_id == tok.pad_id == tok.token_to_id(EOS_TOKEN) < 512
    ids = [tok.im_start_id, tok.im_end_id, tok.im_patch_id, tok.im_col_id, tok.image_id]
    assert ids == [512, 513, 514, 515, 516]
    assert [tok.id_to_token(i) for i in ids] == list(IMAGE_TOKENS)
    assert tok.total_size == 517 <= tiny().llm.total_vocab_size


def test_digits_are_one_token_each(tok):
    for s in ["61.5", "1234", " 0", 'x1="99.9"']:
        ids = tok.encode(s)
        digits = [t for t in (tok.id_to_token(i) for i in ids) if any(c.isdigit() for c in t)]
        assert digits == [c for c in s if c.isdigit()], s
    assert len(tok.encode("1234")) == 4
    assert len(tok.encode("61.5")) == 4


def test_chat_markers_are_short(tok):
    assert len(tok.encode(" User:")) <= 3
    assert len(tok.encode(" Assistant:")) <= 3
    # Learned merges make the typical text much shorter than its bytes.
    s = SAMPLES[0]
    assert len(tok.encode(s)) < len(s.encode()) / 2


@pytest.mark.parametrize("s", SAMPLES + ["", " ", "<im_patch>", EOS_TOKEN, "\x00\x7f"])
def test_decode_inverts_encode(tok, s):
    assert tok.decode(tok.encode(s)) == s


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_decode_inverts_encode_any_unicode(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_special_strings_in_text_are_plain_text_unless_allowed(tok):
    plain = tok.encode("<im_patch>" + EOS_TOKEN)
    assert tok.im_patch_id not in plain and tok.eos_id not in plain
    assert tok.encode("a<im_patch>b", allow_special=True) == [
        *tok.encode("a"),
        tok.im_patch_id,
        *tok.encode("b"),
    ]
    for t in IMAGE_TOKENS + (EOS_TOKEN,):
        assert tok.encode(t, allow_special=True) == [tok.token_to_id(t)]


def test_decode_special_tokens(tok):
    ids = [tok.bos_id, *tok.encode(" hi"), tok.im_start_id, tok.im_patch_id, tok.eos_id]
    assert tok.decode(ids) == EOS_TOKEN + " hi<im_start><im_patch>" + EOS_TOKEN
    assert tok.decode(ids, skip_special_tokens=True) == " hi"
    assert tok.decode([*tok.encode("ok"), 600]) == "ok"  # an unused logits row names no token
    with pytest.raises(ValueError, match="ids"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="text"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_build_is_deterministic_across_processes(tok):
    code = (
        "from molmo_model.tokenizer import build_tokenizer; import sys; "
        "sys.stdout.write(build_tokenizer()._tok.to_str())"
    )
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] == tok._tok.to_str() == build_tokenizer()._tok.to_str()


def test_other_vocab_sizes_pad_with_fillers():
    big = build_tokenizer(vocab_size=2000)
    assert big.embedding_size == 2000 and big.im_start_id == 2000 and big.image_id == 2004
    assert big.id_to_token(1999) == "<|unused_1999|>"
    # Fillers are unreachable: nothing encodes to them.
    assert max(big.encode(" ".join(SAMPLES))) < 2000
    assert all(i < 1000 for i in big.encode("<|unused_1999|>"))
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=100)


def test_save_and_reload(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == config["eos_token"] == config["pad_token"] == EOS_TOKEN
    assert config["added_tokens_decoder"]["514"]["content"] == "<im_patch>"
    assert config["added_tokens_decoder"]["514"]["special"] is True
    assert config["model_max_length"] == 4096
    again = MolmoTokenizer.from_dir(tmp_path)
    assert again._tok.to_str() == tok._tok.to_str()
    assert again.image_id == tok.image_id and again.model_max_length == 4096
    assert MolmoTokenizer.from_dir(tmp_path / "tokenizer.json").im_col_id == tok.im_col_id
    with pytest.raises(ValueError, match="path"):
        MolmoTokenizer.from_dir(tmp_path / "missing")


def test_transformers_loads_the_saved_files(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # no trust_remote_code
    for s in SAMPLES:
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s)
        assert hf.encode(s) == tok.encode(s)  # no BOS added by HF either
        assert hf.decode(tok.encode(s)) == s
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == tok.eos_id
    for t in IMAGE_TOKENS:
        assert hf.encode(t, add_special_tokens=False) == [tok.token_to_id(t)]
        assert t in hf.all_special_tokens
    ids = [tok.im_start_id, *tok.encode("hi"), tok.eos_id]
    assert hf.decode(ids, skip_special_tokens=True) == "hi"
    assert hf.model_max_length == 4096


def test_loads_a_qwen2_style_layout(tmp_path):
    """Ai2's layout: <|endoftext|> and chat tokens added after the BPE vocabulary, a gap up to
    the embedding size, then the image tokens. Ids must be read, not assumed."""
    base = build_tokenizer()._tok
    spec = json.loads(base.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in IMAGE_TOKENS]
    qwen = Tokenizer.from_str(json.dumps(spec))
    qwen.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    qwen.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(514, 600)])
    qwen.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    qwen.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))

    t = MolmoTokenizer.from_dir(tmp_path)
    assert [t.im_start_id, t.im_end_id, t.im_patch_id, t.im_col_id, t.image_id] == list(
        range(600, 605)
    )
    assert t.embedding_size == t.vocab_size == 600 and t.total_size == 605
    assert t.eos_id == base.token_to_id(EOS_TOKEN) and t.model_max_length == 4096
    assert t.decode(t.encode(SAMPLES[0])) == SAMPLES[0]


def test_missing_special_token_is_named(tmp_path):
    spec = json.loads(build_tokenizer()._tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<im_col>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="<im_col>"):
        MolmoTokenizer.from_dir(tmp_path)
