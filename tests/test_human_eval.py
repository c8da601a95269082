"""Human evaluation: Wilson intervals and majority-of-5 aggregation, the raters' app against a
real uvicorn server with many concurrent raters, the CLI, the report asset and its sensor."""

import argparse
import contextlib
import json
import random
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import func, select

from dalle_core.eval.human import aggregate_votes, majority, wilson_interval
from dalle_core.eval.human_db import Assignment, Item, VoteRow, model_votes, sessions
from orchestration.human_eval.study import ItemSpec, create_study, write_tokens
from services import free_port

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- statistics

def test_wilson_matches_scipy():
    from scipy.stats import binomtest, norm

    z = norm.ppf(0.975)
    for n in (1, 2, 5, 10, 30, 200, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            low, high = wilson_interval(k, n, z)
            assert low == pytest.approx(ref.low, abs=1e-12) and high == pytest.approx(ref.high, abs=1e-12), (k, n)
    ref = binomtest(27, 30).proportion_ci(confidence_level=0.99, method="wilson")  # the paper's 90% realism
    assert wilson_interval(27, 30, norm.ppf(0.995)) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_majority_and_ties():
    assert majority(list("AABBA")) == "A" and majority(list("BBBAA")) == "B"
    assert majority(list("AABB")) is None
    with pytest.raises(ValueError, match="'C'"):
        majority(["A", "C"])


def _votes(item, realism, caption_match):
    return [{"item": item, "rater": r, "realism": a, "caption_match": b}
            for r, (a, b) in enumerate(zip(realism, caption_match))]


def test_aggregate_majority_of_five():
    votes = (_votes(1, "AAAAB", "BBBAA") + _votes(2, "AAABB", "AAAAA") + _votes(3, "ABBBB", "AAABB")
             + _votes(4, "AA", "BB"))  # item 4: 2 of 5 votes, pending
    r = aggregate_votes(votes)
    assert (r["items"], r["items_complete"], r["items_pending"]) == (4, 3, 1)
    assert (r["realism"]["wins_a"], r["realism"]["wins_b"], r["realism"]["n"]) == (2, 1, 3)
    assert r["realism"]["pref_a"] == pytest.approx(2 / 3)
    assert (r["realism"]["ci_low"], r["realism"]["ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert r["caption_match"]["wins_a"] == 2 and r["caption_match"]["votes_a"] == 2 + 5 + 3
    assert r["realism"]["votes"] == 15


def test_aggregate_ties_count_as_no_preference_and_errors_name_the_item():
    r = aggregate_votes(_votes(1, "AABB", "AAAB") + _votes(2, "AAAB", "BBBA"), raters_per_item=4)
    assert (r["realism"]["wins_a"], r["realism"]["ties"], r["realism"]["pref_a"]) == (1, 1, 0.5)
    assert r["realism"]["pref_a"] + r["realism"]["pref_b"] + r["realism"]["ties"] / 2 == 1
    with pytest.raises(ValueError, match="item 7: rater 0 voted twice"):
        aggregate_votes(_votes(7, "A", "A") * 2)
    with pytest.raises(ValueError, match="item 8 has 6 votes"):
        aggregate_votes(_votes(8, "AAAAAA", "AAAAAA"))
    with pytest.raises(ValueError, match="realism must be"):
        aggregate_votes(_votes(9, "X", "A"))


# ---------------------------------------------------------------- helpers shared with the browser test

def write_images(root: Path, n_items: int) -> list[ItemSpec]:
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_items):
        for m, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
            Image.new("RGB", (32, 32), colour).save(root / f"{i:03d}-{m}.png")
        items.append(ItemSpec(f"a small red circle number {i}", f"{i:03d}-a.png", f"{i:03d}-b.png"))
    return items


def make_study(tmp_path: Path, n_items: int, n_raters: int, db_url: str | None = None, seed: int = 0):
    url = db_url or f"sqlite:///{tmp_path / 'he.db'}"
    factory = sessions(url)
    images = tmp_path / "images"
    items = write_images(images, n_items)
    study_id, tokens = create_study(factory, "test", items, model_a="dalle", model_b="dfgan", raters=n_raters,
                                    seed=seed, image_root=images)
    return url, factory, images, study_id, [t for _, t in tokens]


@contextlib.contextmanager
def serve(app):
    """A real uvicorn server on a free loopback port, in a thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def postgres_server():
    """A real PostgreSQL on loopback, started by scripts/pg-test-server.sh."""
    # missing binaries or a server that does not start: fails under CI=true, skips otherwise
    from services import require_module, require_service

    require_module("psycopg", "psycopg is not installed")
    d = tempfile.mkdtemp(prefix="dalle-pg-")  # under /tmp: as root the server runs as `postgres`, which must reach it
    port = free_port()
    script = ROOT / "scripts" / "pg-test-server.sh"
    started = subprocess.run([str(script), "start", d, str(port)], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        log = "".join(p.read_text()[-500:] for p in Path(d).glob("*.log"))
        shutil.rmtree(d, ignore_errors=True)
        require_service(f"could not start PostgreSQL: {started.stderr.strip()} {log}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([str(script), "stop", d], capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'he.db'}"
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"human_eval_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.replace("+psycopg", "") + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


# ---------------------------------------------------------------- the app

def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_study_assignment_is_balanced_and_sides_randomised(tmp_path):
    _, factory, _, study_id, tokens = make_study(tmp_path, 31, 12)
    with factory() as s:
        per_item = s.execute(select(Assignment.item_id, func.count()).group_by(Assignment.item_id)).all()
        per_rater = [n for _, n in s.execute(select(Assignment.rater_id, func.count()).group_by(Assignment.rater_id))]
        swapped = s.scalars(select(Item.swapped)).all()
    assert len(per_item) == 31 and all(n == 5 for _, n in per_item)
    assert len(per_rater) == 12 and max(per_rater) - min(per_rater) <= 1 and sum(per_rater) == 155
    assert 5 < sum(swapped) < 26  # about half shown with model B on the left
    with pytest.raises(ValueError, match="5 distinct raters"):
        make_study(tmp_path / "few", 3, 4)


def test_tokens_file_is_private_and_tokens_are_not_stored(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("old")
    path.chmod(0o644)
    write_tokens(path, ["rater-01"], ["x" * 32])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "rater-01 " + "x" * 32 + "\n"
    url, *_, tokens = make_study(tmp_path / "s", 2, 5)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "s").glob("he.db*"))
    assert raw and not any(t.encode() in raw for t in tokens)


def test_concurrent_raters_every_vote_stored_once(tmp_path, db_url):
    from orchestration.human_eval.app import create_app

    n_items, n_raters = 30, 20
    url, factory, images, study_id, tokens = make_study(tmp_path, n_items, n_raters, db_url)
    with factory() as s:
        swapped = dict(s.execute(select(Item.id, Item.swapped)).all())
    submissions = {"dupes": 0}

    def rate(token: str) -> int:
        # votes realism for model A's image (the rater "knows" the sides) and caption match for the left one
        n = 0
        with httpx.Client(base_url=base, headers=_auth(token), timeout=60) as c:
            while True:
                d = c.get("/api/next").raise_for_status().json()
                if d["item_id"] is None:
                    return n
                assert c.get(d["image_a"]).status_code == 200
                body = {"item_id": d["item_id"], "realism": "B" if swapped[d["item_id"]] else "A",
                        "caption_match": "A"}
                copies = 3 if d["item_id"] % 4 == 0 else 1  # double clicks, sent at once
                with ThreadPoolExecutor(copies) as pool:
                    rs = list(pool.map(lambda _: c.post("/api/vote", json=body), range(copies)))
                assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
                assert sum(r.json()["stored"] for r in rs) == 1
                submissions["dupes"] += copies - 1
                n += 1

    with serve(create_app(url, images)) as base:
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:  # bounded: 20 raters, 8 at a time plus their double clicks
            done = list(pool.map(rate, tokens))
        elapsed = time.monotonic() - t0
        progress = httpx.get(f"{base}/api/progress", headers=_auth(tokens[0])).json()
    assert sum(done) == n_items * 5 and submissions["dupes"] > 0
    with factory() as s:
        votes = s.execute(select(VoteRow.rater_id, VoteRow.item_id)).all()
        assigned = set(s.execute(select(Assignment.rater_id, Assignment.item_id)).all())
        result = aggregate_votes(model_votes(s, study_id))
    assert len(votes) == len(set(votes)) == n_items * 5 and set(votes) == assigned
    assert progress["study"] == {"study": "test", "items": n_items, "items_complete": n_items,
                                 "votes": n_items * 5, "votes_expected": n_items * 5}
    assert result["realism"]["pref_a"] == 1.0  # every rater chose model A's image, on either side
    assert result["caption_match"]["wins_a"] == sum(not v for v in swapped.values())  # left = model A unless swapped
    print(f"{n_items * 5} votes from {n_raters} raters in {elapsed:.1f}s")


def test_refusals(tmp_path):
    from orchestration.human_eval.app import create_app

    url, factory, images, _, tokens = make_study(tmp_path, 6, 5 + 1)
    with factory() as s:
        mine = set(s.scalars(select(Assignment.item_id).where(Assignment.rater_id == 1)))
        other = next(i for i in s.scalars(select(Item.id)) if i not in mine)
    item = min(mine)
    with serve(create_app(url, images)) as base, httpx.Client(base_url=base) as c:
        good = {"item_id": item, "realism": "A", "caption_match": "B"}
        for path in ("/api/next", "/api/progress", f"/images/{item}/A"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers=_auth("not-a-token-" * 3)).status_code == 401
        assert c.post("/api/vote", json=good).status_code == 401
        r = c.post("/api/vote", json=good, headers={"Authorization": "Basic abc"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        h = _auth(tokens[0])
        assert c.post("/api/vote", json={**good, "item_id": other}, headers=h).status_code == 403
        assert c.get(f"/images/{other}/A", headers=h).status_code == 403
        assert c.post("/api/vote", json={**good, "item_id": 10**6}, headers=h).status_code == 403
        for bad in ({"item_id": item, "realism": "A"}, {**good, "realism": "C"}, {**good, "caption_match": "a"},
                    {**good, "item_id": "x"}, {**good, "extra": 1}, [good], None):
            assert c.post("/api/vote", json=bad, headers=h).status_code == 422, bad
        assert c.post("/api/vote", content=b"{not json", headers={**h, "Content-Type": "application/json"}).status_code == 422
        assert c.get(f"/images/{item}/C", headers=h).status_code == 422
        assert c.post("/api/vote", json=good, headers=h).json()["stored"] is True
        assert c.post("/api/vote", json=good, headers=h).json() | {"progress": None} == {
            "stored": False, "duplicate": True, "progress": None}
        changed = c.post("/api/vote", json={**good, "realism": "B"}, headers=h)
        assert changed.status_code == 409 and "already voted" in changed.json()["detail"]
        # the cookie flow of the page: a wrong token is refused, the right one signs in
        assert c.post("/signin", data={"token": "wrong"}).status_code == 401
        r = c.post("/signin", data={"token": tokens[0]})
        assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
        assert "Which image is more realistic?" in c.get("/").text
        assert c.get("/api/progress").json()["rater"]["done"] == 1  # via the cookie
    with factory() as s:
        rows = s.execute(select(VoteRow.realism, VoteRow.caption_match)).all()
    assert rows == [("A", "B")]


# ---------------------------------------------------------------- CLI, asset, sensor

def _cli(argv):
    from orchestration.human_eval.cli import add_human_eval_parser

    parser = argparse.ArgumentParser(prog="dalle")
    add_human_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _samples_output(root: Path, n: int, keep: int, unreranked: bool) -> None:
    (root / "samples").mkdir(parents=True)
    (root / "samples" / "captions.json").write_text(json.dumps(
        [{"index": i, "caption": f"caption {i}", "scores": [0.5] * keep} for i in range(n)]))
    for i in range(n):
        for k in range(keep):
            Image.new("RGB", (8, 8)).save(root / "samples" / f"{i:03d}-{k:02d}.png")
        if unreranked:
            (root / "samples" / "unreranked").mkdir(exist_ok=True)
            Image.new("RGB", (8, 8)).save(root / "samples" / "unreranked" / f"{i:03d}-00.png")


def test_cli_creates_studies_from_samples_and_items(tmp_path, monkeypatch, capsys):
    from orchestration.human_eval.cli import prepare_study
    from dalle_core.eval.human_db import get_study

    _samples_output(tmp_path / "store", 3, keep=4, unreranked=False)
    db = f"sqlite:///{tmp_path / 'he.db'}"
    args = _cli(["human-eval", "serve", "--db", db, "--from-storage", str(tmp_path / "store"), "--raters", "6",
                 "--tokens-out", str(tmp_path / "tok.txt")])
    url, root = prepare_study(args)
    assert stat.S_IMODE((tmp_path / "tok.txt").stat().st_mode) == 0o600
    assert len((tmp_path / "tok.txt").read_text().split("\n")) == 7
    with sessions(url)() as s:
        st = get_study(s)
        assert (st.model_a, st.model_b) == ("reranked", "reranked-draw-3")
        assert st.items[0].image_model_b == "samples/000-03.png" and root == (tmp_path / "store").resolve()
    with pytest.raises(ValueError, match="already exists"):
        prepare_study(args)
    _samples_output(tmp_path / "store2", 2, keep=1, unreranked=True)
    monkeypatch.setenv("DALLE_HUMAN_EVAL_TOKENS", ",".join(f"token-{i}-{'x' * 16}" for i in range(5)))
    prepare_study(_cli(["human-eval", "serve", "--db", db, "--from-storage", str(tmp_path / "store2"),
                        "--study", "u", "--model-b", "DF-GAN"]))
    assert "DALLE_HUMAN_EVAL_TOKENS" in capsys.readouterr().out
    with sessions(url)() as s:
        st = get_study(s, "u")
        assert (st.model_a, st.model_b, st.items[1].image_model_b) == ("reranked", "DF-GAN", "samples/unreranked/001-00.png")
    monkeypatch.delenv("DALLE_HUMAN_EVAL_TOKENS")
    with pytest.raises(FileNotFoundError, match="items file not found"):
        prepare_study(_cli(["human-eval", "serve", "--db", db, "--items", str(tmp_path / "nope.json")]))
    (tmp_path / "items.json").write_text(json.dumps([{"caption": "x", "image_a": "a.png"}]))
    with pytest.raises(ValueError, match="item 0: missing or empty image_b"):
        prepare_study(_cli(["human-eval", "serve", "--db", db, "--items", str(tmp_path / "items.json")]))
    (tmp_path / "items.json").write_text(json.dumps([{"caption": "x", "image_a": "a.png", "image_b": "b.png"}]))
    with pytest.raises(FileNotFoundError, match="image not found"):
        prepare_study(_cli(["human-eval", "serve", "--db", db, "--items", str(tmp_path / "items.json"), "--study", "v"]))
    with pytest.raises(ValueError, match="no study named"):
        prepare_study(_cli(["human-eval", "serve", "--db", db, "--study", "zzz"]))


def _vote_all(factory, study_id, rng, part=slice(None)):
    """Assignments (a slice of them) answered: realism for model A 80% of the time, caption match at random."""
    with factory.begin() as s:
        rows = s.execute(select(Assignment, Item).join(Item, Item.id == Assignment.item_id)
                         .where(Item.study_id == study_id).order_by(Assignment.id)).all()
        for a, it in rows[part]:
            real = "A" if rng.random() < 0.8 else "B"
            s.add(VoteRow(rater_id=a.rater_id, item_id=a.item_id, realism=it.to_model(real),
                          caption_match=rng.choice("AB")))


def test_status_report_asset_and_sensor(tmp_path, monkeypatch, capsys):
    import dagster as dg
    import mlflow

    from assets.human_eval import human_eval_complete_sensor, human_eval_report
    from orchestration.human_eval.cli import cmd_status
    from assets.resources import MlflowResource

    url, factory, _, study_id, _ = make_study(tmp_path, 20, 7)
    monkeypatch.setenv("DALLE_HUMAN_EVAL_DB", url)
    _vote_all(factory, study_id, random.Random(1), slice(None, -3))  # 3 votes missing: not complete
    skip = human_eval_complete_sensor(dg.build_sensor_context())
    assert isinstance(skip, dg.SkipReason) and "items complete" in skip.skip_message
    assert cmd_status(_cli(["human-eval", "status"])) == 0
    assert "dalle (A) vs dfgan (B)" in capsys.readouterr().out
    _vote_all(factory, study_id, random.Random(2), slice(-3, None))  # the rest
    with factory() as s:
        expected = aggregate_votes(model_votes(s, study_id))
    result = human_eval_complete_sensor(dg.build_sensor_context())
    assert len(result.run_requests) == 1
    assert result.run_requests[0].run_config == {"ops": {"human_eval_report": {"config": {"study": "test"}}}}
    again = human_eval_complete_sensor(dg.build_sensor_context(cursor=result.cursor))
    assert isinstance(again, dg.SkipReason)  # fires once per completion

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = dg.materialize([human_eval_report], resources={"mlflow": MlflowResource(
        tracking_uri=tracking, artifact_root=str(tmp_path / "art"))},
        run_config=result.run_requests[0].run_config)
    meta = res.asset_materializations_for_node("human_eval_report")[0].metadata
    assert meta["realism_pref_a"].value == round(expected["realism"]["pref_a"], 4)
    assert "95% Wilson CI" in meta["result"].value and meta["items"].value.startswith("20 of 20 complete")
    mlflow.set_tracking_uri(tracking)
    run = mlflow.search_runs(experiment_names=["dalle"], output_format="list")[0]
    for q in ("realism", "caption_match"):
        assert run.data.metrics[f"human_eval/{q}_pref_a"] == pytest.approx(expected[q]["pref_a"])
        assert run.data.metrics[f"human_eval/{q}_pref_a_ci_low"] == pytest.approx(expected[q]["ci_low"])
        assert run.data.metrics[f"human_eval/{q}_pref_a_ci_high"] == pytest.approx(expected[q]["ci_high"])
