"""The paper's text tokenizer: lowercased BPE, per-position padding, dropout, one-file save."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch

from dalle_core.profiles import UnknownProfileError, get_profile
from dalle_core.text import (
    DalleTokenizer,
    TextConfig,
    train_bpe_tokenizer,
)

SIZES = ["small", "big", "tiny", "large"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
RELATIONS = ["to the left of", "to the right of", "above", "below", "next to"]


def demo_captions(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            f"A {r.choice(SIZES)} {r.choice(COLOURS)} {r.choice(SHAPES)} {r.choice(RELATIONS)} "
            f"a {r.choice(COLOURS)} {r.choice(SHAPES)}."
        )
    return out


CAPTIONS = demo_captions(1500)


@pytest.fixture(scope="module")
def tok() -> DalleTokenizer:
    return train_bpe_tokenizer(CAPTIONS, get_profile("tiny").text)


@pytest.fixture(scope="module")
def wide() -> DalleTokenizer:
    """Same vocabulary size, room for 64 tokens (dropout and byte-level text make more tokens)."""
    return train_bpe_tokenizer(CAPTIONS, TextConfig(vocab_size=512, text_len=64))


def test_presets_match_the_paper():
    paper = get_profile("paper-12B").text
    assert (paper.vocab_size, paper.text_len) == (16384, 256)
    assert paper.total_vocab_size == 16384 + 256
    assert paper.bpe_dropout == pytest.approx(0.1)
    assert get_profile("paper-1.3B").text == paper
    tiny = get_profile("tiny").text
    assert 256 <= tiny.vocab_size <= 512 and tiny.text_len == 16
    assert (get_profile("small").text.vocab_size, get_profile("small").text.text_len) == (1024, 32)
    with pytest.raises(UnknownProfileError, match="unknown profile"):
        get_profile("huge")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=100, text_len=16),
        dict(vocab_size=512, text_len=0),
        dict(vocab_size=512, text_len=16, bpe_dropout=1.0),
        dict(vocab_size=512, text_len=16, min_frequency=0),
    ],
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError, match="TextConfig"):
        TextConfig(**kwargs)


def test_round_trip_is_the_lowercased_normalised_caption(tok):
    c = "A small red circle to the left of a blue square"
    assert tok.decode(tok.encode(c)) == "a small red circle to the left of a blue square"
    assert tok.normalize("  A  Big\tGREEN star ") == "a big green star"
    for caption in CAPTIONS[:200] + ["  A  Big\tGREEN star ", "a tiny purple hexagon."]:
        ids = tok.encode(caption)
        assert len(ids) == tok.text_len
        assert tok.decode(ids) == tok.normalize(caption) == " ".join(caption.lower().split())
    # in-distribution words become single tokens, not characters
    assert len(tok.tokens("a small red circle")) == 4


def test_any_text_encodes_without_loss(wide):
    tok = wide
    c = "[unk] Ünïcode ☃ 日本"  # unseen characters, and the unknown token's text
    enc = tok.encode_with_info(c)
    assert not enc.truncated
    assert tok.unk_id not in enc.ids
    assert tok.decode(enc.ids) == tok.normalize(c) == "[unk] ünïcode ☃ 日本"


def test_per_position_padding_ids(tok):
    enc = tok.encode_with_info("a red star")
    assert 0 < enc.n_tokens < tok.text_len and not enc.truncated
    ids = enc.ids
    assert all(0 <= i < tok.trained_vocab_size <= tok.vocab_size for i in ids[: enc.n_tokens])
    for position in range(enc.n_tokens, tok.text_len):
        assert ids[position] == tok.vocab_size + position == tok.pad_id(position)
    assert len(set(tok.pad_ids)) == tok.text_len
    assert tok.pad_ids == tuple(range(tok.vocab_size, tok.vocab_size + tok.text_len))
    assert tok.total_vocab_size == tok.vocab_size + tok.text_len
    batch = tok.encode_batch(["a red star", "a big blue square above a green circle"])
    assert batch.dtype == torch.long and batch.shape == (2, tok.text_len)
    assert int(batch.max()) < tok.total_vocab_size
    mask = tok.is_pad(batch)
    assert mask[0].tolist() == [p >= enc.n_tokens for p in range(tok.text_len)]
    assert torch.equal(batch[mask], (torch.arange(tok.text_len).expand(2, -1) + tok.vocab_size)[mask])
    assert tok.decode_batch(batch) == ["a red star", "a big blue square above a green circle"]


def test_truncation_to_text_len(tok):
    long = " and ".join(CAPTIONS[:6])
    enc = tok.encode_with_info(long)
    assert enc.truncated and enc.n_tokens == tok.text_len and enc.n_tokens_full > tok.text_len
    assert len(enc.ids) == tok.text_len
    assert not any(tok.is_pad(torch.tensor(enc.ids)).tolist())
    assert tok.normalize(long).startswith(tok.decode(enc.ids))
    ids, truncated = tok.encode_batch_with_info([long, "a red star"])
    assert truncated.tolist() == [True, False]
    assert ids[0].tolist() == enc.ids


def test_empty_caption_is_an_error(tok):
    for bad in ["", "   ", "\t\n"]:
        with pytest.raises(ValueError, match="empty or whitespace-only"):
            tok.encode(bad)
    with pytest.raises(ValueError, match="batch item 1 of 2.*empty"):
        tok.encode_batch(["a red star", "  "])
    with pytest.raises(TypeError, match="caption must be str"):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_bpe_tokenizer(["", "  "], get_profile("tiny").text)
    with pytest.raises(TypeError, match="caption 1 is int"):
        train_bpe_tokenizer(["a red star", 3], get_profile("tiny").text)  # type: ignore[list-item]


def test_vocab_size_is_respected():
    config = TextConfig(vocab_size=300, text_len=16)
    small = train_bpe_tokenizer(CAPTIONS, config)
    assert small.trained_vocab_size == 300  # the corpus has more than 300 - 257 frequent pairs
    assert small.backend.get_vocab_size() == 300
    ids = small.encode_batch(CAPTIONS[:100])
    bpe = ids[~small.is_pad(ids)]
    assert int(bpe.max()) < 300 and int(ids.max()) < 300 + 16
    # a corpus too small to fill the vocabulary leaves the pad ids where the config puts them
    tiny = train_bpe_tokenizer(["a red star"] * 5, get_profile("tiny").text)
    assert tiny.trained_vocab_size < tiny.vocab_size
    assert tiny.encode("a red star")[-1] == tiny.vocab_size + tiny.text_len - 1


def test_training_is_deterministic(tok):
    again = train_bpe_tokenizer(iter(CAPTIONS), get_profile("tiny").text)
    assert again.to_json() == tok.to_json()


def test_save_load_gives_identical_ids(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "bpe.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["dalle"]["config"] == get_profile("tiny").text.to_dict()
    assert "model" in data  # the tokenizers JSON itself
    loaded = DalleTokenizer.load(path)
    assert loaded.config == tok.config and loaded.trained_vocab_size == tok.trained_vocab_size
    sample = CAPTIONS[:50] + ["[unk] ☃", " and ".join(CAPTIONS[:5])]
    assert torch.equal(loaded.encode_batch(sample), tok.encode_batch(sample))
    assert [loaded.decode(tok.encode(c)) for c in sample] == [tok.decode(tok.encode(c)) for c in sample]
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode_batch(sample), tok.encode_batch(sample))


def test_loading_a_non_tokenizer_file_names_it(tok, tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x89PNG not json")
    with pytest.raises(ValueError, match="garbage.json is not a DALL-E tokenizer file"):
        DalleTokenizer.load(garbage)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="other.json is not a DALL-E tokenizer file"):
        DalleTokenizer.load(other)
    plain = tmp_path / "plain_tokenizers.json"
    plain.write_text(tok.backend.to_str())  # a tokenizers file without our config
    with pytest.raises(ValueError, match="plain_tokenizers.json is not a DALL-E tokenizer file"):
        DalleTokenizer.load(plain)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        DalleTokenizer.load(tmp_path / "missing.json")


def test_bpe_dropout_changes_segmentation_not_text(wide):
    tok = wide
    caption = "a large yellow triangle to the right of a purple hexagon"
    plain = tok.encode(caption)
    # unseeded: the tokenizers copy with BPE(dropout=0.1)
    seen = {tuple(tok.encode(caption, dropout=True)) for _ in range(60)}
    assert len(seen) > 1
    for ids in seen:
        assert tok.decode(ids) == caption
    batch = tok.encode_batch([caption] * 40, dropout=True)
    assert len({tuple(r) for r in batch.tolist()}) > 1
    assert set(tok.decode_batch(batch)) == {caption}
    # seeded: reproducible from the generator, still the same text
    a = [tok.encode(caption, dropout=True, rng=random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(3)
    seeded = {tuple(tok.encode(caption, dropout=True, rng=rng)) for _ in range(60)}
    assert len(seeded) > 1 and all(tok.decode(ids) == caption for ids in seeded)
    assert torch.equal(
        tok.encode_batch([caption] * 4, dropout=True, rng=11),
        tok.encode_batch([caption] * 4, dropout=True, rng=11),
    )
    # dropout only splits tokens, so it never shortens the text part
    n_plain = sum(i < tok.vocab_size for i in plain)
    assert all(sum(i < tok.vocab_size for i in ids) >= n_plain for ids in seen | seeded)


def test_python_bpe_without_dropout_matches_tokenizers(tok):
    r = random.Random(0)
    for caption in CAPTIONS[:300] + ["[unk] Ünïcode ☃ 日本", "circles circled squarely"]:
        assert tok._seeded_bpe_ids(caption, 0.0, r) == tok.backend.encode(caption).ids


def test_decode_rejects_ids_outside_the_space(tok):
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.total_vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    if tok.trained_vocab_size < tok.vocab_size:
        with pytest.raises(ValueError, match="not in the trained BPE vocabulary"):
            tok.decode([tok.trained_vocab_size])
    assert tok.decode(list(tok.pad_ids)) == ""
