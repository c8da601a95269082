"""The paper's text tokenizer: lowercased byte-level BPE with per-position padding.

DALL-E (Ramesh et al., 2021, section 2.2 and appendix B.2) lowercases the
caption, BPE-encodes it with a vocabulary of 16,384 and keeps at most 256
tokens; every one of the 256 text positions has its *own* padding token, so the
prior can tell "no text at position i" apart from "no text at position j".
During training the captions are encoded with BPE dropout (Provilkov et al.,
2019) of 10%.

The id space the prior sees
---------------------------
One embedding table covers both kinds of ids::

    [0, vocab_size)                          BPE ids (the trained vocabulary)
    [vocab_size, vocab_size + text_len)      the padding token of position i is vocab_size + i

so ``total_vocab_size = vocab_size + text_len`` (16,384 + 256 for the paper).
The trained BPE vocabulary may be smaller than ``vocab_size`` when the corpus
has fewer frequent pairs than merges allowed (the demo world's captions); the
ids stay where they are and the pad ids do not move, so a model built from the
config is valid for any tokenizer trained with that config.

The BPE itself
--------------
``tokenizers`` BPE with a NFKC + Lowercase normalizer (whitespace runs folded
to one space and the ends stripped), the GPT-2 byte-level pre-tokenizer (with a
prefix space, so the first word is tokenized like every other word) and the
full 256-symbol byte alphabet, so every caption in any script encodes without
loss. There is an unknown token (``[UNK]``, id 0) as the model requires, but it
is never produced for text: it is not registered as an added token, so a
caption that literally contains "[unk]" is tokenized as ordinary bytes.

BPE dropout and seeds
---------------------
``tokenizers``' BPE dropout draws from a thread-local random generator that
cannot be seeded. ``encode(..., dropout=True)`` without a generator uses a
second copy of the tokenizer built with ``BPE(dropout=config.bpe_dropout)``:
fast, but not reproducible. Passing ``rng`` (a ``random.Random`` or an int
seed) switches to a small pure-Python BPE-dropout over the same vocabulary and
merges, which gives the same segmentation for the same generator state, so a
resumed training run sees the same text tokens. With no dropout both paths
produce exactly the ids of the ``tokenizers`` encoder (tested). ``rate``
overrides ``config.bpe_dropout`` for one call (the prior's data path passes
``PriorTrainingConfig.bpe_dropout``). Dropout happens only when asked for
(``dropout=True``): evaluation, sampling and `dalle generate` call the plain
encoders, which never vary.

Why not seed the library: ``tokenizers`` (Rust) draws BPE dropout from
``rand::thread_rng()``, which has no seed in the Python API; the pure-Python
path applies the same procedure (Provilkov et al.: at every merge step each
applicable merge is dropped with probability p, the best surviving one
applied; a word is done when every applicable merge was dropped) over the
same ranked merges, so a seed fixes the segmentation.

Files
-----
``DalleTokenizer.save(path)`` writes one JSON file: the ``tokenizers`` JSON with
an extra top-level ``"dalle"`` key holding the format name, version and the
:class:`TextConfig`. ``DalleTokenizer.load(path)`` needs nothing else.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle_core.io import atomic_write_text

__all__ = [
    "BYTE_ALPHABET_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "UNK_TOKEN",
    "DalleTokenizer",
    "TextConfig",
    "TextEncoding",
    "train_bpe_tokenizer",
]

UNK_TOKEN = "[UNK]"
BYTE_ALPHABET_SIZE = 256  # the byte-level pre-tokenizer's alphabet, always in the vocabulary
FORMAT_NAME = "dalle-text-tokenizer"
FORMAT_VERSION = 1
_DALLE_KEY = "dalle"


@dataclass(frozen=True)
class TextConfig:
    """Text tokenizer settings.

    vocab_size: size of the BPE vocabulary (paper: 16,384); includes the 256
        byte symbols and ``[UNK]``, excludes the per-position pad tokens.
    text_len: number of text positions (paper: 256); captions are truncated to
        it and padded with one distinct pad token per position.
    bpe_dropout: probability of dropping a merge when encoding with
        ``dropout=True`` (paper: 10%, training only).
    min_frequency: a pair must occur at least this often to become a merge.
    """

    vocab_size: int
    text_len: int
    bpe_dropout: float = 0.1
    min_frequency: int = 2

    def __post_init__(self) -> None:
        minimum = BYTE_ALPHABET_SIZE + 1
        if not isinstance(self.vocab_size, int) or self.vocab_size < minimum:
            raise ValueError(
                f"TextConfig.vocab_size={self.vocab_size!r}: a byte-level BPE vocabulary needs at "
                f"least {minimum} entries (256 byte symbols + {UNK_TOKEN})"
            )
        if not isinstance(self.text_len, int) or self.text_len < 1:
            raise ValueError(f"TextConfig.text_len={self.text_len!r}: must be a positive integer")
        if not 0.0 <= float(self.bpe_dropout) < 1.0:
            raise ValueError(f"TextConfig.bpe_dropout={self.bpe_dropout!r}: must be in [0, 1)")
        if not isinstance(self.min_frequency, int) or self.min_frequency < 1:
            raise ValueError(f"TextConfig.min_frequency={self.min_frequency!r}: must be an integer >= 1")

    @property
    def total_vocab_size(self) -> int:
        """BPE ids plus one pad id per position: the prior's text embedding size."""
        return self.vocab_size + self.text_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TextConfig fields: {unknown}")
        return cls(**data)


@dataclass(frozen=True)
class TextEncoding:
    """One encoded caption.

    ids: exactly ``text_len`` ids (BPE ids, then the per-position pad ids).
    n_tokens: BPE tokens kept (positions ``[0, n_tokens)`` are text).
    n_tokens_full: BPE tokens before truncation.
    """

    ids: list[int]
    n_tokens: int
    n_tokens_full: int

    @property
    def truncated(self) -> bool:
        return self.n_tokens_full > self.n_tokens


# --------------------------------------------------------------------------- building


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _checked_captions(captions: Iterable[str], counts: dict[str, int]) -> Iterator[str]:
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"caption {index} is {type(caption).__name__}, not str: {caption!r:.80}")
        if not caption.strip():
            counts["skipped_empty"] += 1
            continue
        counts["used"] += 1
        yield caption


def train_bpe_tokenizer(captions: Iterable[str], config: TextConfig) -> "DalleTokenizer":
    """Train the lowercased byte-level BPE on ``captions`` (streamed, not held in memory).

    Empty / whitespace-only captions are skipped. Deterministic: the same
    captions and config give a byte-identical tokenizer file.
    """
    if not isinstance(config, TextConfig):
        raise TypeError(f"config must be a TextConfig, got {type(config).__name__}")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        show_progress=False,
        special_tokens=[UNK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    counts = {"used": 0, "skipped_empty": 0}
    tok.train_from_iterator(_checked_captions(captions, counts), trainer=trainer)
    if counts["used"] == 0:
        raise ValueError(
            f"no non-empty captions to train the BPE tokenizer on "
            f"({counts['skipped_empty']} empty or whitespace-only captions skipped)"
        )
    # [UNK] must stay in the model's vocabulary, but as an *added* token it
    # would also match the literal text "[unk]" in a caption; drop it from the
    # added vocabulary so that caption text only ever maps to byte-level BPE.
    data = json.loads(tok.to_str())
    data["added_tokens"] = []
    return DalleTokenizer(Tokenizer.from_str(json.dumps(data)), config)


# --------------------------------------------------------------------------- tokenizer


def _as_rng(rng: random.Random | int | None) -> random.Random | None:
    if rng is None or isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int):
        return random.Random(rng)
    raise TypeError(f"rng must be a random.Random, an int seed or None, got {type(rng).__name__}")


class DalleTokenizer:
    """Caption <-> ``text_len`` ids in the prior's text id space (see module doc)."""

    def __init__(self, tokenizer: Tokenizer, config: TextConfig) -> None:
        self._tok = tokenizer
        self.config = config
        n_trained = tokenizer.get_vocab_size(with_added_tokens=True)
        if n_trained > config.vocab_size:
            raise ValueError(
                f"tokenizer has {n_trained} BPE ids but TextConfig.vocab_size is {config.vocab_size}"
            )
        self.trained_vocab_size = n_trained
        self.pad_ids: tuple[int, ...] = tuple(config.vocab_size + i for i in range(config.text_len))
        self._dropout_tok: Tokenizer | None = None
        self._py_bpe: tuple[dict[str, int], dict[tuple[str, str], int], int] | None = None

    # ---- sizes and ids
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def text_len(self) -> int:
        return self.config.text_len

    @property
    def total_vocab_size(self) -> int:
        return self.config.total_vocab_size

    @property
    def unk_id(self) -> int:
        return self._tok.token_to_id(UNK_TOKEN)

    def pad_id(self, position: int) -> int:
        if not 0 <= position < self.text_len:
            raise IndexError(f"text position {position} outside [0, {self.text_len})")
        return self.vocab_size + position

    def is_pad(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the pad ids in a tensor of text ids."""
        return (ids >= self.vocab_size) & (ids < self.total_vocab_size)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (BPE ids only, no padding)."""
        return self._tok

    def normalize(self, caption: str) -> str:
        """The caption as the tokenizer sees it (NFKC, lowercased, whitespace folded)."""
        return self._tok.normalizer.normalize_str(caption)

    # ---- encoding
    def _dropout_tokenizer(self) -> Tokenizer:
        if self._dropout_tok is None:
            data = json.loads(self._tok.to_str())
            data["model"]["dropout"] = float(self.config.bpe_dropout)
            self._dropout_tok = Tokenizer.from_str(json.dumps(data))
        return self._dropout_tok

    def _python_bpe(self) -> tuple[dict[str, int], dict[tuple[str, str], int], int]:
        if self._py_bpe is None:
            model = json.loads(self._tok.to_str())["model"]
            ranks: dict[tuple[str, str], int] = {}
            for rank, merge in enumerate(model["merges"]):
                pair = tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
                ranks.setdefault(pair, rank)  # type: ignore[arg-type]
            self._py_bpe = (model["vocab"], ranks, self.unk_id)
        return self._py_bpe

    def _seeded_bpe_ids(self, caption: str, p: float, rng: random.Random) -> list[int]:
        """BPE with dropout (Provilkov et al.) from an explicit generator.

        At every step each applicable merge is dropped with probability ``p``
        and the best-ranked surviving one (leftmost on ties) is applied; the
        word is done when every applicable merge was dropped. With ``p == 0``
        this is the ``tokenizers`` BPE exactly.
        """
        vocab, ranks, unk = self._python_bpe()
        out: list[int] = []
        words = self._tok.pre_tokenizer.pre_tokenize_str(self._tok.normalizer.normalize_str(caption))
        for word, _ in words:
            symbols = list(word)
            while len(symbols) > 1:
                best: tuple[int, int] | None = None
                for i in range(len(symbols) - 1):
                    rank = ranks.get((symbols[i], symbols[i + 1]))
                    if rank is None or (p > 0.0 and rng.random() < p):
                        continue
                    if best is None or rank < best[0]:
                        best = (rank, i)
                if best is None:
                    break
                i = best[1]
                symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
            out.extend(vocab.get(s, unk) for s in symbols)
        return out

    def _rate(self, dropout: bool, rate: float | None) -> float:
        if not dropout:
            return 0.0
        p = float(self.config.bpe_dropout if rate is None else rate)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"BPE dropout rate must be in [0, 1), got {rate!r}")
        return p

    def _finish(self, bpe_ids: Sequence[int], caption: Any, where: str = "") -> TextEncoding:
        if len(bpe_ids) == 0:
            raise ValueError(f"{where}caption is empty or whitespace-only: {caption!r}")
        kept = list(bpe_ids[: self.text_len])
        ids = kept + list(self.pad_ids[len(kept) :])
        return TextEncoding(ids=ids, n_tokens=len(kept), n_tokens_full=len(bpe_ids))

    @staticmethod
    def _check_str(caption: Any, where: str = "") -> None:
        if not isinstance(caption, str):
            raise TypeError(f"{where}caption must be str, got {type(caption).__name__}: {caption!r:.80}")

    def encode_with_info(
        self, caption: str, dropout: bool = False, rng: random.Random | int | None = None,
        rate: float | None = None,
    ) -> TextEncoding:
        """Encode one caption and report whether it was truncated."""
        self._check_str(caption)
        gen = _as_rng(rng)
        p = self._rate(dropout, rate)
        if gen is not None and p > 0.0:
            bpe_ids = self._seeded_bpe_ids(caption, p, gen)
        elif p > 0.0 and rate is not None and p != float(self.config.bpe_dropout):
            raise ValueError("an unseeded dropout encode uses config.bpe_dropout; pass rng for another rate")
        else:
            tok = self._dropout_tokenizer() if p > 0.0 else self._tok
            bpe_ids = tok.encode(caption, add_special_tokens=False).ids
        return self._finish(bpe_ids, caption)

    def encode(self, caption: str, dropout: bool = False, rng: random.Random | int | None = None,
               rate: float | None = None) -> list[int]:
        """Exactly ``text_len`` ids: BPE ids truncated to ``text_len``, then pad id ``vocab_size + i``
        at every free position ``i``. ``dropout=True`` applies BPE dropout (training) at ``rate``
        (default ``config.bpe_dropout``); ``rng`` makes it reproducible."""
        return self.encode_with_info(caption, dropout=dropout, rng=rng, rate=rate).ids

    def encode_batch_with_info(
        self,
        captions: Sequence[str],
        dropout: bool = False,
        rng: random.Random | int | None = None,
        rate: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids LongTensor[B, text_len], truncated BoolTensor[B])``."""
        captions = list(captions)
        n = len(captions)
        for index, caption in enumerate(captions):
            self._check_str(caption, where=f"batch item {index} of {n}: ")
        gen = _as_rng(rng)
        p = self._rate(dropout, rate)
        if gen is not None and p > 0.0:
            all_ids = [self._seeded_bpe_ids(c, p, gen) for c in captions]
        elif p > 0.0 and rate is not None and p != float(self.config.bpe_dropout):
            raise ValueError("an unseeded dropout encode uses config.bpe_dropout; pass rng for another rate")
        else:
            tok = self._dropout_tokenizer() if p > 0.0 else self._tok
            all_ids = [e.ids for e in tok.encode_batch(captions, add_special_tokens=False)] if captions else []
        encodings = [
            self._finish(ids, c, where=f"batch item {i} of {n}: ") for i, (ids, c) in enumerate(zip(all_ids, captions))
        ]
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(n, self.text_len)
        truncated = torch.tensor([e.truncated for e in encodings], dtype=torch.bool).reshape(n)
        return ids, truncated

    def encode_batch(
        self, captions: Sequence[str], dropout: bool = False, rng: random.Random | int | None = None,
        rate: float | None = None,
    ) -> torch.Tensor:
        """``LongTensor[B, text_len]`` of :meth:`encode` rows."""
        return self.encode_batch_with_info(captions, dropout=dropout, rng=rng, rate=rate)[0]

    def tokens(self, caption: str) -> list[str]:
        """The BPE token strings of a caption (byte-level symbols; for inspection)."""
        self._check_str(caption)
        return self._tok.encode(caption, add_special_tokens=False).tokens

    # ---- decoding
    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a row of ids, skipping the pad ids wherever they are."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one row of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        bpe: list[int] = []
        for position, raw in enumerate(ids):
            i = int(raw)
            if i < 0 or i >= self.total_vocab_size:
                raise ValueError(
                    f"text id {i} at position {position} is outside [0, {self.total_vocab_size})"
                )
            if i >= self.vocab_size:
                continue  # a pad id
            if i >= self.trained_vocab_size:
                raise ValueError(
                    f"text id {i} at position {position} is not in the trained BPE vocabulary "
                    f"({self.trained_vocab_size} ids)"
                )
            bpe.append(i)
        text = self._tok.decode(bpe, skip_special_tokens=False)
        # the byte-level pre-tokenizer adds one prefix space; normalised text never starts with one
        return text[1:] if text.startswith(" ") else text

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        if ids.dim() != 2:
            raise ValueError(f"decode_batch takes [B, text_len] ids, got shape {tuple(ids.shape)}")
        return [self.decode(row) for row in ids]

    # ---- files
    def to_json(self) -> str:
        data = json.loads(self._tok.to_str())
        data[_DALLE_KEY] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "trained_vocab_size": self.trained_vocab_size,
            "total_vocab_size": self.total_vocab_size,
        }
        return json.dumps(data, ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "DalleTokenizer":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{source} is not a DALL-E tokenizer file: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get(_DALLE_KEY), dict):
            raise ValueError(
                f"{source} is not a DALL-E tokenizer file: no {_DALLE_KEY!r} section "
                f"(expected the JSON written by DalleTokenizer.save)"
            )
        meta = data.pop(_DALLE_KEY)
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{source} is not a DALL-E tokenizer file: format is {meta.get('format')!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: DALL-E tokenizer format version {meta.get('version')!r} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        try:
            config = TextConfig.from_dict(meta["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: bad DALL-E tokenizer config: {exc}") from None
        try:
            tok = Tokenizer.from_str(json.dumps(data))
        except Exception as exc:  # tokenizers raises a plain Exception
            raise ValueError(f"{source}: the tokenizer JSON does not load: {exc}") from None
        return cls(tok, config)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the one-file tokenizer (``tokenizers`` JSON + ``"dalle"`` config section)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DalleTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a DALL-E tokenizer file: not UTF-8 text") from None
        return cls.from_json(text, source=str(path))

    # ---- misc
    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers
        return {"json": self.to_json()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        other = type(self).from_json(state["json"], source="<pickle>")
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"DalleTokenizer(vocab_size={c.vocab_size}, trained={self.trained_vocab_size}, "
            f"text_len={c.text_len}, total_vocab_size={self.total_vocab_size}, bpe_dropout={c.bpe_dropout})"
        )
