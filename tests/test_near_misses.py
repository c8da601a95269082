"""Near misses of the demo world's evaluation images (`dalle_core.demo.near_misses`) and the
reranker's pick among them (`dalle_core.rerank.evaluate.near_miss_pick`)."""

import math

import pytest
import torch
from PIL import Image

from dalle_core.demo.checker import check_image
from dalle_core.demo.near_misses import near_miss_scenes, near_miss_sets
from dalle_core.demo.scenes import parse_caption
from dalle_core.demo.world import DemoWorld
from dalle_core.profiles import get_profile
from dalle_core.rerank.evaluate import near_miss_figures, near_miss_pick


def test_each_set_is_the_image_then_renders_that_the_checker_rejects():
    """Judged by the world's own checker: the first image of every set matches its
    caption, none of the 7 others does; they share the layout seed and size."""
    items = DemoWorld.from_data_config(get_profile("tiny").data).eval_items()
    sets = near_miss_sets(items, n=8)
    assert len(sets) == len(items) and all(len(g) == 8 for g in sets)
    def shows(image, caption) -> bool:  # everything the caption says, its sizes included
        r, spec = check_image(image, caption), parse_caption(caption)
        return r.match and (r.sizes or (spec.size_a, spec.size_b) == (None, None))

    for item, group in zip(items, sets):
        assert group[0] == item
        assert shows(group[0].image(), item.caption)
        for other in group[1:]:
            assert not shows(other.image(), item.caption), (item.caption, other.scene)
        renders = [g for g in group[1:] if g.key.startswith(item.key)]
        assert len(renders) >= 5 and all((g.seed, g.width, g.height) == (item.seed, item.width, item.height)
                                         for g in renders)


def test_near_miss_scenes_change_one_binding_each():
    item = DemoWorld.from_data_config(get_profile("tiny").data).eval_items()[0]
    spec, s = parse_caption(item.caption), item.scene
    scenes = near_miss_scenes(s, spec)
    assert scenes and len(set(scenes)) == len(scenes) and s not in scenes
    for m in scenes:  # background kept; at most the two objects and the relation change
        assert m.background == s.background
    with pytest.raises(ValueError, match="at least 2 items"):
        near_miss_sets([item])


class _ColourModel:
    """A stand-in reranker with known scores: an image's feature is its mean colour, a
    caption's the colour it names (ids: 0 red, 1 green, 2 blue); `scale` its inverse
    temperature."""

    def __init__(self, scale: float = 10.0):
        self._scale = scale

    def scale(self) -> torch.Tensor:
        return torch.tensor(self._scale)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=-1)

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.eye(3)[ids[:, 0]]


class _Tok:
    def encode_batch(self, captions):
        return torch.tensor([[{"red": 0, "green": 1, "blue": 2}[c]] for c in captions])


def _solid(rgb):
    return Image.new("RGB", (8, 8), rgb)


def test_near_miss_pick_counts_the_true_image_winning_outright():
    red, green, blue, dark_red = _solid((255, 0, 0)), _solid((0, 255, 0)), _solid((0, 0, 255)), _solid((120, 0, 0))
    sets = [[red, green, blue],        # true image wins
            [green, red, green],       # caption "red": a near miss wins
            [blue, blue, green],       # a tie with the true image counts against it
            [dark_red, green, blue]]   # same direction, lower brightness: wins (cosine)
    captions = ["red", "red", "blue", "red"]
    assert near_miss_pick(_ColourModel(), _Tok(), sets, captions) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="same size"):
        near_miss_pick(_ColourModel(), _Tok(), [[red, green], [red, green, blue]], ["red", "red"])


def test_near_miss_loss_grades_rerankers_the_pick_cannot_tell_apart():
    """Two rerankers that both pick every true image score 1.0 on near_miss_pick (a champion
    there could never be beaten); near_miss_loss, the cross-entropy of that pick under the
    model's own scale, still orders them, and matches a hand computation."""
    red, green, blue = _solid((255, 0, 0)), _solid((0, 255, 0)), _solid((0, 0, 255))
    near_red = _solid((255, 120, 0))  # cosine with "red": 255 / |(255, 120, 0)| = 0.905
    sets, captions = [[red, near_red, blue], [blue, green, red]], ["red", "blue"]
    sure, unsure = near_miss_figures(_ColourModel(20.0), _Tok(), sets, captions), \
        near_miss_figures(_ColourModel(2.0), _Tok(), sets, captions)
    assert sure["near_miss_pick"] == unsure["near_miss_pick"] == 1.0
    assert sure["near_miss_loss"] < unsure["near_miss_loss"]
    cos = 255 / math.hypot(255, 120)

    def ce(s: float) -> float:  # -log softmax of the true image (cosines 1 / cos / 0, then 1 / 0 / 0)
        return (-math.log(math.exp(s) / (math.exp(s) + math.exp(s * cos) + 1))
                - math.log(math.exp(s) / (math.exp(s) + 2))) / 2
    assert sure["near_miss_loss"] == pytest.approx(ce(20.0), rel=1e-5)
    assert unsure["near_miss_loss"] == pytest.approx(ce(2.0), rel=1e-5)
    # a wrong pick made confidently costs more than one made unsurely: confidence is not rewarded
    wrong = [[green, red, blue]]
    assert near_miss_figures(_ColourModel(20.0), _Tok(), wrong, ["red"])["near_miss_loss"] > \
        near_miss_figures(_ColourModel(2.0), _Tok(), wrong, ["red"])["near_miss_loss"]


def test_the_reranker_promotion_rule_falls_back_only_for_unmeasurable_near_miss_figures():
    """Real photos have no near misses: the reranker asset then promotes on retrieval (or on the
    other metrics named), and says so; a misspelt metric is not swallowed by the fallback."""
    from assets.generation import FALLBACK_PROMOTE_ON, RerankerRunConfig, reranker_promotion_rules
    from dalle_core.eval.fairness import check_rules

    demo = {"retrieval_image_to_text": 0.3, "swap_binding": 0.7, "near_miss_pick": 0.2, "near_miss_loss": 1.5}
    photos = {k: v for k, v in demo.items() if not k.startswith("near_miss")}
    default = RerankerRunConfig().promote_on
    assert default == {"near_miss_loss": "lower"}
    assert reranker_promotion_rules(default, demo) == ({"near_miss_loss": "lower"}, "")
    rules, note = reranker_promotion_rules(default, photos)
    assert rules == FALLBACK_PROMOTE_ON and "not measurable" in note and "retrieval_image_to_text" in note
    rules, _ = reranker_promotion_rules({"near_miss_pick": "higher", "swap_binding": "higher"}, photos)
    assert rules == {"swap_binding": "higher"}
    rules, note = reranker_promotion_rules({"swap_bindng": "higher"}, photos)
    assert rules == {"swap_bindng": "higher"} and note == ""
    with pytest.raises(ValueError, match="'swap_bindng' was not computed"):
        check_rules(rules, photos)
