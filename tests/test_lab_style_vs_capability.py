"""style_vs_capability: its styles and figures against hand-derived values, and the
experiment's machinery at --quick sizes (every figure and criterion produced, and each raw win
rate the mean of the annotators' judgements of the cached replies; not that verdicts pass)."""

import json
import random

import numpy as np
import pytest
from helpers import check_lab_outputs

from posttrain.lab import style_vs_capability as svc
from posttrain.lab.stats import bootstrap

VARIANTS = ["concise", "standard", "verbose"]


def test_styles_by_hand():
    ref = "A garden is a place where people grow flowers and food."
    assert svc.concise(ref, 3) == "A garden."  # "A garden is": the trailing "is" dropped
    assert svc.concise("Rivers carry fresh water from the hills.", 3) == "Rivers carry fresh."
    # 5 words end in "flour,": the comma goes
    assert svc.concise("Bread is baked from flour, water.", 5) == "Bread is baked from flour."
    long = svc.verbose(ref, "gardens", 2, random.Random(0))
    assert long.startswith(ref + " ") and long.count(".") == 3 and long.count("gardens") == 2
    assert len(long.split()) > len(ref.split()) + 10
    s = svc.Settings(styles={"concise": "Be brief.", "standard": None, "verbose": "Go on."})
    task = {"prompt_id": "open/train/0", "family": "open", "prompt": "Describe gardens.",
            "reference": ref, "gold": {"topic": "gardens", "keyword": "garden"}}  # fmt: skip
    ex = svc.style_examples([task, task | {"family": "string"}], s, 0)
    assert [len(v) for v in ex.values()] == [1, 1, 1]  # open requests only
    assert ex["concise"][0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in ex["standard"][0]["messages"]] == ["user", "assistant"]
    with pytest.raises(ValueError, match="concise, standard, verbose"):
        svc.Settings(styles={"verbose": None, "concise": None, "standard": None})


def _seed(pref_by_g, delta_by_g, gold, words):
    """A packed seed: pref/delta (P, G) for one annotator, gamma 0."""
    sd = svc.SeedData(G=5, A=1, V=3)
    pref, delta = np.array(pref_by_g, float)[..., None], np.array(delta_by_g, float)[..., None]
    return sd, sd.pack(
        pref, delta, np.zeros(len(pref)), np.array(gold, float), np.array(words, float)
    )


def test_figures_by_hand():
    # 4 prompts; generators concise, standard, verbose, baseline_concise, baseline_verbose.
    # concise loses 3 of 4 (raw 0.25), standard ties all (0.5), verbose wins 3 of 4 (0.75):
    # raw spread 0.5. Standard's delta is always 0 and every judgement a tie: its GLM is
    # logit = theta = 0 (the gradient at 0 is 0), LC exactly 1/2.
    pref = [[0, 0.5, 1, 0, 1], [0, 0.5, 1, 0, 1], [0, 0.5, 1, 0, 1], [1, 0.5, 0, 1, 0]]
    delta = [[-8, 0, 20, -8, 20], [-7, 0, 25, -7, 25], [-9, 0, 30, -9, 30], [-8, 0, 22, -8, 22]]
    gold = [[1, 1, 1]] * 3 + [[1, 0, 1]]
    words = [[2, 10, 30]] * 4
    sd, arr = _seed(pref, delta, gold, words)
    Cs = {k: dict.fromkeys(VARIANTS, 1.0) for k in ("lc", "lc_noreg")}
    f = svc.seed_figures(arr, sd, VARIANTS, Cs, 0.2)
    assert [f[f"raw[{v}]"] for v in VARIANTS] == [0.25, 0.5, 0.75]
    assert f["lc[standard]"] == 0.5 and f["lc_noreg[standard]"] == 0.5
    assert [f[f"gold[{v}]"] for v in VARIANTS] == [1.0, 0.75, 1.0]
    assert f["words[verbose]"] == 30
    sp = svc.spreads(f, VARIANTS)
    assert sp["raw_spread"] == 0.5 and sp["gold_spread"] == 0.25
    assert sp["lc_ratio"] == pytest.approx(sp["lc_spread"] / 0.5)
    # the gamed baselines judged exactly as the variants: all of the win is length, so the
    # regularised GLM finds theta near 0 for both concise and verbose
    assert abs(f["lc[verbose]"] - 0.5) < abs(f["raw[verbose]"] - 0.5)
    # pooled over two seeds: per-variant means, spreads from those means
    f2 = dict(f) | {"raw[verbose]": 0.55}
    P = svc.pooled([f, f2], VARIANTS)
    assert P["raw[verbose]"] == pytest.approx(0.65) and P["raw_spread"] == pytest.approx(0.4)


def test_bootstrap_figures_is_the_labs_bootstrap():
    # the same resamples and percentile rule as posttrain.lab.stats.bootstrap
    rng = np.random.default_rng(0)
    groups = [rng.normal(size=(20, 3)), rng.normal(size=(15, 3))]

    def fn(gs):
        return {"m": float(np.mean([g[:, 0].mean() for g in gs])), "s": float(gs[0][:, 1].sum())}

    got = svc.bootstrap_figures(groups, fn, 200)
    assert got["m"] == bootstrap(lambda gs: fn(gs)["m"], groups, n_boot=200)
    assert got["s"] == bootstrap(lambda gs: fn(gs)["s"], groups, n_boot=200)


def test_style_vs_capability_quick(quick_lab):
    from posttrain.cli import main
    from posttrain.world.annotators import Pool, PoolConfig

    out = quick_lab
    argv = ["lab", "run", "style_vs_capability", "--quick", "--seeds", "3", "--out", str(out)]
    assert main(argv) == 0
    result = check_lab_outputs(out / "style_vs_capability", [3])
    assert {c["name"] for c in result["criteria"]} == {"raw_spread", "lc_spread_share"}
    fig = result["figures"]
    assert fig["variants"] == VARIANTS
    for kind in ("raw", "lc", "lc_noreg", "gold", "words"):
        for v in VARIANTS:
            e = fig["pooled"][f"{kind}[{v}]"]
            assert e["lo"] is None or e["lo"] <= e["value"] + 1e-9
    assert set(fig["per_seed"]["3"]["figures"]) == set(fig["pooled"])
    assert (out / "style_vs_capability/plots/winrates.png").is_file()
    # the style stage trained on the world's SFT data plus the styled open requests
    seed_dir = out / "seeds-quick/3"
    data = [json.loads(x) for x in (seed_dir / "style_data/train.jsonl").read_text().splitlines()]
    systems = [ex["messages"][0]["content"] for ex in data if ex["messages"][0]["role"] == "system"]
    n_open = sum(1 for x in (seed_dir / "world/tasks_train.jsonl").read_text().splitlines()
                 if json.loads(x)["family"] == "open")  # fmt: skip
    assert len(systems) == 2 * n_open and (seed_dir / "style_sft/model").is_dir()
    # each raw win rate is the mean of every annotator's judgement of the cached replies
    tasks = [json.loads(x) for x in (seed_dir / "world/tasks_eval.jsonl").read_text().splitlines()]
    tasks = [t for t in tasks if t["family"] == "open"]
    replies = json.loads((seed_dir / svc.EVAL_FILE).read_text())["replies"]
    from posttrain.lab.base import Lab

    pool_cfg = Lab(out, [3], quick=True).config(svc.NAME)["rank"]["pool"]
    pool = Pool(PoolConfig(**(dict(pool_cfg) | {"seed": 3})))
    for v in VARIANTS:
        prefs = []
        for t, reply in zip(tasks, replies[v], strict=True):
            for rec in pool.rank(t, [reply, t["reference"]]):
                first = rec["order"][0]
                prefs.append(0.5 if isinstance(first, list) else float(first == 0))
        assert fig["pooled"][f"raw[{v}]"]["value"] == pytest.approx(np.mean(prefs))
