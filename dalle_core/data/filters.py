"""The paper's data filters (Ramesh et al., 2021, appendix C) and the pipeline that runs them.

Each filter is a small object with a `name` and `check(pair) -> str | None`:
None keeps the pair, a string is the short reason it is dropped. Thresholds
come from `DataConfig`.

The two de-duplication filters (exact and near) are stateful: they compare
against the images kept before (the evaluation-overlap filter compares against
the fixed set of evaluation pHashes it was built with). Their `check` never
changes state; `accept(pair)` registers a pair once the *whole* pipeline has
kept it (so an image dropped by a later filter is not "seen"). Their state is
exported with `state_dict()` / `load_state_dict()`, so a new crawl batch can be
filtered against everything kept before without re-reading old batches.

Near-duplicate search (`HammingIndex`) uses multi-index hashing (Norouzi et
al., "Fast search in Hamming space with multi-index hashing", 2012): the 64-bit
pHash is cut into m disjoint bands (default 4 of 16 bits). If two hashes differ
in at most d bits, then by the pigeonhole principle at least one band differs
in at most floor(d / m) bits. So a query looks up, in each band's table, every
band value within floor(d / m) bits of its own band (for d = 6, m = 4: the band
itself and its 16 one-bit neighbours, 17 lookups per band) and verifies the
candidates with a full 64-bit popcount. The search is exact (no false
negatives) for any d, and each lookup touches a bucket of about n / 2^16
entries instead of all n.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from .pairs import InvalidSampleError, Pair, UndecodableImageError

PHASH_BITS = 64

# --------------------------------------------------------------------------- pHash


def compute_phash(image) -> str:
    """Hex string (16 chars) of the 64-bit perceptual hash (imagehash.phash) of a PIL image."""
    import imagehash

    return str(imagehash.phash(image.convert("RGB")))


def pair_phash(pair: Pair) -> str:
    """The pair's pHash, computed once per Pair object (or taken from meta["phash"])."""
    h = pair._cache.get("phash")
    if h is None:
        h = pair.meta.get("phash")
        if not (isinstance(h, str) and re.fullmatch(r"[0-9a-f]{16}", h)):
            h = compute_phash(pair.image)
        pair._cache["phash"] = h
    return h


def phash_int(h: str | int) -> int:
    return h if isinstance(h, int) else int(h, 16)


def hamming(a: str | int, b: str | int) -> int:
    return (phash_int(a) ^ phash_int(b)).bit_count()


class HammingIndex:
    """Exact radius search over 64-bit hashes by multi-index hashing (see module doc)."""

    def __init__(self, max_distance: int, bands: int = 4, bits: int = PHASH_BITS):
        if not 1 <= bands <= bits:
            raise ValueError(f"bands must be in [1, {bits}], got {bands}")
        self.max_distance = int(max_distance)
        self.bits = bits
        # band b covers bits [starts[b], starts[b] + widths[b])
        base, extra = divmod(bits, bands)
        self.widths = [base + (1 if i < extra else 0) for i in range(bands)]
        self.starts = [sum(self.widths[:i]) for i in range(bands)]
        self.radius = self.max_distance // bands  # per-band search radius (pigeonhole)
        self._tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        self.hashes: list[int] = []
        self.keys: list[str] = []
        # the bit flips to try in one band, per width (cached)
        self._flips: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.hashes)

    def _bands(self, h: int) -> list[int]:
        return [(h >> s) & ((1 << w) - 1) for s, w in zip(self.starts, self.widths)]

    def _masks(self, width: int) -> list[int]:
        masks = self._flips.get(width)
        if masks is None:
            masks = [0]
            for r in range(1, min(self.radius, width) + 1):
                for bits in itertools.combinations(range(width), r):
                    masks.append(sum(1 << b for b in bits))
            self._flips[width] = masks
        return masks

    def add(self, h: str | int, key: str) -> None:
        h = phash_int(h)
        idx = len(self.hashes)
        self.hashes.append(h)
        self.keys.append(key)
        for table, band in zip(self._tables, self._bands(h)):
            table.setdefault(band, []).append(idx)

    def nearest_within(self, h: str | int) -> tuple[int, str] | None:
        """(distance, key) of the closest stored hash within max_distance, else None."""
        h = phash_int(h)
        best: tuple[int, str] | None = None
        seen: set[int] = set()
        for table, band, width in zip(self._tables, self._bands(h), self.widths):
            for mask in self._masks(width):
                for idx in table.get(band ^ mask, ()):
                    if idx in seen:
                        continue
                    seen.add(idx)
                    d = (self.hashes[idx] ^ h).bit_count()
                    if d <= self.max_distance and (best is None or d < best[0]):
                        best = (d, self.keys[idx])
                        if d == 0:
                            return best
        return best

    def state_dict(self) -> dict:
        return {
            "max_distance": self.max_distance,
            "bands": len(self.widths),
            "hashes": [f"{h:016x}" for h in self.hashes],
            "keys": list(self.keys),
        }

    @classmethod
    def from_state_dict(cls, state: dict, max_distance: int | None = None) -> "HammingIndex":
        index = cls(
            max_distance if max_distance is not None else state["max_distance"],
            bands=state.get("bands", 4),
        )
        for h, k in zip(state["hashes"], state["keys"]):
            index.add(h, k)
        return index


# --------------------------------------------------------------------------- language


# Languages the identifier chooses among by default: widely written languages
# (ISO 639-1). py3langid's full model also has ~80 regional and low-resource
# labels (Nigerian Pidgin, Occitan, Venetian, Aragonese, ...) that are close to
# English or Romance spellings and take a large share of the probability of
# short English captions; restricting the label set keeps them from pushing
# real English captions below the confidence threshold. Pass languages=None
# to use every label of the model.
DEFAULT_LANGUAGES: tuple[str, ...] = tuple(
    "af ar az be bg bn ca cs da de el en es et eu fa fi fr ga gl he hi hr hu hy id is it "
    "ja ka kk ko lt lv mk ms nl no pl pt ro ru sk sl sq sr sv sw ta th tl tr uk ur vi zh".split()
)

_IDENTIFIERS: dict[tuple[str, ...] | None, object] = {}
_IDENTIFIER_LOCK = threading.Lock()


def language_identifier(languages: Sequence[str] | None = DEFAULT_LANGUAGES):
    """A py3langid identifier with normalised probabilities (model shipped in the package)."""
    cache_key = tuple(languages) if languages is not None else None
    with _IDENTIFIER_LOCK:
        ident = _IDENTIFIERS.get(cache_key)
        if ident is None:
            from py3langid import langid

            if hasattr(langid.LanguageIdentifier, "from_model_file"):  # py3langid >= 0.3
                ident = langid.LanguageIdentifier.from_model_file(
                    langid.MODEL_FILE, norm_probs=True
                )
            else:  # older releases ship a pickled model
                ident = langid.LanguageIdentifier.from_pickled_model(
                    langid.MODEL_FILE, norm_probs=True
                )
            if languages is not None:
                ident.set_languages(list(languages))
            _IDENTIFIERS[cache_key] = ident
        return ident


def detect_language(
    text: str, languages: Sequence[str] | None = DEFAULT_LANGUAGES
) -> tuple[str, float]:
    """(language code, normalised probability) of `text`."""
    lang, prob = language_identifier(languages).classify(text)
    return str(lang), float(prob)


# --------------------------------------------------------------------------- filters


@runtime_checkable
class Filter(Protocol):
    name: str

    def check(self, pair: Pair) -> str | None: ...


def _words(text: str) -> list[str]:
    return text.split()


class CaptionTooShort:
    """Captions with fewer than `min_words` words, or longer than `max_chars` characters."""

    name = "caption_too_short"

    def __init__(self, min_words: int = 3, max_chars: int = 400):
        self.min_words = min_words
        self.max_chars = max_chars

    def check(self, pair: Pair) -> str | None:
        caption = pair.caption.strip()
        n = len(_words(caption))
        if n < self.min_words:
            return f"caption has {n} word(s) (< {self.min_words})"
        if len(caption) > self.max_chars:
            return f"caption has {len(caption)} characters (> {self.max_chars})"
        return None


class NonEnglishCaption:
    """Captions whose most likely language is not English, or is English with low probability.

    The paper used cld3; here py3langid, whose model ships inside the package
    (no download at first use), with probabilities normalised over `languages`.
    Very short captions (three or four words) are often ambiguous between
    languages and can fall under the threshold even when English.
    """

    name = "non_english"

    def __init__(
        self,
        min_confidence: float = 0.5,
        target: str = "en",
        languages: Sequence[str] | None = DEFAULT_LANGUAGES,
    ):
        self.min_confidence = min_confidence
        self.target = target
        self.languages = tuple(languages) if languages is not None else None
        language_identifier(self.languages)  # load the model now, not on the first pair

    def check(self, pair: Pair) -> str | None:
        lang, prob = detect_language(pair.caption, self.languages)
        if lang != self.target:
            return f"language {lang} (p={prob:.2f})"
        if prob < self.min_confidence:
            return f"language {lang} with p={prob:.2f} < {self.min_confidence}"
        return None


_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_WEEKDAY = r"(?:mon|tue|wed|thu|fri|sat|sun)(?:day|sday|nesday|rsday|urday)?\.?"
_ORD = r"\d{1,2}(?:st|nd|rd|th)?"
_FILE_EXT = r"(?:jpe?g|png|gif|bmp|tiff?|heic|raw|cr2|nef|dng|webp|mov|mp4|avi)"
# Patterns for date/time and camera boilerplate (applied to the lowercased caption).
_BOILERPLATE_PATTERNS = [
    # any file name: IMG_20090312_1422.jpg, holiday-2009.png
    rf"\b[\w\-]+\.{_FILE_EXT}\b",
    # camera file stems: IMG_1234, DSC01234, DSCN0042, P1010001, GOPR0001, MVI_1234, 100_1234
    r"\b(?:img|dsc[nf]?|dcim|pict?|pxl|sam|gopr|mvi|vid|wp|imag|photo|image|scan|screenshot)"
    r"[_\-]?\d[\w\-]*",
    r"\bp\d{6,}\b",
    r"\b\d{3}[_\-]\d{4}\b",
    # ISO-like date, optional time: 2009-03-12 14:22:01, 2009:03:12, 20090312_142201
    r"\b\d{4}[\-/._:]\d{1,2}[\-/._:]\d{1,2}(?:[ t_\-]+\d{1,2}[:.h]\d{2}(?:[:.m]\d{2})?s?)?\b",
    r"\b(?:19|20)\d{6}(?:[_\-t]?\d{4,6})?\b",
    # numeric day/month/year: 3/12/2009, 12.03.09
    r"\b\d{1,2}[\-/.]\d{1,2}[\-/.]\d{2,4}\b",
    # written dates: 12 march 2009, march 12th, 2009, tuesday 12 march
    rf"\b(?:{_WEEKDAY},?\s+)?(?:{_ORD}\s+(?:of\s+)?)?{_MONTH}(?:\s+{_ORD}(?:st|nd|rd|th)?)?,?(?:\s+(?:19|20)\d{{2}})?\b",
    # times: 14:22, 2:05 pm, 14:22:01
    r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\s*[ap]\.?m\.?)?\b",
    r"\b\d{1,2}\s*[ap]\.?m\.?\b",
    # bare years and other numbers
    r"\b(?:19|20)\d{2}s?\b",
    r"\b\d+\b",
]
_BOILERPLATE_RE = re.compile("|".join(f"(?:{p})" for p in _BOILERPLATE_PATTERNS))
# Words that carry no description of the image in boilerplate captions.
_BOILERPLATE_WORDS = frozenset(
    """
    photo photos photograph pic pics picture pictures image images img snapshot snap shot
    taken take uploaded upload posted added created modified edited captured shot scanned
    date time on at in of the a an by from with and copyright c untitled unknown no caption
    camera digital file jpg jpeg png dsc mobile phone iphone android canon nikon sony olympus
    fujifilm panasonic samsung kodak day today yesterday am pm utc gmt
    """.split()
)


class BoilerplateDateCaption:
    """Captions that are mostly a date/time or camera boilerplate.

    "photo taken on 12 March 2009", "IMG_20090312_1422.jpg", "2009-03-12 14:22:01",
    "DSC01234", "uploaded on 3/12/2009". The caption is stripped of dates,
    times, numbers and camera file names, then of boilerplate words ("photo",
    "taken", "uploaded", "on", ...); it is dropped when fewer than
    `min_content_words` descriptive words remain, or when the boilerplate
    makes up more than `max_boilerplate_share` of its characters. A real
    caption that merely mentions a year ("a red circle drawn in 2009 above a
    blue square") keeps most of its words and is kept.
    """

    name = "boilerplate_date"

    def __init__(self, min_content_words: int = 2, max_boilerplate_share: float = 0.6):
        self.min_content_words = min_content_words
        self.max_boilerplate_share = max_boilerplate_share

    def content_words(self, caption: str) -> tuple[list[str], float, bool]:
        """(descriptive words left, boilerplate share of characters, whether a date/file matched)."""
        text = caption.lower()
        matched = False
        removed_chars = 0

        def _sub(m: re.Match) -> str:
            nonlocal matched, removed_chars
            matched = True
            removed_chars += len(m.group(0))
            return " "

        stripped = _BOILERPLATE_RE.sub(_sub, text)
        words = re.findall(r"[^\W\d_]+", stripped)
        content = [w for w in words if w not in _BOILERPLATE_WORDS and len(w) > 1]
        boiler_words_chars = sum(len(w) for w in words if w not in content)
        total = len(re.sub(r"\s+", "", text)) or 1
        share = min(1.0, (removed_chars + boiler_words_chars) / total)
        return content, share, matched

    def check(self, pair: Pair) -> str | None:
        content, share, matched = self.content_words(pair.caption)
        if not matched:
            return None
        if len(content) < self.min_content_words:
            return f"boilerplate date/camera caption ({len(content)} descriptive word(s))"
        if share > self.max_boilerplate_share:
            return f"boilerplate date/camera caption ({share:.0%} of characters)"
        return None


class AspectRatioOutOfRange:
    """Originals whose width/height is outside [low, high] (the paper's [1/2, 2])."""

    name = "aspect_ratio"

    def __init__(self, low: float = 0.5, high: float = 2.0):
        self.low = low
        self.high = high

    def check(self, pair: Pair) -> str | None:
        w, h = pair.meta_int("original_width"), pair.meta_int("original_height")
        if w <= 0 or h <= 0:
            return f"invalid original size {w}x{h}"
        ratio = w / h
        # a small tolerance keeps exact 1:2 and 2:1 originals
        if ratio < self.low - 1e-9 or ratio > self.high + 1e-9:
            return f"aspect ratio {ratio:.2f} ({w}x{h}) outside [{self.low:g}, {self.high:g}]"
        return None


class ImageTooSmall:
    """Originals with either side smaller than `min_side` pixels."""

    name = "image_too_small"

    def __init__(self, min_side: int = 32):
        self.min_side = min_side

    def check(self, pair: Pair) -> str | None:
        w, h = pair.meta_int("original_width"), pair.meta_int("original_height")
        if min(w, h) < self.min_side:
            return f"original {w}x{h} has a side < {self.min_side}"
        return None


class ExactDuplicate:
    """The sha256 of the downloaded original bytes was already kept."""

    name = "exact_duplicate"

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}  # sha256 -> key of the first pair kept

    def check(self, pair: Pair) -> str | None:
        pair.require_meta("sha256")
        first = self.seen.get(str(pair.meta["sha256"]))
        if first is not None:
            return f"same original bytes as {first}"
        return None

    def accept(self, pair: Pair) -> None:
        self.seen.setdefault(str(pair.meta["sha256"]), pair.key)

    def state_dict(self) -> dict:
        return {"seen": dict(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = dict(state.get("seen", {}))


class NearDuplicate:
    """pHash within `max_distance` bits of an image already kept (multi-index hashing)."""

    name = "near_duplicate"

    def __init__(self, max_distance: int = 6, bands: int = 4):
        self.max_distance = max_distance
        self.bands = bands
        self.index = HammingIndex(max_distance, bands=bands)

    def check(self, pair: Pair) -> str | None:
        hit = self.index.nearest_within(pair_phash(pair))
        if hit is not None:
            d, key = hit
            return f"pHash distance {d} to {key}"
        return None

    def accept(self, pair: Pair) -> None:
        self.index.add(pair_phash(pair), pair.key)

    def state_dict(self) -> dict:
        return self.index.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.index = HammingIndex.from_state_dict(state, max_distance=self.max_distance)


class EvalSetOverlap:
    """Near duplicates of an evaluation image (the paper removed MS-COCO validation images).

    `eval_phashes` maps eval image ids to pHash hex strings (or is a sequence
    of hashes, named by position).
    """

    name = "eval_overlap"

    def __init__(self, eval_phashes: dict[str, str] | Sequence[str] = (), max_distance: int = 6):
        self.max_distance = max_distance
        self.index = HammingIndex(max_distance)
        items = (
            eval_phashes.items()
            if isinstance(eval_phashes, dict)
            else ((f"eval-{i}", h) for i, h in enumerate(eval_phashes))
        )
        for name, h in items:
            self.index.add(h, str(name))

    def check(self, pair: Pair) -> str | None:
        if not len(self.index):
            return None
        hit = self.index.nearest_within(pair_phash(pair))
        if hit is not None:
            d, name = hit
            return f"pHash distance {d} to evaluation image {name}"
        return None


# --------------------------------------------------------------------------- pipeline

FILTER_ORDER = (
    "caption_too_short",
    "boilerplate_date",
    "non_english",
    "aspect_ratio",
    "image_too_small",
    "exact_duplicate",
    "eval_overlap",
    "near_duplicate",
)
UNDECODABLE = "undecodable_image"  # report entries for pairs no filter could judge
INVALID = "invalid_sample"
MAX_EXAMPLES = 5


@dataclass
class FilterReport:
    input_count: int = 0
    kept_count: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    removed_keys: dict[str, list[str]] = field(default_factory=dict)

    @property
    def removed_count(self) -> int:
        return sum(self.removed.values())

    def record(self, name: str, pair: Pair, reason: str) -> None:
        self.removed[name] = self.removed.get(name, 0) + 1
        self.removed_keys.setdefault(name, []).append(pair.key)
        ex = self.examples.setdefault(name, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append({"key": pair.key, "caption": pair.caption, "reason": reason})

    def to_dict(self) -> dict:
        return {
            "input_count": self.input_count,
            "kept_count": self.kept_count,
            "removed_count": self.removed_count,
            "removed": dict(self.removed),
            "examples": {k: [dict(e) for e in v] for k, v in self.examples.items()},
            "removed_keys": {k: list(v) for k, v in self.removed_keys.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FilterReport":
        return cls(
            input_count=d["input_count"],
            kept_count=d["kept_count"],
            removed=dict(d.get("removed", {})),
            examples={k: list(v) for k, v in d.get("examples", {}).items()},
            removed_keys={k: list(v) for k, v in d.get("removed_keys", {}).items()},
        )

    def summary(self) -> str:
        parts = [f"{self.kept_count}/{self.input_count} kept"]
        parts += [f"{k}: -{v}" for k, v in self.removed.items() if v]
        return ", ".join(parts)


class FilterPipeline:
    """Runs filters in a fixed order (cheap ones first) and reports what each removed."""

    def __init__(self, filters: Iterable[Filter]):
        filters = list(filters)
        names = [f.name for f in filters]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate filter names: {names}")
        rank = {n: i for i, n in enumerate(FILTER_ORDER)}
        # known filters in the standard order; any others keep their relative
        # order and run after the cheap ones but before the image-based ones
        # (stable sort with unknown names ranked just before exact_duplicate)
        default_rank = rank["exact_duplicate"] - 0.5
        self.filters = sorted(filters, key=lambda f: rank.get(f.name, default_rank))
        self.report = FilterReport(removed={f.name: 0 for f in self.filters})

    def check(self, pair: Pair) -> tuple[str, str] | None:
        """(filter name, reason) of the first filter that drops `pair`, else None."""
        for f in self.filters:
            try:
                reason = f.check(pair)
            except UndecodableImageError as e:
                return UNDECODABLE, e.reason
            except InvalidSampleError as e:  # e.g. metadata without original_width
                return INVALID, e.reason
            if reason is not None:
                return f.name, reason
        return None

    def reset_report(self) -> FilterReport:
        """Start a new report (the dedup state is kept); returns the old one."""
        old = self.report
        self.report = FilterReport(removed={f.name: 0 for f in self.filters})
        return old

    def apply(
        self,
        pairs: Iterable[Pair],
        on_reject: Callable[[Pair, str, str], None] | None = None,
    ) -> Iterator[Pair]:
        """Yield the kept pairs (with meta["phash"] added), counting what was removed.

        `on_reject(pair, filter_name, reason)` sees every removed pair (for previews).

        Counts accumulate in `self.report` over calls (see `reset_report`). A
        pair whose image does not decode, or whose metadata lacks a field a
        filter needs, is not kept and is counted under "undecodable_image" or
        "invalid_sample" with the reason, so nothing disappears unexplained.
        """
        for pair in pairs:
            self.report.input_count += 1
            verdict = self.check(pair)
            if verdict is None:
                try:
                    ph = pair_phash(pair)
                except UndecodableImageError as e:
                    verdict = (UNDECODABLE, e.reason)
            if verdict is not None:
                self.report.record(verdict[0], pair, verdict[1])
                if on_reject is not None:
                    on_reject(pair, verdict[0], verdict[1])
                continue
            for f in self.filters:
                accept = getattr(f, "accept", None)
                if accept is not None:
                    accept(pair)
            pair.meta["phash"] = ph
            self.report.kept_count += 1
            yield pair

    def state_dict(self) -> dict:
        """The de-duplication state of every stateful filter (JSON-serialisable)."""
        return {
            f.name: f.state_dict()
            for f in self.filters
            if hasattr(f, "state_dict") and hasattr(f, "accept")
        }

    def load_state_dict(self, state: dict) -> None:
        by_name = {f.name: f for f in self.filters}
        for name, s in state.items():
            if name not in by_name:
                raise KeyError(f"state for filter {name!r}, which this pipeline does not have")
            by_name[name].load_state_dict(s)


def build_filters(data_config, eval_phashes: dict[str, str] | Sequence[str] = ()) -> FilterPipeline:
    """The standard pipeline for a profile's `DataConfig` and the eval set's pHashes."""
    low, high = data_config.aspect_ratio_range
    d = data_config.near_duplicate_max_distance
    return FilterPipeline(
        [
            CaptionTooShort(data_config.min_caption_words, data_config.max_caption_chars),
            BoilerplateDateCaption(),
            NonEnglishCaption(data_config.english_min_confidence),
            AspectRatioOutOfRange(low, high),
            ImageTooSmall(data_config.min_image_side),
            ExactDuplicate(),
            EvalSetOverlap(eval_phashes, max_distance=d),
            NearDuplicate(max_distance=d),
        ]
    )


def min_hamming_distances(query: Sequence[str | int], reference: Sequence[str | int]) -> list[int | None]:
    """For each query hash, the smallest Hamming distance to any reference hash (None if none)."""
    import numpy as np

    if len(reference) == 0:
        return [None] * len(query)
    ref = np.array([phash_int(h) for h in reference], dtype=np.uint64)
    out: list[int | None] = []
    chunk = max(1, 4_000_000 // max(1, len(ref)))
    q_all = [phash_int(h) for h in query]
    for i in range(0, len(q_all), chunk):
        q = np.array(q_all[i : i + chunk], dtype=np.uint64)
        x = q[:, None] ^ ref[None, :]
        if hasattr(np, "bitwise_count"):
            d = np.bitwise_count(x)
        else:  # numpy < 2
            d = np.unpackbits(x.view(np.uint8), axis=-1).reshape(x.shape + (64,)).sum(-1)
        out.extend(int(v) for v in d.min(axis=1))
    return out


__all__ = [
    "AspectRatioOutOfRange",
    "BoilerplateDateCaption",
    "CaptionTooShort",
    "DEFAULT_LANGUAGES",
    "EvalSetOverlap",
    "ExactDuplicate",
    "Filter",
    "FilterPipeline",
    "FilterReport",
    "HammingIndex",
    "ImageTooSmall",
    "NearDuplicate",
    "NonEnglishCaption",
    "build_filters",
    "compute_phash",
    "detect_language",
    "hamming",
    "min_hamming_distances",
    "pair_phash",
]
