"""Hard-negative captions made by swapping two words of the true caption.

A contrastive model trained only on in-batch negatives learns a bag of words:
"a red circle above a blue square" and "a blue circle above a red square" get
the same score, which is useless for reranking samples of exactly such captions.
NegCLIP (Yuksekgonul et al., 2023, "When and why vision-language models behave
like bags-of-words") fixes this by adding, for every caption, versions with
words swapped as extra negatives; we do the same without a part-of-speech
tagger: two different content words (not in a short stop list, not equal)
change places. Every negative has the same words as its caption, so the only
way to tell them apart is the binding of the words to the image.

The binding negatives (`typed_swap_negatives`, `binding_negatives`)
-------------------------------------------------------------------
A random pair of content words is rarely the pair that binding hinges on: in
"a picture of a small red circle to the left of a large blue square" only 4 of
the 28 pairs exchange two attributes of the same kind, and most swaps
("picture" <-> "red") are nonsense that a bag of words already rejects. The
typed swaps exchange two words of one small closed class (`WORD_CLASSES`:
colour words, size words, shape nouns) or reverse one relation phrase
(`OPPOSITE_RELATIONS`: "to the left of" <-> "to the right of", "above" <->
"below", ...), so the result is fluent and says something else about the same
things. The classes are lists of English words, not the demo world's
vocabulary: they work on any caption, and a caption with none of them has no
typed negative (`binding_negatives` then falls back to the generic swap).
After a swap the article before a moved word follows it ("an orange circle ...
a red square" -> "a red circle ... an orange square"): otherwise "an red" would
give the negative away without looking at the image.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Function words: swapping them makes ungrammatical text that is easy to reject
# (a wasted negative), so they stay in place.
STOP_WORDS = frozenset("""
a an the of to and or in on at by for with from is are was were be it its this that these those
as into onto over under than then there here very some any no not
""".split())


def _content_positions(words: list[str]) -> list[int]:
    return [i for i, w in enumerate(words) if w.lower().strip(".,;:!?") not in STOP_WORDS]


def swapped_word_negatives(caption: str, k: int, rng: random.Random) -> list[str]:
    """``k`` captions, each the caption with two different content words swapped
    (drawn with ``rng``). A caption with fewer than two different content words
    has no such negative: its own text is returned (it then only adds a
    duplicate positive-looking column, which the loss tolerates)."""
    words = caption.split()
    pos = _content_positions(words)
    pairs = [(i, j) for a, i in enumerate(pos) for j in pos[a + 1:] if words[i].lower() != words[j].lower()]
    out = []
    for _ in range(k):
        if not pairs:
            out.append(caption)
            continue
        i, j = pairs[rng.randrange(len(pairs))]
        w = list(words)
        w[i], w[j] = w[j], w[i]
        out.append(" ".join(w))
    return out


def negatives_for_batch(captions: Sequence[str], k: int, rng: random.Random,
                        binding: float = 0.0) -> list[list[str]]:
    """``k`` negatives for each caption of a batch: swapped-word negatives, or with
    ``binding`` > 0 that share of them binding negatives (`binding_negatives`)."""
    if binding <= 0:
        return [swapped_word_negatives(c, k, rng) for c in captions]
    return [binding_negatives(c, k, rng, binding) for c in captions]


# --- the binding negatives ----------------------------------------------------------------------------

# Closed classes of attribute words: two words of one class swapped keep the caption
# fluent and change what it says about each thing. Plain English word lists (any
# caption), lower case; multi-word colours ("light grey") swap by their last word.
WORD_CLASSES: dict[str, frozenset[str]] = {
    "colour": frozenset("""red orange yellow green blue purple violet pink brown black white grey gray
                           gold silver beige turquoise cyan magenta""".split()),
    "size": frozenset("small large big tiny little huge short tall long wide narrow".split()),
    "shape": frozenset("""circle square triangle rectangle oval star diamond hexagon pentagon heart
                          cross ring cube sphere cone cylinder pyramid""".split()),
}
# Relation phrases and their reversals (both directions; the longest match wins).
_RELATION_PAIRS = (("to the left of", "to the right of"), ("on the left of", "on the right of"),
                   ("above", "below"), ("over", "under"), ("on top of", "underneath"),
                   ("in front of", "behind"), ("inside", "outside"), ("bigger than", "smaller than"),
                   ("larger than", "smaller than"))
OPPOSITE_RELATIONS: dict[str, str] = {}
for _x, _y in _RELATION_PAIRS:
    OPPOSITE_RELATIONS.setdefault(_x, _y)
    OPPOSITE_RELATIONS.setdefault(_y, _x)
BINDING_KINDS = (*WORD_CLASSES, "relation")  # colour, size, shape, relation
_VOWELS = tuple("aeiou")


def _bare(word: str) -> str:
    return word.lower().strip(".,;:!?\"'()")


def _with_case(new: str, old: str) -> str:
    """`new` in the case pattern of `old`, keeping old's surrounding punctuation."""
    core = old.strip(".,;:!?\"'()")
    start = old.find(core) if core else 0
    if core[:1].isupper():
        new = new[:1].upper() + new[1:]
    return old[:start] + new + old[start + len(core):]


def _fix_articles(words: list[str], moved: Sequence[int]) -> None:
    """Set "a" / "an" before each moved word by its first letter (in place)."""
    for p in moved:
        if p > 0 and _bare(words[p - 1]) in ("a", "an"):
            art = "an" if _bare(words[p]).startswith(_VOWELS) else "a"
            words[p - 1] = _with_case(art, words[p - 1])


def _relation_spans(words: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, phrase) of every relation phrase, longest first, not overlapping."""
    bare = [_bare(w) for w in words]
    taken = [False] * len(words)
    spans = []
    for phrase in sorted(OPPOSITE_RELATIONS, key=lambda p: (-len(p.split()), p)):
        parts = phrase.split()
        n = len(parts)
        for i in range(len(words) - n + 1):
            if bare[i:i + n] == parts and not any(taken[i:i + n]):
                spans.append((i, i + n, phrase))
                for j in range(i, i + n):
                    taken[j] = True
    return sorted(spans)


def typed_swap(caption: str, kind: str, rng: random.Random | None = None) -> str | None:
    """The caption with two different words of one class (``kind`` in `WORD_CLASSES`)
    swapped, or one relation phrase reversed (``kind="relation"``); None if it has no
    such pair. With more than one candidate ``rng`` picks one; without it, the first
    (the first class word with the next different one: in "an orange circle above a
    red triangle on a light grey background" orange and red, not the background)."""
    words = caption.split()
    if kind == "relation":
        spans = _relation_spans(words)
        if not spans:
            return None
        i, j, phrase = spans[rng.randrange(len(spans))] if rng is not None and len(spans) > 1 else spans[0]
        new = OPPOSITE_RELATIONS[phrase].split()
        new[0] = _with_case(new[0], words[i])
        new[-1] = _with_case(new[-1], words[j - 1])
        return " ".join(words[:i] + new + words[j:])
    if kind not in WORD_CLASSES:
        raise ValueError(f"unknown binding kind {kind!r}: choose one of {', '.join(BINDING_KINDS)}")
    cls = WORD_CLASSES[kind]
    pos = [i for i, w in enumerate(words) if _bare(w) in cls]
    pairs = [(i, j) for a, i in enumerate(pos) for j in pos[a + 1:] if _bare(words[i]) != _bare(words[j])]
    if not pairs:
        return None
    i, j = pairs[rng.randrange(len(pairs))] if rng is not None and len(pairs) > 1 else pairs[0]
    w = list(words)
    wi, wj = _bare(words[i]), _bare(words[j])
    w[i], w[j] = _with_case(wj, words[i]), _with_case(wi, words[j])
    _fix_articles(w, (i, j))
    return " ".join(w)


def typed_swap_negatives(caption: str, rng: random.Random | None = None) -> dict[str, str]:
    """{kind: negative} for every binding kind the caption allows (one negative each;
    the first pair of each kind unless ``rng`` draws one)."""
    out = {}
    for kind in BINDING_KINDS:
        neg = typed_swap(caption, kind, rng)
        if neg is not None and neg != caption:
            out[kind] = neg
    return out


def binding_negatives(caption: str, k: int, rng: random.Random, share: float = 1.0) -> list[str]:
    """``k`` negatives: each, with probability ``share``, a binding negative (a kind
    drawn uniformly among those the caption allows), else - or when the caption has
    no typed pair - a generic swapped-word negative."""
    kinds = [kind for kind in BINDING_KINDS if typed_swap(caption, kind) is not None]
    out = []
    for _ in range(k):
        neg = None
        if kinds and rng.random() < share:
            neg = typed_swap(caption, kinds[rng.randrange(len(kinds))], rng)
        out.append(neg if neg is not None else swapped_word_negatives(caption, 1, rng)[0])
    return out


# --- mirrored pairs -----------------------------------------------------------------------------------

# Relation phrases a mirror image reverses: flipped left-right, "a to the left of b"
# shows "a to the right of b"; flipped upside down, "a above b" shows "a below b".
MIRROR_RELATIONS: dict[str, dict[str, str]] = {
    "horizontal": {"to the left of": "to the right of", "on the left of": "on the right of"},
    "vertical": {"above": "below", "over": "under", "on top of": "underneath"},
}
for _table in MIRROR_RELATIONS.values():
    _table.update({v: k for k, v in list(_table.items())})


def mirrored_caption(caption: str) -> tuple[str, str] | None:
    """(axis, caption of the mirror image) for a caption with a relation phrase that a
    mirror reverses (`MIRROR_RELATIONS`: "horizontal" flips left-right, "vertical"
    upside down; left-right first), else None. Every such phrase is reversed."""
    words = caption.split()
    spans = _relation_spans(words)
    for axis, table in MIRROR_RELATIONS.items():
        mine = [(i, j, ph) for i, j, ph in spans if ph in table]
        if not mine:
            continue
        out, last = [], 0
        for i, j, ph in mine:
            new = table[ph].split()
            new[0] = _with_case(new[0], words[i])
            new[-1] = _with_case(new[-1], words[j - 1])
            out += words[last:i] + new
            last = j
        return axis, " ".join(out + words[last:])
    return None


def with_mirrored_pairs(images, captions: Sequence[str], limit: int | None = None):
    """The batch (images float [b, 3, H, W], captions) followed by the mirror image of
    each pair whose caption has a mirrored form (`mirrored_caption`; at most `limit`):
    the image flipped along the axis, the caption with its relation reversed. In one
    contrastive batch the two pairs hold the same things in opposite places, so only
    where each thing is tells them apart - on the image side as well as the text side.
    Returns (images [b + m, 3, H, W], captions (b + m))."""
    import torch

    extra_x, extra_c = [], []
    for i, c in enumerate(captions):
        if limit is not None and len(extra_c) >= limit:
            break
        m = mirrored_caption(c)
        if m is None:
            continue
        axis, mc = m
        extra_x.append(torch.flip(images[i], dims=[2 if axis == "horizontal" else 1]))
        extra_c.append(mc)
    if not extra_c:
        return images, list(captions)
    return torch.cat([images, torch.stack(extra_x)]), list(captions) + extra_c


def training_batch(images, captions: Sequence[str], tokenizer, config, rng: random.Random,
                   negatives_dropout: bool = True):
    """One training batch of the reranker as `train_reranker` takes it, from a batch of
    (images float [b, 3, H, W], captions) and a `RerankerConfig`: ``config.mirrored_pairs``
    mirror images added (`with_mirrored_pairs`), captions encoded with BPE dropout, and
    ``config.hard_negatives`` negatives per caption (``config.binding_negatives`` of them
    typed swaps). The negatives get BPE dropout too: encoded without it, a caption split
    into its whole words would tell a negative from the (dropped-out) true caption without
    looking at the image. Returns (images, text) or (images, text, negatives [b', K, L])."""
    if config.mirrored_pairs:
        images, captions = with_mirrored_pairs(images, captions, limit=config.mirrored_pairs)
    text = tokenizer.encode_batch(list(captions), dropout=True, rng=rng)
    k = config.hard_negatives
    if not k:
        return images, text
    negs = negatives_for_batch(captions, k, rng, binding=config.binding_negatives)
    flat = [n for row in negs for n in row]
    ids = tokenizer.encode_batch(flat, dropout=True, rng=rng) if negatives_dropout else tokenizer.encode_batch(flat)
    return images, text, ids.view(len(captions), k, -1)


__all__ = ["BINDING_KINDS", "MIRROR_RELATIONS", "OPPOSITE_RELATIONS", "STOP_WORDS", "WORD_CLASSES",
           "binding_negatives", "mirrored_caption", "negatives_for_batch", "swapped_word_negatives",
           "training_batch", "typed_swap", "typed_swap_negatives", "with_mirrored_pairs"]
