"""hallucination_trap: its figures against hand-derived values on made-up measurements, the SFT
sets it builds, and the experiment's machinery at --quick sizes (every figure, criterion and
plot produced, and equal to what the cached measurements give; not that the verdicts pass)."""

import json

import numpy as np
import pytest

from posttrain.lab import hallucination_trap as ht
from posttrain.lab import hallucination_trap_stats as hs


def _settings(**over) -> ht.Settings:
    base = {"shares": [0.0, 0.5, 1.0], "n_examples": 4, "dev_size": 1, "relabel_share": 0.5,
            "fit_share": 0.5, "fit_loss": 0.1}  # fmt: skip
    return ht.Settings(**(base | over))


def test_epochs_to_fit_and_line_by_hand():
    # 0.5 at epoch 1, 0.05 at epoch 2: crosses 0.1 at 1 + (0.5 - 0.1) / (0.5 - 0.05) = 1.889
    assert hs.epochs_to_fit([1.0, 0.5, 0.05], 0.1) == (pytest.approx(1 + 0.4 / 0.45), False)
    assert hs.epochs_to_fit([0.05, 0.5], 0.1) == (0.0, False)  # fitted before training
    assert hs.epochs_to_fit([1.0, 0.5, 0.2], 0.1) == (2.0, True)  # never: the last epoch, censored
    # x = 0, 1, 2; y = 0, 2, 1: b = ((-1)(-1) + 0 + (1)(0)) / 2 = 0.5, a = 1 - 0.5 = 0.5;
    # residuals -0.5, 1, -0.5: SS 1.5 against SS_tot 2: R^2 = 0.25
    assert hs.line([0, 1, 2], [0, 2, 1]) == pytest.approx((0.5, 0.5, 0.25))
    assert hs.line([0, 0.5, 1], [0.8, 0.6, 0.4]) == pytest.approx((-0.4, 0.8, 1.0))
    assert np.isnan(hs.line([0, 1], [0.3, 0.3])[2])  # a flat line explains nothing
    # dev means by epoch 0.9 (the base: never chosen), 0.5, 0.75, 0.75: epoch 2, the earlier tie
    dev = np.array([[1.0, 0.8], [0.5, 0.5], [1.0, 0.5], [0.5, 1.0]])
    assert hs.early_stop(dev) == 2


def _rows(means: list[float], copies: int) -> np.ndarray:
    """(5 * copies, A) 0/1 scores whose column means are `means` (multiples of 0.2), nested:
    an item right in a column is right in every column of a higher mean."""
    cols = [[1.0] * round(5 * m) + [0.0] * (5 - round(5 * m)) for m in means]
    return np.repeat(np.array(cols).T, copies, 0)


def _measurements(copies: int = 4) -> tuple[dict, dict, ht.Settings]:
    """One made-up seed, epochs 0-2, sets u0, u50, u100 and u50_relabel, where by hand:
    known accuracy at the end 0.8 / 0.6 / 0.4 (slope -0.4, R^2 1); dev best at epoch 1 for
    every set, where known accuracy is 0.8 / 0.8 / 0.6 (slope -0.2: half); u50 hallucinates
    on every unknown question, relabelled on half (-0.5) at the same known accuracy (cost 0);
    u50's Known examples' loss 0.3 -> 0.05 -> 0 (fit at 0.8), Unknown 2 -> 1 -> 0 (1.9):
    ratio 2.375."""
    s = _settings()
    arms = ht.arms(s)
    end = {"u0": 0.8, "u50": 0.6, "u100": 0.4, "u50_relabel": 0.6}
    early = {"u0": 0.8, "u50": 0.8, "u100": 0.6, "u50_relabel": 0.6}
    flags = [True, True, False, False]
    loss = [[2.0, 2.0, 0.3, 0.3], [1.0, 1.0, 0.05, 0.05], [0.0, 0.0, 0.0, 0.0]]
    hal_u = np.repeat([[1.0, 1.0], [1.0, 0.0]], 5 * copies // 2, 0)  # (P_u, 2): u50, relabel
    out = {}
    for lb in arms:
        known = _rows([0.2, early[lb], end[lb]], copies)  # (P_k, 3): epochs 0, 1, 2
        hal = hal_u[:, 1] if lb == "u50_relabel" else hal_u[:, 0]
        epochs = [{"loss": loss[e], "dev": [0.0, 1.0, 0.5][e:e + 1] * 2,
                   "known": known[:, e].tolist(), "unknown": (1 - hal).tolist(),
                   "hallucinated": hal.tolist()} for e in range(3)]  # fmt: skip
        out[lb] = {"unknown": flags, "epochs": epochs}
    cats = ["HighlyKnown", "Unknown", "WeaklyKnown", "Unknown"]
    seed = {"probe": cats, "world_known": [True, True, False, False],
            "filled": {"known": 0, "unknown": 0}, "arms": out}  # fmt: skip
    return {0: seed}, arms, s


def test_figures_and_criteria_by_hand():
    seeds, arms, s = _measurements()
    fig = hs.figures(seeds, arms, s)
    P = {k: v.value for k, v in fig["pooled"].items()}
    assert P["slope"] == pytest.approx(-0.4) and P["r2"] == pytest.approx(1.0)
    assert P["slope_es"] == pytest.approx(-0.2) and P["slope_ratio"] == pytest.approx(0.5)
    assert [P[f"acc[{u:g}]"] for u in (0, 0.5, 1)] == pytest.approx([0.8, 0.6, 0.4])
    assert P["relabel_cost"] == pytest.approx(0.0) and P["acc_relabel"] == pytest.approx(0.6)
    assert P["hal[0.5]"] == 1.0 and P["hal_relabel"] == 0.5
    assert P["relabel_change"] == pytest.approx(-0.5)
    assert (P["epochs_known"], P["epochs_unknown"]) == pytest.approx((0.8, 1.9))
    assert P["ratio"] == pytest.approx(1.9 / 0.8)
    assert fig["early_stop"][0] == dict.fromkeys(arms, 1)
    # probe against the world: one world-known fact Unknown, one world-unknown WeaklyKnown
    agree = fig["probe"][0]
    assert agree["agreement"] == 0.5
    assert agree["table"]["world_known"]["Unknown"] == 1
    assert agree["table"]["world_unknown"]["WeaklyKnown"] == 1
    verdicts = {c.name: c.passed for c in hs.criteria(fig, s)}
    assert verdicts == dict.fromkeys(["unknown_fits_slower", "known_accuracy_falls", "linear_fit",
                                      "early_stop_halves_slope", "relabel_lowers_hallucination",
                                      "relabel_costs_little"], True)  # fmt: skip
    # two identical seeds pool to the same values
    fig2 = hs.figures({0: seeds[0], 1: seeds[0]}, arms, s)
    assert fig2["pooled"]["slope"].value == pytest.approx(-0.4)
    assert fig2["pooled"]["ratio"].value == pytest.approx(1.9 / 0.8)


def test_no_negative_slope_is_not_halved():
    seeds, arms, s = _measurements()
    for lb in ("u0", "u50", "u100"):
        for e in seeds[0]["arms"][lb]["epochs"]:
            e["known"] = [1.0] * len(e["known"])  # flat: slope 0
    c = {c.name: c for c in hs.criteria(hs.figures(seeds, arms, s), s)}
    assert not c["known_accuracy_falls"].passed and not c["early_stop_halves_slope"].passed
    assert c["early_stop_halves_slope"].note == "no negative slope to halve"


def _fact(name: str, known: bool, i: int) -> dict:
    e = {"name": name, "attributes": {"town": f"T{i}", "occupation": "baker", "colour": "red",
         "pet": "cat"}, "known": known, "mentions": 20 if known else 0}  # fmt: skip
    return ht._fact(e, "town", "train", i)


def test_sets_are_nested_fixed_size_and_relabelled():
    s = _settings(shares=[0.0, 0.25, 0.5, 0.75, 1.0], n_examples=8)
    cands = [_fact(f"K{i}", True, i) for i in range(10)] + [
        _fact(f"U{i}", False, i) for i in range(10)
    ]
    recs = [{"category": "HighlyKnown" if c["gold"]["known"] else "Unknown"} for c in cands]
    recs[0]["category"] = "Unknown"  # the probe disagrees with the world on two facts
    recs[10]["category"] = "WeaklyKnown"
    pools = ht.split_pools(cands, recs, s, seed=0)
    assert len(pools["known"]) == len(pools["unknown"]) == 10
    assert any(t["gold"]["entity"] == "U0" for t in pools["known"])  # the probe decides
    sets = {u: ht.arm_examples(pools, 8, u, False) for u in s.shares}
    for u, ex in sets.items():
        ids = [e["id"] for e in ex]
        assert len(ex) == 8 and sum(i.startswith("unknown:") for i in ids) == round(8 * u)
    unknown = {u: {e["id"] for e in ex if e["id"].startswith("unknown:")} for u, ex in sets.items()}
    assert unknown[0.25] <= unknown[0.5] <= unknown[0.75] <= unknown[1.0]  # nested
    relabelled = ht.arm_examples(pools, 8, 0.5, True)
    assert [e["id"] for e in relabelled] == [e["id"] for e in sets[0.5]]
    for e, r in zip(sets[0.5], relabelled, strict=True):
        same = e["id"].startswith("known:")
        assert (r["messages"][1]["content"] == e["messages"][1]["content"]) is same
        assert same or r["messages"][1]["content"] == "I don't know."
    with pytest.raises(ValueError, match="the probe found 10 known examples, the sets need 12"):
        ht.split_pools(cands, recs, _settings(n_examples=12), seed=0)
    # fill: the world's known facts the probe called Unknown make up the Known side
    none_known = [{"category": "Unknown"} for _ in cands]
    filled = ht.split_pools(cands, none_known, _settings(n_examples=8, fill=True), seed=0)
    assert filled["filled"] == {"known": 8, "unknown": 0}
    assert all(t["gold"]["known"] for t in filled["known"])


def test_settings_errors():
    with pytest.raises(ValueError, match="relabel_share"):
        _settings(relabel_share=0.3)
    with pytest.raises(ValueError, match="fit_share"):
        _settings(fit_share=1.0)
    with pytest.raises(ValueError, match="increasing"):
        _settings(shares=[0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="set by the experiment"):
        _settings(probe={"action": "filter"})


def test_hallucination_trap_quick(quick_lab):
    from helpers import check_lab_outputs

    from posttrain.cli import main
    from posttrain.lab.base import Lab

    out = quick_lab
    argv = ["lab", "run", "hallucination_trap", "--quick", "--seeds", "3", "--out", str(out)]
    assert main(argv) == 0
    result = check_lab_outputs(out / "hallucination_trap", [3])
    names = [c["name"] for c in result["criteria"]]
    assert names == ["unknown_fits_slower", "known_accuracy_falls", "linear_fit",
                     "early_stop_halves_slope", "relabel_lowers_hallucination",
                     "relabel_costs_little"]  # fmt: skip
    for f in ("fit.png", "accuracy.png", "epochs.png"):
        assert (out / "hallucination_trap/plots" / f).is_file()
    fig = result["figures"]
    seed_dir = out / "seeds-quick/3"
    raw = Lab(out, [3], quick=True).config(ht.NAME)
    s = ht.Settings(**raw["lab"])
    epochs = raw[ht.TEMPLATE]["epochs"]
    for label, arm in fig["arms"].items():
        data = [json.loads(x) for x in (seed_dir / ht.DATA_DIR / f"{label}.jsonl").open()]
        n_u = sum(e["id"].startswith("unknown:") for e in data)
        assert len(data) == s.n_examples and n_u == round(s.n_examples * arm["share"])
        ev = json.loads((seed_dir / ht.EVAL_DIR / f"{arm['stage']}.json").read_text())
        assert len(ev["epochs"]) == epochs + 1  # the base, then every epoch
        assert not list((seed_dir / arm["stage"] / "checkpoints").glob("*.pt"))  # pruned
        last = ev["epochs"][-1]
        if arm["relabel"]:
            assert fig["pooled"]["acc_relabel"]["value"] == pytest.approx(np.mean(last["known"]))
        else:
            u = f"{arm['share']:g}"
            assert fig["pooled"][f"acc[{u}]"]["value"] == pytest.approx(np.mean(last["known"]))
            assert fig["pooled"][f"hal[{u}]"]["value"] == pytest.approx(
                np.mean(last["hallucinated"]))  # fmt: skip
        assert 1 <= fig["early_stop"]["3"][label] <= epochs
    n_probe = sum(sum(row.values()) for row in fig["probe"]["3"]["table"].values())
    assert n_probe == 2 * s.pool
