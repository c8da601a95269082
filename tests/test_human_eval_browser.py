"""The raters' page in a real headless Chromium (Debian's, driven by Playwright): sign in with a
token, see the caption and both images, answer both questions for a few items, watch progress."""


import pytest

from test_human_eval import make_study, serve

pytestmark = pytest.mark.slow




def test_rater_signs_in_and_votes(browser, tmp_path):
    from sqlalchemy import select

    from orchestration.human_eval.app import create_app
    from dalle_core.eval.human_db import VoteRow

    url, factory, images, _, tokens = make_study(tmp_path, 5, 5)  # 5 raters: each sees all 5 items
    with serve(create_app(url, images)) as base:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.goto(base)
        page.fill("#token", "wrong-token-wrong-token")
        page.click("#signin")
        assert "Unknown token" in page.text_content("#error")
        page.fill("#token", tokens[0])
        page.click("#signin")
        page.wait_for_selector("#task:not([hidden])")
        captions = []
        for n in range(3):
            page.wait_for_function(f"document.getElementById('progress').value == {n}")
            assert page.text_content("#progress-text") == f"{n} / 5 done"
            caption = page.text_content("#caption")
            assert caption.startswith("a small red circle number") and caption not in captions
            captions.append(caption)
            for img in ("#image-a", "#image-b"):  # both images really loaded
                page.wait_for_function(f"document.querySelector('{img}').complete && "
                                       f"document.querySelector('{img}').naturalWidth === 32")
            if n == 0:
                page.screenshot(path=str(tmp_path / "rating-page.png"), full_page=True)
            page.check("input[name=realism][value=A]")
            page.check(f"input[name=caption_match][value={'AB'[n % 2]}]")
            page.click("#submit")
        page.wait_for_function("document.getElementById('progress').value == 3")
        assert page.text_content("#progress-text") == "3 / 5 done"
        page.click("#signout")
        page.wait_for_selector("#token")
        page.close()
    assert (tmp_path / "rating-page.png").stat().st_size > 1000
    with factory() as s:
        rows = s.execute(select(VoteRow.rater_id, VoteRow.realism, VoteRow.caption_match)).all()
    assert sorted(rows) == sorted([(1, "A", "A"), (1, "A", "B"), (1, "A", "A")])
