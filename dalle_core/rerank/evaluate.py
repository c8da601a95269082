"""Figures of a reranker on held-out pairs, and caption-match rates of generated images.

`retrieval_figures`: on held-out (image, caption) pairs, how often the model
finds an image's own caption among all held-out captions (and back), and how
often it scores the true caption above the same caption with words swapped:
``swap_binding`` swaps two random content words (often a meaningless swap,
"picture" <-> "red"); ``attribute_binding`` swaps two attribute words of one
kind or reverses the relation (`negatives.typed_swap_negatives`: "red circle,
blue square" vs "blue circle, red square"), the binding that reranking needs.
`attribute_binding_by_kind` splits the latter by kind (colour, size, shape,
relation). `near_miss_pick`: how often the true image wins among its near misses
(the same layout with one binding broken): the choice reranking makes; `near_miss_figures`
adds its graded form, the cross-entropy of that choice.

`caption_match_rates`: for generated images and a checker (the demo world's
`check_image`, or any image x caption -> bool), the share of images that match
their own caption with and without reranking, and the share that match a
*shuffled* caption: generation that ignored its caption would score the same on
both.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from dalle_core.data.loader import image_to_tensor

from .negatives import BINDING_KINDS, swapped_word_negatives, typed_swap_negatives


def _as_tensor(images: Sequence) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else torch.stack(
        [image_to_tensor(im, im.size[0], name=f"held-out image {i}") for i, im in enumerate(images)])


def _wins(s_true: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """1 where the true caption scores higher, 1/2 on a tie, 0 below."""
    return (s_true > s_neg).float() + 0.5 * (s_true == s_neg).float()


def _typed_wins(model, tokenizer, img: torch.Tensor, s_true: torch.Tensor,
                captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """(kind, win) for every binding negative of every caption (`typed_swap_negatives`)."""
    rows, kinds, negs = [], [], []
    for i, c in enumerate(captions):
        for kind, neg in typed_swap_negatives(c).items():
            rows.append(i)
            kinds.append(kind)
            negs.append(neg)
    if not negs:
        return [], torch.zeros(0)
    idx = torch.tensor(rows)
    s_neg = (img[idx] * model.text_features(tokenizer.encode_batch(negs))).sum(-1)
    return kinds, _wins(s_true[idx], s_neg)


@torch.no_grad()
def retrieval_figures(model, tokenizer, images: Sequence, captions: Sequence[str],
                      rng: random.Random | None = None) -> dict[str, float]:
    """{"retrieval_image_to_text", "retrieval_text_to_image", "swap_binding",
    "attribute_binding"} on held-out pairs (PIL images or float [N, 3, H, W]);
    chance levels are 1/N and 1/2 (a swap identical to its caption counts as a
    tie, 1/2). ``attribute_binding`` is the mean over every binding negative of
    every caption (one per kind the caption allows); 1/2 when no caption has any."""
    rng = rng or random.Random(0)
    if len(images) != len(captions) or len(captions) < 2:
        raise ValueError(f"need >= 2 image-caption pairs of equal count, got {len(images)} and {len(captions)}")
    x = _as_tensor(images)
    text = tokenizer.encode_batch(list(captions))
    img = model.image_features(x)
    txt = model.text_features(text)
    sim = img @ txt.t()
    target = torch.arange(len(captions))
    swapped = tokenizer.encode_batch([swapped_word_negatives(c, 1, rng)[0] for c in captions])
    s_true = (img * txt).sum(-1)
    s_swap = (img * model.text_features(swapped)).sum(-1)
    _, typed = _typed_wins(model, tokenizer, img, s_true, captions)
    return {
        "retrieval_image_to_text": float((sim.argmax(1) == target).float().mean()),
        "retrieval_text_to_image": float((sim.argmax(0) == target).float().mean()),
        "swap_binding": float(_wins(s_true, s_swap).mean()),
        "attribute_binding": float(typed.mean()) if len(typed) else 0.5,
    }


@torch.no_grad()
def attribute_binding_by_kind(model, tokenizer, images: Sequence, captions: Sequence[str]) -> dict[str, float]:
    """``attribute_binding_<kind>`` for each kind of `negatives.BINDING_KINDS` that
    some caption allows (colour, size, shape, relation), and ``..._n`` the count."""
    img = model.image_features(_as_tensor(images))
    s_true = (img * model.text_features(tokenizer.encode_batch(list(captions)))).sum(-1)
    kinds, wins = _typed_wins(model, tokenizer, img, s_true, captions)
    out: dict[str, float] = {}
    for kind in BINDING_KINDS:
        sel = [i for i, k in enumerate(kinds) if k == kind]
        if sel:
            out[f"attribute_binding_{kind}"] = float(wins[sel].mean())
            out[f"attribute_binding_{kind}_n"] = len(sel)
    return out


def _near_miss_scores(model, tokenizer, candidate_sets: Sequence[Sequence], captions: Sequence[str]) -> torch.Tensor:
    """Cosine similarities [captions, set size] of each caption with its candidate set."""
    if len(candidate_sets) != len(captions) or not captions:
        raise ValueError(f"{len(candidate_sets)} candidate sets for {len(captions)} captions")
    sizes = {len(c) for c in candidate_sets}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"every caption needs a set of the same size >= 2, got sizes {sorted(sizes)}")
    n = sizes.pop()
    x = torch.cat([_as_tensor(list(c)) for c in candidate_sets])
    img = model.image_features(x).view(len(captions), n, -1)
    txt = model.text_features(tokenizer.encode_batch(list(captions)))
    return (img * txt[:, None, :]).sum(-1)


def _pick(scores: torch.Tensor) -> float:
    # a tie with the true image counts against it (the reranker's sort would have to be lucky)
    return float((scores[:, 0] > scores[:, 1:].max(dim=1).values).float().mean())


@torch.no_grad()
def near_miss_pick(model, tokenizer, candidate_sets: Sequence[Sequence], captions: Sequence[str]) -> float:
    """Share of captions for which the model scores the true image (first of its set)
    above every other image of the set: near misses of it (`dalle_core.demo.near_misses`),
    the choice reranking the prior's samples makes. Chance is 1 / set size; a tie with
    the true image counts against it."""
    return _pick(_near_miss_scores(model, tokenizer, candidate_sets, captions))


@torch.no_grad()
def near_miss_figures(model, tokenizer, candidate_sets: Sequence[Sequence], captions: Sequence[str]) -> dict[str, float]:
    """``near_miss_pick`` (above) and ``near_miss_loss``: the mean cross-entropy of the true
    image among its set under the model's own scale (``model.scale()``, its learnt inverse
    temperature): how surely it picks, graded. The pick saturates: a medium-world reranker
    trained 1,800 updates picked the true image among its near misses for 100% of the
    captions (docs/benchmarks.md, 2026-12-01), and a champion at 100% can never be beaten
    on it; the loss still orders two rerankers that both pick every true image, and, being
    a proper score, is not lowered by confidence where the pick is wrong."""
    scores = _near_miss_scores(model, tokenizer, candidate_sets, captions)
    logits = float(model.scale()) * scores
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(captions), dtype=torch.long))
    return {"near_miss_pick": _pick(scores), "near_miss_loss": float(loss)}


def _derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation with no fixed point (each caption goes to another image)."""
    if n < 2:
        raise ValueError("shuffled captions need at least 2 captions")
    rng = random.Random(seed)
    shift = rng.randrange(1, n)
    order = list(range(n))
    rng.shuffle(order)
    perm = [0] * n
    for i in range(n):  # a random cyclic shift over a random order: no i maps to itself
        perm[order[i]] = order[(i + shift) % n]
    return perm


def caption_match_rates(reranked: torch.Tensor, unranked: torch.Tensor, captions: Sequence[str],
                        check: Callable[[object, str], bool], seed: int = 0) -> dict[str, float]:
    """Match rates of images [B, k, 3, H, W] (one row per caption); `check`
    returns a bool, or the demo world's CheckResult (then ``colour_match_*``
    rates - both colours right - are added):
    ``caption_match_reranked`` (the reranker's best k), ``caption_match_top1``
    (its single best), ``caption_match_random`` (the first k draws: no
    reranking) and ``caption_match_shuffled`` (the reranked images checked
    against another caption's text)."""
    from dalle_core.dvae.evaluate import tensor_to_image

    B = len(captions)
    if reranked.shape[0] != B or unranked.shape[0] != B:
        raise ValueError(f"{B} captions but image rows {reranked.shape[0]} and {unranked.shape[0]}")
    perm = _derangement(B, seed) if B > 1 else None

    out: dict[str, float] = {}

    def rate(name: str, rows: torch.Tensor, caps: Sequence[str]) -> None:
        results = [check(tensor_to_image(x), caps[i]) for i in range(B) for x in rows[i]]
        n = max(1, len(results))
        out[f"caption_match_{name}"] = sum(bool(getattr(r, "match", r)) for r in results) / n
        if results and hasattr(results[0], "colours"):  # partial credit: both colours right
            out[f"colour_match_{name}"] = sum(bool(r.colours) for r in results) / n

    rate("reranked", reranked, captions)
    rate("top1", reranked[:, :1], captions)
    rate("random", unranked, captions)
    if perm is not None:
        rate("shuffled", reranked, [captions[perm[i]] for i in range(B)])
    return out


__all__ = ["attribute_binding_by_kind", "caption_match_rates", "near_miss_figures", "near_miss_pick",
           "retrieval_figures"]
