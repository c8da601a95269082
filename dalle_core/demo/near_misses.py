"""Near misses of an evaluation image: the same layout with one binding broken.

Reranking the prior's samples means picking, among N drawings of one caption,
the one that gets every binding right; the candidates that lose are near
misses (colours swapped between the shapes, the relation reversed, a shape
changed), not unrelated images. A reranker's retrieval figure (its own caption
among all held-out ones) or a single swapped caption does not measure that
choice: on the medium prior's samples a reranker with 900 updates picked a
match for 56% of held-out captions where one with 600 picked 41.5%, while both
scored 0.395 on retrieval (docs/benchmarks.md). `near_miss_sets` renders, for
each evaluation image, itself and up to N - 1 images that differ from it in one
binding only (same size, same random layout seed, same image format): the
true image among them is what a good reranker picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .items import EvalItem
from .scenes import COLOURS, OPPOSITE, SHAPES, CaptionSpec, Scene, SceneObject, parse_caption


def asserts(spec: CaptionSpec, scene: Scene) -> bool:
    """Whether `scene` shows what the caption `spec` says (read either way round:
    "a red circle left of a blue square" is also "a blue square right of a red circle")."""
    def same(a: SceneObject, rel: str, b: SceneObject) -> bool:
        return ((spec.colour_a, spec.shape_a, spec.relation, spec.colour_b, spec.shape_b)
                == (a.colour, a.shape, rel, b.colour, b.shape)
                and spec.size_a in (None, a.size) and spec.size_b in (None, b.size))
    return same(scene.a, scene.relation, scene.b) or same(scene.b, OPPOSITE[scene.relation], scene.a)


def near_miss_scenes(scene: Scene, spec: CaptionSpec) -> list[Scene]:
    """Scenes that differ from `scene` in one binding, in a fixed order (colours swapped,
    shapes swapped, relation reversed, one colour replaced, one shape replaced, sizes
    swapped or changed, both colours replaced), keeping those that no longer match `spec`."""
    a, b, rel, bg = scene.a, scene.b, scene.relation, scene.background
    free = [c for c in COLOURS if c not in (a.colour, b.colour)]
    other_shape = {s: [t for t in SHAPES if t != s] for s in SHAPES}
    flip = {"small": "large", "large": "small"}
    out = [
        Scene(SceneObject(b.colour, a.shape, a.size), rel, SceneObject(a.colour, b.shape, b.size), bg),
        Scene(SceneObject(a.colour, b.shape, a.size), rel, SceneObject(b.colour, a.shape, b.size), bg),
        Scene(a, OPPOSITE[rel], b, bg),
        Scene(SceneObject(free[0], a.shape, a.size), rel, b, bg),
        Scene(a, rel, SceneObject(free[1], b.shape, b.size), bg),
        Scene(SceneObject(a.colour, other_shape[a.shape][0], a.size), rel, b, bg),
        Scene(a, rel, SceneObject(b.colour, other_shape[b.shape][1], b.size), bg),
        Scene(SceneObject(a.colour, a.shape, b.size), rel, SceneObject(b.colour, b.shape, a.size), bg),
        Scene(SceneObject(a.colour, a.shape, flip[a.size]), rel, b, bg),
        Scene(SceneObject(free[2], a.shape, a.size), rel, SceneObject(free[3], b.shape, b.size), bg),
    ]
    return [s for s in out if not asserts(spec, s)]


def near_miss_sets(items: Sequence[EvalItem], n: int = 8) -> list[list[EvalItem]]:
    """For each item: itself first, then n - 1 near misses (`near_miss_scenes`, rendered
    like the item: same size, layout seed and format); where a caption allows fewer, other
    items of `items` that do not match it fill the set. Each set has n items."""
    if n < 2 or len(items) < 2:
        raise ValueError(f"need n >= 2 and at least 2 items, got n={n}, {len(items)} items")
    sets = []
    for i, item in enumerate(items):
        spec = parse_caption(item.caption)
        if spec is None:
            raise ValueError(f"{item.key}: {item.caption!r} is not a demo-world caption")
        group = [item] + [replace(item, scene=s, key=f"{item.key}-near-miss-{k}")
                          for k, s in enumerate(near_miss_scenes(item.scene, spec)[: n - 1])]
        k = 1
        while len(group) < n and k < len(items):
            other = items[(i + k) % len(items)]
            if not asserts(spec, other.scene):
                group.append(other)
            k += 1
        if len(group) < n:
            raise ValueError(f"{item.key}: only {len(group)} non-matching images for a set of {n}")
        sets.append(group)
    return sets


__all__ = ["asserts", "near_miss_scenes", "near_miss_sets"]
