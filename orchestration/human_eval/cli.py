"""`dalle human-eval serve | status`: run a study's web app, or print its progress and result.

User errors raise ValueError / FileNotFoundError; `dalle` prints them as one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dalle_core.eval.human_db import ENV_DB, default_db_url, get_study, model_votes, sessions, study_progress


def _run_dir(args) -> Path:
    return Path(args.run_dir or os.environ.get("DALLE_RUN_DIR", "runs/demo")).resolve()


def _db_url(args) -> str:
    return args.db or os.environ.get(ENV_DB) or default_db_url(_run_dir(args))


def prepare_study(args, out=None) -> tuple[str, Path]:
    """Create the study asked for (if --items / --from-storage) and issue its tokens; returns (db url, image root)."""
    out = out if out is not None else sys.stdout  # looked up per call: redirected stdout (tests, logs) is honoured
    from orchestration.human_eval import study as st

    url = _db_url(args)
    factory = sessions(url)
    if args.items and args.from_storage:
        raise ValueError("give --items or --from-storage, not both")
    if not (args.items or args.from_storage):  # serve an existing study
        with factory() as s:
            root = args.image_root or get_study(s, args.study).image_root
        if not root:
            raise ValueError("--image-root DIR is needed to serve this study")
        return url, Path(root)
    if args.from_storage:
        from dalle_core.storage import LocalStorage, open_storage

        store = open_storage(args.from_storage)
        items, names = st.items_from_samples(store, draw_b=args.draw_b)
        if isinstance(store, LocalStorage):
            image_root = store.root
        else:  # S3: the app serves local files, so copy the images next to the database
            image_root = _run_dir(args) / "human_eval_images"
            for it in items:
                for key in (it.image_a, it.image_b):
                    store.get_file(key, image_root / key)
    else:
        items, names = st.load_items_file(args.items)
        image_root = Path(args.image_root) if args.image_root else Path(args.items).resolve().parent
    model_a = args.model_a or names.get("model_a", "model A")
    model_b = args.model_b or names.get("model_b", "model B")
    tokens = st.tokens_from_env(args.raters)
    name = args.study or "study-1"
    study_id, issued = st.create_study(factory, name, items, model_a=model_a, model_b=model_b,
                                       raters=args.raters, raters_per_item=args.raters_per_item, seed=args.seed,
                                       tokens=tokens, image_root=image_root)
    print(f"study {name!r}: {len(items)} items, {model_a} vs {model_b}, {args.raters} raters, "
          f"{args.raters_per_item} per item", file=out)
    if tokens is not None:
        print(f"rater tokens: from ${st.ENV_TOKENS}", file=out)
    elif args.tokens_out:
        path = st.write_tokens(args.tokens_out, [n for n, _ in issued], [t for _, t in issued])
        print(f"rater tokens written to {path} (mode 0600)", file=out)
    else:  # shown once, here; only their hashes are stored
        print("rater tokens (shown once; only their hashes are stored):", file=out)
        for n, t in issued:
            print(f"  {n} {t}", file=out)
    return url, image_root


def cmd_serve(args) -> int:
    import uvicorn
    from sqlalchemy.engine import make_url

    from orchestration.human_eval.app import create_app

    url, image_root = prepare_study(args)
    print(f"human evaluation at http://{args.host}:{args.port}  (database {make_url(url).render_as_string(hide_password=True)}, images {image_root})")
    uvicorn.run(create_app(url, image_root), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_status(args) -> int:
    from sqlalchemy.engine import make_url

    from dalle_core.eval.human import QUESTIONS, aggregate_votes

    url = make_url(_db_url(args))
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        raise FileNotFoundError(f"no human-eval database at {url.database} (start a study with 'human-eval serve')")
    with sessions(url.render_as_string(hide_password=False))() as s:
        study = get_study(s, args.study)
        p = study_progress(s, study)
        result = aggregate_votes(model_votes(s, study.id), study.raters_per_item)
    print(f"study {study.name!r}: {study.model_a} (A) vs {study.model_b} (B); "
          f"{p['items_complete']}/{p['items']} items complete, {p['votes']}/{p['votes_expected']} votes")
    for q in QUESTIONS:
        r = result[q]
        if r["n"]:
            print(f"  {q:14s} A preferred on {r['wins_a']}/{r['n']} = {r['pref_a']:.1%} "
                  f"(95% CI {r['ci_low']:.1%}-{r['ci_high']:.1%}), ties {r['ties']}")
        else:
            print(f"  {q:14s} no complete item yet")
    return 0


def add_human_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("human-eval", help="the paper's human evaluation: a web app for raters")
    sub = p.add_subparsers(dest="human_eval_command", required=True)
    for name in ("serve", "status"):
        s = sub.add_parser(name, help={"serve": "create a study (optional) and serve the raters' app",
                                       "status": "progress and majority-vote preference rates"}[name])
        s.add_argument("--db", default=None, help=f"SQLAlchemy URL (default ${ENV_DB} or sqlite under the run dir); "
                                                  "postgresql+psycopg://... for Postgres")
        s.add_argument("--run-dir", default=None)
        s.add_argument("--study", default=None, help="study name (default: study-1 when creating, else the newest)")
        s.set_defaults(func=cmd_serve if name == "serve" else cmd_status)
        if name == "status":
            continue
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, default=8090)
        s.add_argument("--items", default=None, help="JSON items file: [{caption, image_a, image_b}]")
        s.add_argument("--from-storage", default=None, help="storage root holding the samples asset's output")
        s.add_argument("--image-root", default=None, help="directory the image paths are relative to")
        s.add_argument("--raters", type=int, default=5)
        s.add_argument("--raters-per-item", type=int, default=5, help="the paper: 5")
        s.add_argument("--tokens-out", default=None, help="write rater tokens here (mode 0600) instead of printing")
        s.add_argument("--model-a", default=None)
        s.add_argument("--model-b", default=None)
        s.add_argument("--draw-b", type=int, default=None, help="with --from-storage: compare with reranked draw K")
        s.add_argument("--seed", type=int, default=0, help="left/right sides and assignment order")
