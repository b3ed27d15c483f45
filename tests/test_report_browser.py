"""The report of a tiny toy pipeline (world, pretrain, SFT, sample, rank, reward, DPO, evaluate
with best-of-n): every figure of its summary and card is one report.json holds, and in a real
browser (Debian's Chromium, driven by Playwright) the summary, the card with its intervals, the
table of contents and every plot are there and visible, from a page that fetches nothing.
"""

import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY_BASE, _merge

from posttrain.report.glossary import fmt, fmt_signed

CHROMIUM = Path(os.environ.get("POSTTRAIN_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
STAGES = ["world", "pretrain", "sft", "sample", "rank", "reward", "dpo", "evaluate"]
EXTRA = """
sample: {n: 3, max_new_tokens: 8, chunk: 16}
reward:
  data: {val_fraction: 0.3, max_length: 96}
  batch_size: 8
  train: {lr: 1.0e-3, checkpoint_every: 0}
dpo:
  data: {val_fraction: 0.3, max_length: 96}
  batch_size: 8
  train: {lr: 1.0e-4, checkpoint_every: 0}
evaluate:
  models:
    base: {model: pretrain, prompt: fewshot}
    sft: {model: sft}
    dpo: {model: dpo}
    bon: {model: sft, policy: best_of_n, reward_model: reward, n: 2}
  max_new_tokens: 6
  diversity: {n_prompts: 2, n_samples: 2}
"""


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """(report.json's dict, run dir) of the tiny pipeline, run once for this module."""
    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("report")
    raw = _merge(yaml.safe_load(TINY_BASE), yaml.safe_load(EXTRA)) | {"stages": STAGES}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    pipe = load_pipeline(tmp / "tiny.yaml", [f"out={tmp / 'run'}"])
    report = run_pipeline(pipe, logger=Logger(stream=io.StringIO()))
    return report, tmp / "run"


def written(v) -> set[str]:
    """Every way the report writes a number of report.json."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return set()
    out = {fmt(v), fmt_signed(v), f"{v:.0%}", str(v)}
    return out | {s.lstrip("+-") for s in out}


def numbers_of(obj) -> set[str]:
    found = set()
    if isinstance(obj, dict):
        for v in obj.values():
            found |= numbers_of(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= numbers_of(v)
    else:
        found |= written(obj)
    return found


NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?%?")


def test_every_figure_of_the_summary_and_card_is_in_report_json(tiny_report):
    report, run = tiny_report
    assert json.loads((run / "report.json").read_text()) == report
    known = numbers_of({k: v for k, v in report.items() if k != "summary"})
    names = {w for x in [*report["stages"], *report["evals"]] for w in re.findall(r"\d+", x)}
    assert set(report["summary"]) == set(STAGES)
    for stage, sentence in report["summary"].items():
        for num in NUMBER.findall(sentence):
            assert num in known or num in names, (stage, num, sentence)
    assert "within noise" in report["summary"]["dpo"] or "beyond" in report["summary"]["evaluate"]
    # Every toy-world rate and mean has its interval; DPO and best-of-n their paired difference.
    for label in ("base", "sft", "dpo", "bon"):
        ev = report["evals"][label]
        for key in ("gold/mean", "gold/arithmetic", "length/mean_tokens", "refusal/rate"):
            if key in ev:
                lo, hi = ev["ci95"][key]
                assert lo - 1e-9 <= ev[key] <= hi + 1e-9, (label, key)
    assert set(report["evals"]["dpo"]["vs_sft"]) <= set(report["evals"]["dpo"]["ci95"])
    assert "overopt/gold@2" in report["evals"]["bon"]["ci95"]
    md = (run / "report.md").read_text()
    for label, ev in report["evals"].items():  # the card's cells in report.md
        cell = fmt(ev["gold/mean"]) + " " + f"[{fmt(ev['ci95']['gold/mean'][0])}, "
        assert cell in md or f"**{fmt(ev['gold/mean'])}** [" in md, label
    for line in md.splitlines():  # every plot on disk, captioned
        if line.startswith("![") and "](plots/" in line:
            assert (run / line.split("](")[1].rstrip(")")).is_file()


pytestmark_browser = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} not found: install Debian's chromium (.ci/run does: apt-get install chromium)",
)


@pytestmark_browser
def test_the_report_in_a_browser(tiny_report):
    pytest.importorskip("playwright", reason="the browser test needs playwright (the dev extra)")
    from playwright.sync_api import expect, sync_playwright

    report, run = tiny_report
    plots = sorted((run / "plots").glob("*.png"))
    assert {p.name for p in plots} >= {"pretrain_loss.png", "sft_loss.png", "rank_pairs.png",
                                       "dpo_rewards.png", "evaluate_tradeoffs.png",
                                       "evaluate_over_optimisation.png"}  # fmt: skip
    html = (run / "report.html").read_text()
    assert not re.search(r"""(src|href)=['"](https?:)?//""", html)  # nothing fetched: offline
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            expect.set_options(timeout=15_000)
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((run / "report.html").as_uri())
            assert all(u.startswith(("file:", "data:")) for u in requests), requests

            expect(page.locator("#header")).to_be_visible()
            expect(page.locator("#header")).to_contain_text("wall time")
            toc = page.locator("nav#toc")
            expect(toc).to_be_visible()
            for href in toc.locator("a").evaluate_all("as => as.map(a => a.getAttribute('href'))"):
                expect(page.locator(href)).to_have_count(1)  # every entry leads somewhere
            assert toc.locator("a").count() == 3 + len(STAGES)  # summary, card, samples, stages

            items = page.locator("#summary li")
            expect(items).to_have_count(len(STAGES))
            dpo = page.locator("#summary li", has=page.locator("a[href='#stage-dpo']"))
            expect(dpo).to_contain_text("gold sft")

            card = page.locator("#card-headline table.card")
            expect(card).to_be_visible()
            row = card.locator("tr", has=page.locator("code", has_text=re.compile("^gold/mean$")))
            expect(row).to_be_visible()
            for label in report["evals"]:
                ci = report["evals"][label]["ci95"]["gold/mean"]
                expect(row).to_contain_text(f"[{fmt(ci[0])}, {fmt(ci[1])}]")
            expect(row.locator(".vs")).not_to_have_count(0)  # against sft: noise or not
            expect(page.locator("#card details").first).to_be_attached()

            expect(page.locator("#samples table.samples").first).to_be_visible()
            imgs = page.locator("figure img")
            assert imgs.count() == len(plots)
            for i in range(imgs.count()):
                img = imgs.nth(i)
                img.scroll_into_view_if_needed()
                expect(img).to_be_visible()
                assert img.evaluate("im => im.complete && im.naturalWidth > 0"), i
                box = img.bounding_box()
                assert box["width"] > 200 and box["height"] > 100, i
            expect(page.locator("figure figcaption")).to_have_count(len(plots))
        finally:
            browser.close()
