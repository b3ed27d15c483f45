import json
import random

import numpy as np
import pytest
import yaml
from helpers import msgs
from pydantic import ValidationError

from posttrain.cli import main
from posttrain.data.curate import (
    STAT_KEYS,
    CurateSettings,
    curate,
    decontamination_ngrams,
    estimated_jaccard,
    minhash,
    normalized_text,
    shingle_hashes,
    words,
)


def chat(user, reply, system=None):
    turns = ([("system", system)] if system else []) + [("user", user), ("assistant", reply)]
    return {"messages": msgs(*turns)}


def stats(**nonzero):
    """Expected stats: every key 0 except those given (by their short names)."""
    return {k: nonzero.get(k.split("/")[1], 0) for k in STAT_KEYS}


def shingles(text, k=5):
    w = words(text)
    return {tuple(w[i : i + k]) for i in range(len(w) - k + 1)}


def jaccard(a, b):
    return len(a & b) / len(a | b)


# ---------------------------------------------------------------------------------------------
# Settings


def test_every_curate_field_has_a_description():
    for name, field in CurateSettings.model_fields.items():
        assert field.description, f"CurateSettings.{name} has no description"


def test_num_perm_must_be_divisible_by_bands():
    with pytest.raises(ValidationError, match=r"num_perm \(64\) must be divisible by bands \(10\)"):
        CurateSettings(num_perm=64, bands=10)
    with pytest.raises(ValidationError, match="bad regex"):
        CurateSettings(drop_patterns=["(unclosed"])
    with pytest.raises(ValidationError, match="max_response_words"):
        CurateSettings(min_response_words=5, max_response_words=2)
    with pytest.raises(ValidationError, match="extra"):
        CurateSettings(dedupe="near")


# ---------------------------------------------------------------------------------------------
# Exact dedup


def test_exact_dedup_normalises_case_and_whitespace_and_keeps_the_first_in_order():
    a = chat("What is 2 plus 2?", "It is 4.")
    a_variant = chat("what  is 2 PLUS 2?\n", "  It is\t4.")  # the same after normalisation
    b = chat("What is 2 plus 2?", "Four.")  # another reply: not a duplicate
    c = chat("What is 3 plus 3?", "6", system="Be brief.")
    c_no_system = chat("What is 3 plus 3?", "6")  # the system turn counts
    examples = [a, b, a_variant, c, c_no_system, a, b]
    kept, st = curate(examples, CurateSettings())  # default: dedup exact
    assert kept == [a, b, c, c_no_system]
    assert kept[0] is a  # the first occurrence, not a later copy
    assert st == stats(**{"in": 7, "kept": 4, "dropped_exact_duplicate": 3})
    kept, st = curate(examples, CurateSettings(dedup="none"))
    assert kept == examples and st == stats(**{"in": 7, "kept": 7})


def test_tool_calls_are_part_of_the_exact_text():
    def call(n):
        return {
            "messages": [
                {"role": "user", "content": "Add them."},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": n}}}]},
                {"role": "tool", "content": "42"},
                {"role": "assistant", "content": "42"},
            ]
        }  # fmt: skip

    kept, st = curate([call(1), call(2), call(1)], CurateSettings())
    assert len(kept) == 2 and st["curate/dropped_exact_duplicate"] == 1


# ---------------------------------------------------------------------------------------------
# Near dedup

REPLY = (
    "The lighthouse was built in 1871 by a crew of stonemasons who hauled every block up the "
    "narrow path by hand, and its lamp burned whale oil until the harbour board replaced it "
    "with a brighter electric beam in 1923."
)


def test_a_one_word_edit_of_a_40_word_reply_is_a_near_duplicate_and_unrelated_text_is_not():
    assert len(REPLY.split()) == 40
    w = REPLY.split()
    edited = " ".join(w[:-3] + ["light"] + w[-2:])  # "beam" -> "light": 3 shingles change
    original = chat("Tell me about the lighthouse.", REPLY)
    near = chat("Tell me about the lighthouse.", edited)
    other = chat("How do I bake bread?", "Mix flour, water, salt and yeast, knead it for ten "
                 "minutes, let it rise for an hour, shape it and bake it at 230 C for 35 minutes.")  # fmt: skip
    true_j = jaccard(*(shingles(normalized_text(e)) for e in (original, near)))
    assert true_j == 40 / 46
    # the same edit mid-text changes all 5 shingles that hold the word: J = 38 / 48 < 0.8
    mid = chat("Tell me about the lighthouse.", " ".join(w[:20] + ["foot"] + w[21:]))
    assert jaccard(*(shingles(normalized_text(e)) for e in (original, mid))) == 38 / 48
    s = CurateSettings(dedup="near", near_threshold=0.8)
    kept, st = curate([original, other, near], s)
    assert kept == [original, other]
    assert st == stats(**{"in": 3, "kept": 2, "dropped_near_duplicate": 1})
    # exact dedup alone keeps the edited copy; a threshold of 1 needs identical signatures
    assert curate([original, other, near], CurateSettings())[0] == [original, other, near]
    assert len(curate([original, near], s.model_copy(update={"near_threshold": 1.0}))[0]) == 2


def test_near_dedup_compares_with_kept_examples_only():
    """A ~ B and B ~ C but A !~ C: B is dropped, and C is compared with A only (so kept)."""

    def edit(ws, *at):
        return [f"x{i}" if i in at else w for i, w in enumerate(ws)]

    a = [f"t{i}" for i in range(100)]
    b = edit(a, 30)
    c = edit(b, 50, 70)
    sa, sb, sc = (shingles(" ".join(t)) for t in (a, b, c))
    assert (round(jaccard(sa, sb), 2), round(jaccard(sb, sc), 2), round(jaccard(sa, sc), 2)) == (
        0.9,
        0.81,
        0.73,
    )
    exs = [chat("q", " ".join(t)) for t in (a, b, c)]
    s = CurateSettings(dedup="near", near_threshold=0.77, num_perm=512, bands=64)
    kept, st = curate(exs, s)
    assert kept == [exs[0], exs[2]] and st["curate/dropped_near_duplicate"] == 1
    kept, st = curate([exs[1], exs[2]], s)  # without A, C is B's near-duplicate
    assert kept == [exs[1]]


def test_minhash_estimates_a_known_jaccard_of_one_half():
    # 300 shingles each (unique words), 200 shared: J = 200 / 400 exactly
    a = " ".join(f"w{i}" for i in range(304))
    b = " ".join(f"w{i}" for i in range(100, 404))
    assert jaccard(shingles(a), shingles(b)) == 0.5
    ha, hb = shingle_hashes(a), shingle_hashes(b)
    assert len(ha) == len(hb) == 300 and len(np.intersect1d(ha, hb)) == 200  # no crc collision
    est = estimated_jaccard(minhash(ha, 256), minhash(hb, 256))
    assert abs(est - 0.5) <= 0.15, est
    assert estimated_jaccard(minhash(ha, 256), minhash(ha, 256)) == 1.0
    # other seeds: the estimator is unbiased, so the mean is close to 0.5 too
    ests = [estimated_jaccard(minhash(ha, 256, seed), minhash(hb, 256, seed)) for seed in range(20)]
    assert abs(np.mean(ests) - 0.5) < 0.03


def test_short_texts_are_one_shingle():
    assert len(shingle_hashes("two words")) == 1
    assert len(shingle_hashes("one two three four five six")) == 2


def test_near_dedup_of_10k_short_examples_is_fast():
    import time

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    exs = [chat(" ".join(rng.choices(vocab, k=10)), " ".join(rng.choices(vocab, k=25)))
           for _ in range(10_000)]  # fmt: skip
    copies = [chat(e["messages"][0]["content"], e["messages"][1]["content"] + " indeed")
              for e in exs[:500]]  # fmt: skip
    t = time.perf_counter()
    kept, st = curate(exs + copies, CurateSettings(dedup="near"))
    seconds = time.perf_counter() - t
    print(f"near dedup of {len(exs) + len(copies)} examples: {seconds:.2f}s")
    assert st["curate/dropped_near_duplicate"] == 500 and kept == exs
    assert seconds < 10


# ---------------------------------------------------------------------------------------------
# Length and pattern filters


def test_length_and_pattern_filters():
    exs = [
        chat("Hi", "Hello there, how can I help?"),  # 6 words
        chat("Hi", "..."),  # no words
        chat("Hi", "Yes"),  # 1 word
        chat("Hi", "As an AI language model, I cannot have opinions."),  # 9 words, pattern
        chat("Hi", " ".join(["word"] * 50)),  # 50 words
        chat("Hi", "I'm sorry, but I can't do that."),
    ]
    s = CurateSettings(min_response_words=2, max_response_words=20, drop_patterns=[r"as an ai language model", r"^i'm sorry"])  # fmt: skip
    kept, st = curate(exs, s)
    assert kept == [exs[0]]
    assert st == stats(**{"in": 6, "kept": 1, "dropped_length": 3, "dropped_pattern": 2})
    # patterns see only assistant text; the default keeps any reply of at least one word
    kept, st = curate([chat("As an AI language model, answer.", "Fine.")] + exs[:3], CurateSettings(drop_patterns=["as an ai"]))  # fmt: skip
    assert len(kept) == 3 and st["curate/dropped_length"] == 1


# ---------------------------------------------------------------------------------------------
# Decontamination


def test_decontamination_by_13_grams_and_short_texts_whole(tmp_path):
    evals = tmp_path / "eval.jsonl"
    long_q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    evals.write_text(json.dumps({"question": long_q}) + "\n" + json.dumps({"messages": msgs(("user", "Name three primes."))}) + "\n")  # fmt: skip
    s = CurateSettings(decontaminate=[str(evals)], min_match_words=3)
    exs = [
        chat(f"Please solve: {long_q.upper()} Thanks!", "72"),  # holds the question: dropped
        chat("Natalia sold clips to 48 of her friends in April, and then she", "x"),  # 13 words
        chat("Natalia sold clips to 48 of her friends in April, and then", "x"),  # 12: kept
        chat("Could you name three primes, please?", "2, 3, 5"),  # the short text, whole: dropped
        chat("Name three", "x"),  # part of a short text: kept
        {"messages": msgs(("user", "Hi"), ("assistant", "Name three primes."))},  # not a user turn
    ]
    kept, st = curate(exs, s)
    assert kept == [exs[2], exs[4], exs[5]]
    assert st == stats(**{"in": 6, "kept": 3, "dropped_contaminated": 3})
    # by default a short eval text counts only from 8 words: "Name three primes." is no evidence
    kept, _ = curate(exs, CurateSettings(decontaminate=[str(evals)]))
    assert kept == [exs[2], exs[3], exs[4], exs[5]]


def test_a_missing_eval_file_or_unknown_name_is_named(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"curate.decontaminate\[0\] 'gsm8k': .*gsm8k/test.jsonl not found"
    ):
        curate([], CurateSettings(decontaminate=["gsm8k"], data_dir=str(tmp_path)))
    evals = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a question"}])
    with pytest.raises(
        FileNotFoundError, match=r"decontaminate\[1\] 'nope.jsonl'.*not a benchmark name"
    ):
        curate([], CurateSettings(decontaminate=[str(evals), "nope.jsonl"]))


def test_an_eval_record_without_a_prompt_names_its_line(tmp_path):
    from posttrain.data.schema import DataError

    evals = tmp_path / "eval.jsonl"
    evals.write_text('{"prompt": "ok"}\n{"answer": "4"}\n')
    with pytest.raises(DataError, match=r"eval.jsonl:2: no prompt text"):
        curate([], CurateSettings(decontaminate=[str(evals)]))


def test_gsm8k_test_questions_are_caught_among_train_questions(shared_data):
    def read(name):
        return [json.loads(line) for line in (shared_data / "gsm8k" / name).open()]

    test, train = read("test.jsonl"), read("train.jsonl")
    leaked = [chat(r["question"], "The answer is 3.") for r in test[:50]]
    clean = [chat(r["question"], r["answer"]) for r in train[:200]]
    mixed = clean[:]
    for i, ex in enumerate(leaked):
        mixed.insert(4 * i + 1, ex)
    s = CurateSettings(decontaminate=["gsm8k"], data_dir=str(shared_data))
    kept, st = curate(mixed, s)
    assert not any(ex in kept for ex in leaked)
    flagged = [ex for ex in clean if ex not in kept]
    print(f"GSM8K: {len(flagged)} of the first 200 train questions share a 13-gram with test")
    assert st["curate/dropped_contaminated"] == 50 + len(flagged) and len(flagged) <= 5
    # the whole train split: only a few genuine near-copies of test questions
    ngrams = decontamination_ngrams(["gsm8k"], s)
    overlap = sum(ngrams.matches(r["question"]) for r in train)
    print(f"GSM8K: {overlap} of {len(train)} train questions share a 13-gram with test")
    assert overlap <= 5
    # a paraphrase of a test question that shares no 13-gram with it is kept
    assert test[0]["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    paraphrase = ("Every day, the ducks that Janet owns produce 16 eggs; three of them are her "
                  "breakfast and four go into muffins for friends. She sells the rest at the "
                  "farmers' market for $2 apiece. How much does she earn per day?")  # fmt: skip
    assert not shingles(paraphrase, 13) & shingles(test[0]["question"], 13)
    assert curate([chat(paraphrase, "18")], s)[0] == [chat(paraphrase, "18")]


# ---------------------------------------------------------------------------------------------
# SFT stage and CLI

CHAT = [chat(f"What is {a} plus 11?", str(a + 11)) for a in range(10, 30)]


@pytest.fixture
def hf_dir(tmp_path, small_tokenizer):
    """A tiny random-init model saved as an ordinary HF directory (as in test_sft.py)."""
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    save_model(build_model("toy-xs", small_tokenizer), small_tokenizer, tmp_path / "hf")
    return tmp_path / "hf"


def write_jsonl(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def test_sft_stage_curates_reports_and_tracks_eval_files(tmp_path, hf_dir, monkeypatch, capsys):
    monkeypatch.setenv("CI", "true")
    dupes = [
        chat(e["messages"][0]["content"].upper(), e["messages"][1]["content"]) for e in CHAT[:3]
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT + dupes)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 29 plus 11?"}])
    curate_cfg = {"dedup": "exact", "decontaminate": [str(evals)], "min_match_words": 4}
    cfg = {"model": str(hf_dir), "data": {"path": str(data), "curate": curate_cfg}, "epochs": 1,
           "batch_size": 8, "max_length": 64, "val_fraction": 0, "train": {"checkpoint_every": 0}}  # fmt: skip
    cfg_path = tmp_path / "sft.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["sft", "--config", str(cfg_path), "--out", str(out)]) == 0
    m = json.loads((out / "sft/result.json").read_text())["metrics"]
    assert m["data/curate/in"] == 23 and m["data/curate/kept"] == 19
    assert m["data/curate/dropped_exact_duplicate"] == 3
    assert m["data/curate/dropped_contaminated"] == 1
    assert m["data/kept"] == 19 and m["data/examples"] == 19
    fp = yaml.safe_load((out / "sft/config.yaml").read_text())
    assert fp["inputs"]["curate:0"]["path"] == str(evals)
    # a changed eval file re-runs the stage; an unchanged one is cached
    assert main(["sft", "--config", str(cfg_path), "--out", str(out)]) == 0
    assert "skipped (config and inputs unchanged" in capsys.readouterr().err
    write_jsonl(evals, [{"prompt": "What is 28 plus 11?"}, {"prompt": "What is 27 plus 11?"}])
    assert main(["sft", "--config", str(cfg_path), "--out", str(out)]) == 0
    m = json.loads((out / "sft/result.json").read_text())["metrics"]
    assert m["data/curate/dropped_contaminated"] == 2 and m["data/kept"] == 18
    # curation that leaves nothing is an error naming the setting
    over = "data.curate.min_response_words=5"
    assert main(["sft", "--config", str(cfg_path), over, "--out", str(tmp_path / "b")]) == 2
    assert "sft.data.curate left no examples of 23" in capsys.readouterr().err


def test_sft_without_curate_is_unchanged():
    from posttrain.stages.sft import Config

    assert Config().data.curate is None
    assert Config(data={"curate": {}}).data.curate == CurateSettings()


def test_style_stats_by_hand():
    from posttrain.data.curate import style_stats

    exs = [chat("a", "One two three four."),  # 4 words, plain
           chat("b", "Two kinds:\n- red\n- blue"),  # 4 words (\w+ runs), a bullet list
           chat("c", "## Title\nUse `ls` here, **now**."),  # 5 words: header, code, bold
           {"messages": msgs(("user", "d"), ("assistant", "1. first\n2) second"),
                             ("user", "e"), ("assistant", "  "))}]  # fmt: skip
    st = style_stats(exs)
    # replies with content: 4 (the blank one is none); words 4, 4, 5, 4 ("1 first 2 second")
    assert st["style/replies"] == 4
    assert st["style/mean_words"] == pytest.approx(4.25) and st["style/median_words"] == 4.0
    assert st["style/bullet_share"] == pytest.approx(2 / 4)  # "- red", "1. first"
    assert st["style/markdown_share"] == pytest.approx(1 / 4)
    assert (st["style/header_share"], st["style/bold_share"], st["style/code_share"]) == (
        pytest.approx(0.25), pytest.approx(0.25), pytest.approx(0.25))  # fmt: skip
    assert style_stats([])["style/mean_words"] is None and style_stats([])["style/replies"] == 0
    # a "-" inside a line, a single * or a lone # is no list or markdown
    plain = style_stats([chat("f", "well-known 2 * 3 is #1 - yes")])
    assert plain["style/bullet_share"] == 0 and plain["style/markdown_share"] == 0


def test_data_curate_command_writes_kept_examples_and_prints_stats(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT + CHAT[:2] + [chat("Hi", "As an AI, no.")])
    out = tmp_path / "out" / "curated.jsonl"
    argv = ["data", "curate", "--data", str(data), "--out", str(out), "--dedup", "near",
            "--drop-pattern", "as an ai", "--min-response-words", "1"]  # fmt: skip
    assert main(argv) == 0
    st = json.loads(capsys.readouterr().out.strip())
    counts = {k: st[k] for k in STAT_KEYS}
    assert counts == stats(
        **{"in": 23, "kept": 20, "dropped_exact_duplicate": 2, "dropped_pattern": 1}
    )
    # and the kept replies' style: 20 one-word sums, no list, no markdown
    assert (st["style/replies"], st["style/mean_words"], st["style/median_words"]) == (20, 1, 1)
    assert st["style/bullet_share"] == 0 and st["style/markdown_share"] == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == CHAT
    # a malformed input line: exit 2 naming FILE:LINE, and no output written
    bad = write_jsonl(tmp_path / "bad.jsonl", CHAT[:2], ["{not json\n"])
    out2 = tmp_path / "out2.jsonl"
    assert main(["data", "curate", "--data", str(bad), "--out", str(out2)]) == 2
    assert "bad.jsonl:3: malformed JSON" in capsys.readouterr().err
    assert not out2.exists()
    # a bad setting and a missing benchmark are errors too
    assert main([*argv[:6], "--max-response-words", "0"]) == 2
    assert "max_response_words" in capsys.readouterr().err
    argv_missing = [*argv[:6], "--decontaminate", "gsm8k", "--data-dir", str(tmp_path)]
    assert main(argv_missing) == 2
    assert "curate.decontaminate[0] 'gsm8k'" in capsys.readouterr().err
