"""A real browser (Debian's Chromium, driven by Playwright) through the annotation app: log in,
read the guidelines, rank three prompts (click-to-order, a tie, an undone pick, the keyboard,
typed rank numbers), skip one with a key, check what is stored; the admin edits the guidelines.

Screenshot of the ranking page: `<the test's tmp_path>/ranking.png`.
"""

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the annotation app needs the 'annotate' extra")
pytest.importorskip("playwright", reason="the browser test needs playwright (the dev extra)")

from posttrain.annotate import db, guidelines  # noqa: E402
from posttrain.annotate.testing import fake_run, thread_server  # noqa: E402

CHROMIUM = Path(os.environ.get("POSTTRAIN_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} not found: install Debian's chromium (.ci/run does: apt-get install chromium)",
)


def shown_indices(page) -> list[int]:
    """Original candidate indices in the order the page shows them."""
    return [
        int(x) for x in page.locator(".cand").evaluate_all("els => els.map(e => e.dataset.index)")
    ]


def pick(page, index: int) -> None:
    page.click(f'.cand[data-index="{index}"] button.pick')


def test_browser_login_rank_three_skip_one(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    run = fake_run(tmp_path / "run", n_prompts=4)
    token = db.add_annotator(db.db_path(run), "alice", group="g1")[0]
    boss = db.add_annotator(db.db_path(run), "boss", admin=True)[0]
    with thread_server(run, k=1) as port, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.set_default_timeout(15_000)  # generous: CI machines are small and busy
            expect.set_options(timeout=15_000)
            base = f"http://127.0.0.1:{port}"
            page.goto(f"{base}/rank/next")
            expect(page.locator("h1")).to_have_text("Not logged in")
            page.goto(f"{base}/login?token={token}")
            page.click("#login")
            expect(page.locator("#progress")).to_contain_text("0 of 4 ranked")
            page.click("#start")

            # toy/0: the guidelines and the keys are on the page; the prompt shows under a hash
            # of its id (toy ids name the task family); click-to-order with one pick undone.
            expect(page.locator("h1")).to_contain_text(guidelines.public_id("toy/0"))
            expect(page.locator("h1")).not_to_contain_text("toy")
            expect(page.locator("#guidelines")).to_be_visible()
            expect(page.locator("#guidelines")).to_contain_text("Correct first")
            for key in ("1", "9", "t", "u", "Enter", "s"):
                expect(page.locator("#keys kbd", has_text=key).first).to_be_visible()
            want0 = shown_indices(page)
            pick(page, want0[0])
            pick(page, want0[2])  # a slip: taken back
            page.click("#undo")
            expect(page.locator(f"#rank_{want0[2]}")).to_have_value("")
            for i in want0[1:]:
                pick(page, i)
            expect(page.locator(f"#rank_{want0[-1]}")).to_have_value("3")
            page.click("#submit")

            # toy/1: the page with the script injection; it shows as text and never runs.
            # Ranked with the keyboard alone: 1, t, 2 (tied with 1), 3, u (undo), 3, Enter.
            expect(page.locator("h1")).to_contain_text(guidelines.public_id("toy/1"))
            expect(page.locator('.cand[data-index="1"] .text')).to_contain_text(
                "<script>window.pwned"
            )
            assert page.evaluate("window.pwned") is None
            a, b, c = shown_indices(page)
            for key in ("1", "t", "2", "3", "u"):
                page.keyboard.press(key)
            expect(page.locator(f"#rank_{c}")).to_have_value("")
            page.keyboard.press("3")
            expect(page.locator(f"#rank_{a}")).to_have_value("1")
            expect(page.locator(f"#rank_{b}")).to_have_value("1")  # a and b tie for first
            expect(page.locator(f"#rank_{c}")).to_have_value("2")
            page.screenshot(path=str(tmp_path / "ranking.png"), full_page=True)
            page.keyboard.press("Enter")

            # toy/2: skipped with its key.
            expect(page.locator("h1")).to_contain_text(guidelines.public_id("toy/2"))
            page.keyboard.press("s")

            # toy/3: rank numbers typed by hand (digits typed in a field are not shortcuts); a
            # missing one is refused with a clear message.
            expect(page.locator("h1")).to_contain_text(guidelines.public_id("toy/3"))
            page.fill("#rank_0", "2")
            page.fill("#rank_2", "1")
            page.click("#submit")
            expect(page.locator("#error")).to_contain_text("every response needs a rank")
            page.fill("#rank_1", "3")
            page.click("#submit")

            expect(page.locator("#done")).to_be_visible()
            expect(page.locator("#progress")).to_contain_text("3 of 4 ranked, 1 skipped")
            assert "toy/" not in page.content()  # the skipped prompt is listed by its hash too
            assert page.evaluate("window.pwned") is None

            # The admin sets this queue's guidelines; annotators see them from then on.
            admin = browser.new_page()
            admin.goto(f"{base}/login?token={boss}")
            admin.click("#login")
            expect(admin.locator("#guidelines-text")).to_have_value(guidelines.DEFAULT)
            admin.fill("#guidelines-text", "Prefer the shortest right answer.\n- Ties are fine")
            admin.click("#save-guidelines")
            page.goto(f"{base}/rank/2")
            expect(page.locator("#guidelines p")).to_have_text("Prefer the shortest right answer.")
            expect(page.locator("#guidelines li")).to_have_text("Ties are fine")
        finally:
            browser.close()

    assert (tmp_path / "ranking.png").stat().st_size > 10_000
    with db.opened(db.db_path(run)) as conn:
        assert db.rankings_of(conn, "alice") == {
            "toy/0": want0,
            "toy/1": [sorted([a, b]), c],
            "toy/3": [2, 0, 1],
        }
        assert db.skips_of(conn, "alice") == {"toy/2"}
