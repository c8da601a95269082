"""The generation chain (prior -> dVAE decoder -> reranker): shapes, that
reranking keeps the reranker's best in order, that the unreranked images are the
sampler's own draws, image prompts, caption errors, parts that do not fit; the
swapped-word hard negatives; the caption-match and retrieval figures."""

import random

import pytest
import torch

from dalle_core.demo.captions import random_caption
from dalle_core.demo.scenes import random_scene
from dalle_core.dvae.model import build_dvae, decode_codes
from dalle_core.generation import CaptionError, TextToImage
from dalle_core.prior import DalleTransformer
from dalle_core.prior.sampling import sample_image_codes
from dalle_core.profiles import get_profile
from dalle_core.rerank import ContrastiveReranker
from dalle_core.rerank.evaluate import _derangement, caption_match_rates, retrieval_figures
from dalle_core.rerank.negatives import STOP_WORDS, swapped_word_negatives
from dalle_core.text.bpe import train_bpe_tokenizer

torch.set_num_threads(1)

TINY = get_profile("tiny")
DV = TINY.dvae  # 32x32 -> 8x8 codes of 64


@pytest.fixture(scope="module")
def parts():
    rng = __import__("numpy").random.default_rng(0)
    caps = [random_caption(random_scene(rng, held_out=None), rng) for _ in range(300)]
    tok = train_bpe_tokenizer(caps, TINY.text)
    torch.manual_seed(0)
    prior = DalleTransformer(TINY.prior.replace(init_std=0.08)).eval()
    encoder, decoder = build_dvae(DV)
    reranker = ContrastiveReranker(TINY.reranker).eval()
    return prior, encoder, decoder, tok, reranker


def chain(parts, with_reranker=True):
    prior, encoder, decoder, tok, reranker = parts
    return TextToImage(prior, decoder, tok, reranker=reranker if with_reranker else None, encoder=encoder)


CAPTIONS = ["a red circle above a blue square", "a small green triangle left of a yellow circle"]


def test_generate_shapes_and_reranking_order(parts):
    out = chain(parts).generate(CAPTIONS, n=6, keep=3, seed=1, return_candidates=True)
    assert out.reranked
    assert out.images.shape == (2, 3, 3, 32, 32) and out.images.dtype == torch.float32
    assert out.codes.shape == (2, 3, 8, 8) and out.scores.shape == (2, 3)
    assert out.candidates.shape == (2, 6, 3, 32, 32)
    assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    rr, tok = parts[4], parts[3]
    for b, cap in enumerate(CAPTIONS):
        # independent reference: score every candidate, sort, compare with what was kept
        s = rr.score(out.candidates[b], tok.encode_batch([cap]))
        best = torch.sort(s, descending=True, stable=True)
        assert torch.allclose(out.scores[b], best.values[:3], atol=1e-6)
        assert torch.allclose(out.images[b], out.candidates[b][best.indices[:3]])
        assert (out.scores[b][:-1] >= out.scores[b][1:]).all()


def test_without_reranker_the_first_draws_of_the_sampler(parts):
    prior, _, decoder, tok, _ = parts
    out = chain(parts, with_reranker=False).generate(CAPTIONS, n=4, keep=2, seed=7)
    assert not out.reranked and out.scores is None
    ref = sample_image_codes(prior, tok.encode_batch(CAPTIONS), n_per_caption=4, seed=7).view(2, 4, 8, 8)
    assert torch.equal(out.codes, ref[:, :2])
    assert torch.allclose(out.images[1, 0], decode_codes(decoder, ref[1, :1])[0])
    # same seed, same images; another seed, other images
    again = chain(parts, with_reranker=False).generate(CAPTIONS, n=4, keep=2, seed=7)
    assert torch.equal(again.codes, out.codes)
    other = chain(parts, with_reranker=False).generate(CAPTIONS, n=4, keep=2, seed=8)
    assert not torch.equal(other.codes, out.codes)


def test_image_prompt_keeps_the_top_rows(parts):
    c = chain(parts)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompt = c.image_prompt(image, rows=3)
    assert prompt.shape == (1, 24)
    out = c.generate(CAPTIONS, n=3, keep=2, prompt_codes=prompt, seed=0)
    for b in range(2):
        for k in range(2):
            assert torch.equal(out.codes[b, k, :3].flatten(), prompt[0])
    with pytest.raises(ValueError, match="prompt rows must be in"):
        c.image_prompt(image, rows=8)
    with pytest.raises(ValueError, match="64-pixel|32-pixel"):
        c.image_prompt(torch.rand(1, 3, 64, 64), rows=2)


def test_caption_errors_name_the_cause(parts):
    c = chain(parts)
    with pytest.raises(CaptionError, match="caption 0 is empty"):
        c.generate(["   "], n=2)
    with pytest.raises(CaptionError, match="no captions"):
        c.generate([], n=2)
    long = " ".join(["red circle above blue square"] * 10)
    with pytest.raises(CaptionError, match=r"longer than the prior's text context of 16"):
        c.generate([long], n=2)
    assert c.generate([long], n=1, truncate=True).images.shape[0] == 1
    with pytest.raises(ValueError, match="keep must be"):
        c.generate(CAPTIONS, n=2, keep=3)


def test_parts_that_do_not_fit_are_refused(parts):
    prior, encoder, decoder, tok, reranker = parts
    other = DalleTransformer(TINY.prior.replace(image_vocab_size=128)).eval()  # the dVAE has 64
    with pytest.raises(ValueError, match="the prior draws 128 image codes, the dVAE decodes 64"):
        TextToImage(other, decoder, tok)
    small_rr = ContrastiveReranker(TINY.reranker.replace(text_len=8))
    with pytest.raises(ValueError, match="the reranker reads 8 text positions"):
        TextToImage(prior, decoder, tok, reranker=small_rr)


def test_swapped_word_negatives():
    rng = random.Random(0)
    cap = "a large red circle above a small blue square"
    negs = swapped_word_negatives(cap, 50, rng)
    assert len(negs) == 50 and len(set(negs)) > 5
    for n in negs:
        assert n != cap and sorted(n.split()) == sorted(cap.split())
        # stop words never move
        assert [w for w in n.split() if w in STOP_WORDS] == [w for w in cap.split() if w in STOP_WORDS]
        assert [i for i, w in enumerate(n.split()) if w in STOP_WORDS] == \
               [i for i, w in enumerate(cap.split()) if w in STOP_WORDS]
    assert "a large blue circle above a small red square" in negs
    assert swapped_word_negatives("a cat", 2, rng) == ["a cat", "a cat"]  # nothing to swap


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 7, 50):
        for seed in range(5):
            p = _derangement(n, seed)
            assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))


def _solid(rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 8, 8).clone()


def test_caption_match_rates_against_a_hand_count():
    # a checker we can count by hand: the caption names the image's dominant colour
    def check(image, caption):
        r, g, b = image.getpixel((0, 0))
        colour = "red" if r > 128 else "blue" if b > 128 else "green"
        return colour in caption

    red, blue, green = _solid([1, 0, 0]), _solid([0, 0, 1]), _solid([0, 1, 0])
    caps = ["red", "blue", "green"]
    reranked = torch.stack([torch.stack([red, red]), torch.stack([blue, green]), torch.stack([green, green])])
    unranked = torch.stack([torch.stack([blue, red]), torch.stack([green, green]), torch.stack([red, blue])])
    r = caption_match_rates(reranked, unranked, caps, check)
    assert r["caption_match_reranked"] == pytest.approx(5 / 6)
    assert r["caption_match_top1"] == pytest.approx(1.0)
    assert r["caption_match_random"] == pytest.approx(1 / 6)
    # shuffled: every row is checked against another row's colour word
    perm = _derangement(3, 0)
    expect = sum(check(__import__("dalle_core.dvae.evaluate", fromlist=["x"]).tensor_to_image(x), caps[perm[i]])
                 for i in range(3) for x in reranked[i]) / 6
    assert r["caption_match_shuffled"] == pytest.approx(expect)


def test_retrieval_figures_on_a_model_that_reads_colour():
    """A hand-built 'reranker' whose image and text features are the colour
    words: retrieval is perfect, and swapped colours are caught only when the
    features bind colour to position - here they do not, so binding is 1/2."""
    colours = ["red", "green", "blue"]

    class Tok:
        def encode_batch(self, caps):
            return torch.tensor([[float(c in cap.split()) for c in colours] for cap in caps])

    class Model:
        def image_features(self, x):
            return torch.nn.functional.normalize(x.mean((2, 3)), dim=-1)

        def text_features(self, t):
            return torch.nn.functional.normalize(t, dim=-1)

    images = torch.stack([_solid([1, 0, 0]), _solid([0, 1, 0]), _solid([0, 0, 1])])
    caps = ["a red disc", "a green disc", "a blue disc"]
    f = retrieval_figures(Model(), Tok(), images, caps)
    assert f["retrieval_image_to_text"] == 1.0 and f["retrieval_text_to_image"] == 1.0
    assert f["swap_binding"] == pytest.approx(0.5)  # "disc red" scores the same as "red disc"


def test_zero_shot_generation_killed_after_a_chunk_resumes_to_the_same_images(parts, tmp_path):
    """A killed evaluation's rerun reads the finished chunks back and draws only the
    rest; the images equal an uninterrupted run's, and other weights never reuse them."""
    import numpy as np

    from dalle_core.eval.generated import generate_best_images

    caps = CAPTIONS + ["a blue square below an orange circle", "a purple circle above a red triangle"]
    c = chain(parts)
    straight = generate_best_images(c, caps, candidates=3, chunk_size=2, seed=5)

    class Killed(Exception):
        pass

    def die_after_first_chunk(done, total, from_disk):
        raise Killed

    with pytest.raises(Killed):
        generate_best_images(c, caps, 3, 2, 5, cache_dir=tmp_path, progress=die_after_first_chunk)
    assert len(list(tmp_path.glob("chunk-*.npz"))) == 1

    calls, flags = [], []
    real = c.generate
    c.generate = lambda chunk, **kw: calls.append(list(chunk)) or real(chunk, **kw)
    resumed = generate_best_images(c, caps, 3, 2, 5, cache_dir=tmp_path,
                                   progress=lambda d, t, disk: flags.append(disk))
    assert flags == [True, False] and calls == [caps[2:]]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(straight, resumed))
    assert len(resumed) == len(caps)

    # a half-written or damaged chunk is drawn again, not read
    for p in tmp_path.glob("chunk-*.npz"):
        p.write_bytes(b"not a npz")
    flags.clear()
    generate_best_images(c, caps, 3, 2, 5, cache_dir=tmp_path, progress=lambda d, t, disk: flags.append(disk))
    assert flags == [False, False]

    # another prior (any changed weight) never reads this prior's chunks
    prior, encoder, decoder, tok, reranker = parts
    other = TextToImage(DalleTransformer(prior.config).eval(), decoder, tok, reranker=reranker)
    flags.clear()
    generate_best_images(other, caps[:2], 3, 2, 5, cache_dir=tmp_path, progress=lambda d, t, disk: flags.append(disk))
    assert flags == [False]


def test_judged_chunks_keep_first_draw_pick_and_judgements_and_resume_to_the_same(parts, tmp_path):
    """A chunk keeps the first draw, the reranker's pick and (with a judge) every candidate's
    judgements; read back after a kill they equal an uninterrupted run's. A chunk written
    without judgements is never read as one with them, nor one judged by another judge."""
    import numpy as np

    from dalle_core.demo.checker import check_image
    from dalle_core.eval.caption_match import caption_match_figures
    from dalle_core.eval.generated import generate_best_images, generate_judged

    caps = ["a red circle above a blue square", "a small green triangle to the left of a yellow circle",
            "a blue square below an orange circle"]
    c = chain(parts)
    straight = generate_judged(c, caps, 4, 2, 5, judge=check_image)
    assert len(straight.best) == len(straight.first) == 3 and straight.picked.shape == (3,)
    j = straight.judgements
    assert j.match.shape == (3, 4) and j.sizes_stated[1].all() and not j.sizes_stated[0].any()  # "a small green ..."
    # the pick and the first draw are what the chain itself gives for those seeds
    for start in (0, 2):
        out = c.generate(caps[start:start + 2], n=4, keep=1, seed=5 + start, return_candidates=True, batch_size=None)
        for i in range(out.candidates.shape[0]):
            k = start + i
            as_uint8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(np.asarray(straight.first[k]), as_uint8(out.candidates[i, 0]))
            assert np.array_equal(np.asarray(straight.best[k]), as_uint8(out.candidates[i, straight.picked[k]]))
            assert np.array_equal(np.asarray(straight.best[k]), as_uint8(out.images[i, 0]))
            assert [bool(check_image(__import__("PIL.Image", fromlist=["x"]).fromarray(as_uint8(x)), caps[k]).match)
                    for x in out.candidates[i]] == j.match[k].tolist()
    # the best images are those of generate_best_images (same seeds, judge or not)
    plain = generate_best_images(c, caps, 4, 2, 5)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, straight.best))

    class Killed(Exception):
        pass

    def die_after_first_chunk(done, total, from_disk):
        raise Killed

    with pytest.raises(Killed):
        generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, progress=die_after_first_chunk, judge=check_image)
    flags = []
    resumed = generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, judge=check_image,
                              progress=lambda d, t, disk: flags.append(disk))
    assert flags == [True, False]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(straight.first, resumed.first))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(straight.best, resumed.best))
    assert np.array_equal(straight.picked, resumed.picked)
    for f in ("match", "colours", "shapes", "relation", "sizes", "sizes_stated", "picked"):
        assert np.array_equal(getattr(straight.judgements, f), getattr(resumed.judgements, f)), f
    assert caption_match_figures(resumed.judgements) == caption_match_figures(straight.judgements)
    flags.clear()
    again = generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, judge=check_image,
                            progress=lambda d, t, disk: flags.append(disk))
    assert flags == [True, True] and caption_match_figures(again.judgements) == caption_match_figures(j)

    # written without judgements: a judged read draws again (other key); so does another judge
    for d in tmp_path.glob("chunk-*.npz"):
        d.unlink()
    flags.clear()
    generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, progress=lambda d, t, disk: flags.append(disk))
    generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, judge=check_image,
                    progress=lambda d, t, disk: flags.append(disk))
    generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, judge=check_image, judge_name="another checker",
                    progress=lambda d, t, disk: flags.append(disk))
    assert flags == [False] * 6
    # a chunk that lost its judgements (same key) is drawn again, not read as judged
    from dalle_core.eval.features import read_npz, write_npz_atomic

    for p in tmp_path.glob("chunk-*.npz"):
        arrays = read_npz(p)
        if "judged_match" in arrays:
            write_npz_atomic(p, **{k: v for k, v in arrays.items() if k != "judged_sizes"})
    flags.clear()
    generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, judge=check_image, judge_name="another checker",
                    progress=lambda d, t, disk: flags.append(disk))
    assert flags == [False, False]


def test_zero_shot_generation_draws_at_the_sampling_it_is_given(parts, tmp_path):
    """`generate_judged(sampling=...)` draws what `TextToImage.generate` draws at that
    temperature; chunks drawn at the paper's sampling keep the keys they had before
    SamplingConfig existed, and chunks of another temperature are never reused for it."""
    import numpy as np

    from dalle_core.eval.generated import _chunk_key, generate_judged
    from dalle_core.prior.config import SamplingConfig

    caps = ["a red circle above a blue square", "a blue square below an orange circle"]
    c = chain(parts)
    cool = SamplingConfig(temperature=0.5)
    got = generate_judged(c, caps, 4, 2, 5, sampling=cool)
    out = c.generate(caps, n=4, keep=1, seed=5, temperature=0.5, return_candidates=True, batch_size=None)
    as_uint8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    for i in range(2):
        assert np.array_equal(np.asarray(got.first[i]), as_uint8(out.candidates[i, 0]))
    paper = generate_judged(c, caps, 4, 2, 5)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(paper.first, got.first))
    # keys: the paper's sampling adds nothing (the formula before SamplingConfig), another one does
    old = __import__("hashlib").sha256("\n".join(["d", "4", "5", __import__("dalle_core.eval.generated", fromlist=["x"]).CHUNK_FORMAT,
                                                  "judge=", *caps]).encode()).hexdigest()
    assert _chunk_key("d", caps, 4, 5) == _chunk_key("d", caps, 4, 5, "", SamplingConfig()) == f"chunk-{old[:24]}.npz"
    assert _chunk_key("d", caps, 4, 5, "", cool) != _chunk_key("d", caps, 4, 5)
    # a cache filled at temperature 1 is not read back at 0.5
    generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path)
    flags = []
    again = generate_judged(c, caps, 4, 2, 5, cache_dir=tmp_path, sampling=cool,
                            progress=lambda d, t, disk: flags.append(disk))
    assert flags == [False] and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again.first, got.first))
