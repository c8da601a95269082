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


def negatives_for_batch(captions: Sequence[str], k: int, rng: random.Random) -> list[list[str]]:
    """``k`` swapped-word negatives for each caption of a batch."""
    return [swapped_word_negatives(c, k, rng) for c in captions]


__all__ = ["STOP_WORDS", "negatives_for_batch", "swapped_word_negatives"]
