"""The raters' web app: sign in with a token, see a caption and two images, answer the two questions.

JSON API (token as `Authorization: Bearer ...` or the cookie set by the sign-in form):
  GET  /api/next      the rater's next unanswered item (item_id null when done)
  POST /api/vote      {item_id, realism: "A"|"B", caption_match: "A"|"B"}
  GET  /api/progress  the rater's done/total and the study's
  GET  /images/{item_id}/{A|B}
Statuses: 401 no or unknown token, 403 item not assigned to this rater, 422 malformed
body, 409 a second vote with different answers (the first stands), 200 otherwise
(an identical resubmission answers 200 with stored=false). Tokens are never
taken from the URL, so they stay out of access logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from dalle_core.eval.human_db import (Assignment, Item, Rater, Study, VoteRow, hash_token, sessions,
                                      study_progress)

COOKIE = "dalle_human_eval"


class VoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: int
    realism: Literal["A", "B"]  # the side as shown: A = left image, B = right image
    caption_match: Literal["A", "B"]


def create_app(db_url, image_root: str | Path) -> FastAPI:
    factory = sessions(db_url)
    root = Path(image_root).resolve()
    app = FastAPI(title="DALL-E human evaluation", docs_url=None, redoc_url=None, openapi_url=None)

    def rater_for(token: Optional[str]) -> Optional[Rater]:
        if not token:
            return None
        with factory() as s:
            return s.scalar(select(Rater).where(Rater.token_hash == hash_token(token)))

    def token_of(request: Request) -> Optional[str]:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return request.cookies.get(COOKIE)

    def current_rater(request: Request) -> Rater:
        rater = rater_for(token_of(request))
        if rater is None:
            raise HTTPException(401, "sign in with your rater token", headers={"WWW-Authenticate": "Bearer"})
        return rater

    def assigned_item(s, rater: Rater, item_id: int) -> Item:
        item = s.scalar(select(Item).join(Assignment, Assignment.item_id == Item.id)
                        .where(Assignment.rater_id == rater.id, Item.id == item_id))
        if item is None:
            raise HTTPException(403, f"item {item_id} is not assigned to you")
        return item

    def progress(s, rater: Rater) -> dict:
        total = s.query(Assignment).filter(Assignment.rater_id == rater.id).count()
        done = s.query(VoteRow).filter(VoteRow.rater_id == rater.id).count()
        return {"rater": {"name": rater.name, "done": done, "total": total},
                "study": study_progress(s, s.get(Study, rater.study_id))}

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        rater = rater_for(request.cookies.get(COOKIE))
        return HTMLResponse(RATE_PAGE if rater else SIGN_IN_PAGE.replace("{error}", ""))

    @app.post("/signin")
    async def sign_in(request: Request):
        # the form is parsed here rather than with Form(...), which would need python-multipart
        token = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[0].strip()
        if await run_in_threadpool(rater_for, token) is None:
            return HTMLResponse(SIGN_IN_PAGE.replace("{error}", '<p class="error" id="error">Unknown token.</p>'),
                                status_code=401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 86400)
        return resp

    @app.post("/signout")
    def sign_out():
        resp = RedirectResponse("/", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/api/next")
    def next_item(rater: Rater = Depends(current_rater)):
        with factory() as s:
            item = s.scalar(
                select(Item).join(Assignment, Assignment.item_id == Item.id)
                .outerjoin(VoteRow, (VoteRow.item_id == Item.id) & (VoteRow.rater_id == rater.id))
                .where(Assignment.rater_id == rater.id, VoteRow.id.is_(None))
                .order_by(Assignment.position).limit(1))
            out = {"item_id": None, "progress": progress(s, rater)}
            if item is not None:
                out.update(item_id=item.id, caption=item.caption,
                           image_a=f"/images/{item.id}/A", image_b=f"/images/{item.id}/B")
            return out

    @app.post("/api/vote")
    def vote(body: VoteIn, rater: Rater = Depends(current_rater)):
        with factory() as s:
            assigned_item(s, rater, body.item_id)
            s.add(VoteRow(rater_id=rater.id, item_id=body.item_id, realism=body.realism,
                          caption_match=body.caption_match))
            try:
                s.commit()
                return {"stored": True, "progress": progress(s, rater)}
            except IntegrityError:  # UNIQUE(rater, item): this rater already voted on this item
                s.rollback()
            first = s.scalar(select(VoteRow).where(VoteRow.rater_id == rater.id, VoteRow.item_id == body.item_id))
            if (first.realism, first.caption_match) != (body.realism, body.caption_match):
                raise HTTPException(409, f"you already voted on item {body.item_id}; a vote cannot be changed")
            return {"stored": False, "duplicate": True, "progress": progress(s, rater)}

    @app.get("/api/progress")
    def get_progress(rater: Rater = Depends(current_rater)):
        with factory() as s:
            return progress(s, rater)

    @app.get("/images/{item_id}/{side}")
    def image(item_id: int, side: Literal["A", "B"], rater: Rater = Depends(current_rater)):
        with factory() as s:
            key = assigned_item(s, rater, item_id).shown(side)
        path = (root / key).resolve()
        if root not in path.parents or not path.is_file():
            raise HTTPException(404, f"image of item {item_id} side {side} not found")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    return app


_STYLE = """<style>
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
.pair{display:flex;gap:2em;justify-content:center}.pair figure{margin:0;text-align:center}
.pair img{width:320px;height:320px;image-rendering:pixelated;border:1px solid #aaa;background:#eee}
.caption{font-size:1.3em;text-align:center;margin:1em 0}fieldset{margin:1em 0;border:1px solid #ccc}
label{margin-right:2em;font-size:1.1em}progress{width:100%;height:1.2em}.error{color:#b00}
button{font-size:1.1em;padding:.4em 1.5em}</style>"""

SIGN_IN_PAGE = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Human evaluation: sign in</title>
{_STYLE}</head><body><h1>Human evaluation</h1>{{error}}
<form method="post" action="/signin"><label for="token">Your rater token</label>
<input id="token" name="token" type="password" autocomplete="off" size="40" required>
<button id="signin" type="submit">Sign in</button></form></body></html>"""

RATE_PAGE = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Human evaluation</title>
{_STYLE}</head><body>
<form method="post" action="/signout" style="float:right"><button id="signout">Sign out</button></form>
<h1>Human evaluation</h1>
<progress id="progress" value="0" max="1"></progress><p id="progress-text"></p>
<div id="task" hidden>
 <p class="caption">Caption: <q id="caption"></q></p>
 <div class="pair"><figure><img id="image-a" alt="image A"><figcaption>A</figcaption></figure>
  <figure><img id="image-b" alt="image B"><figcaption>B</figcaption></figure></div>
 <form id="vote">
  <fieldset><legend>Which image is more realistic?</legend>
   <label><input type="radio" name="realism" value="A" required> A</label>
   <label><input type="radio" name="realism" value="B"> B</label></fieldset>
  <fieldset><legend>Which image matches the caption better?</legend>
   <label><input type="radio" name="caption_match" value="A" required> A</label>
   <label><input type="radio" name="caption_match" value="B"> B</label></fieldset>
  <button id="submit" type="submit">Submit</button> <span id="error" class="error"></span>
 </form></div>
<p id="done" hidden>All done, thank you.</p>
<script>
let item = null;
function show(p) {{
  const r = p.rater; document.getElementById('progress').max = r.total;
  document.getElementById('progress').value = r.done;
  document.getElementById('progress-text').textContent = r.done + ' / ' + r.total + ' done';
}}
async function load() {{
  const res = await fetch('/api/next');
  if (res.status === 401) {{ location.reload(); return; }}
  const d = await res.json(); show(d.progress); item = d.item_id;
  document.getElementById('vote').reset();
  document.getElementById('task').hidden = item === null;
  document.getElementById('done').hidden = item !== null;
  if (item === null) return;
  document.getElementById('caption').textContent = d.caption;
  document.getElementById('image-a').src = d.image_a;
  document.getElementById('image-b').src = d.image_b;
}}
document.getElementById('vote').addEventListener('submit', async (e) => {{
  e.preventDefault(); const f = new FormData(e.target);
  const res = await fetch('/api/vote', {{method: 'POST', headers: {{'Content-Type': 'application/json'}},
    body: JSON.stringify({{item_id: item, realism: f.get('realism'), caption_match: f.get('caption_match')}})}});
  if (!res.ok) {{ document.getElementById('error').textContent = (await res.json()).detail; return; }}
  document.getElementById('error').textContent = ''; await load();
}});
load();
</script></body></html>"""
