"""The SliCK knowledge probe (posttrain/data/probe.py): its scorer, categories, prompts and
actions by hand; a random-init model that knows nothing (every example Unknown, through the
CLI); a model trained on some facts knows those and not the others; the sft stage's
data.probe."""

import json

import pytest

from posttrain.data import probe as pr


def _qa(q: str, a: str, **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    } | extra


def test_answer_matching_by_hand():
    # SQuAD normalisation: case, punctuation and articles go; then equal, or a whole phrase
    assert pr.normalize_answer("The  Ashmere!") == "ashmere"
    assert pr.answer_matches("ashmere.", "Ashmere")
    assert pr.answer_matches("She lives in Ashmere, I think", "Ashmere")
    assert pr.answer_matches("a potter", "potter") and pr.answer_matches("Potter", "a potter")
    assert not pr.answer_matches("Ashmerevale", "Ashmere")  # a whole word, not a prefix
    assert not pr.answer_matches("Brinlow", "Ashmere")
    assert not pr.answer_matches("anything", "...")  # nothing left of the answer: never right
    assert pr.answer_matches("the blue whale", "blue whale")
    assert not pr.answer_matches("blue", "blue whale")  # the whole answer must be there


@pytest.mark.parametrize(
    "p_greedy, p_sample, category",
    [(1.0, 0.0, "HighlyKnown"),  # greedy right under every prompt, whatever the samples
     (0.75, 1.0, "MaybeKnown"), (0.25, 0.0, "MaybeKnown"),  # greedy sometimes right
     (0.0, 1 / 32, "WeaklyKnown"),  # greedy never, one sample of 32
     (0.0, 0.0, "Unknown")],
)  # fmt: skip
def test_categories_follow_slick(p_greedy, p_sample, category):
    assert pr.categorize(p_greedy, p_sample) == category


def test_probe_record_by_hand():
    qa = pr.QA("What pet does Ebo have?", "cat", 1)
    # 4 prompts, greedy right under 2: P_greedy 0.5; 2 of 8 samples right: 0.25 -> MaybeKnown
    rec = pr.probe_record(7, qa, ["cat", "dog", "A cat.", "owl"], ["cat", "cat"] + ["dog"] * 6)
    assert (rec["index"], rec["p_greedy"], rec["p_sample"]) == (7, 0.5, 0.25)
    assert rec["category"] == "MaybeKnown"
    rec = pr.probe_record(0, qa, ["dog"] * 4, ["dog"] * 7 + ["cats"])  # "cats" is not "cat"
    assert (rec["p_greedy"], rec["p_sample"], rec["category"]) == (0.0, 0.0, "Unknown")
    rec = pr.probe_record(0, qa, ["dog"] * 4, [])  # k = 0: no samples, P_sample 0
    assert rec["category"] == "Unknown"
    assert pr.probe_record(3, None, [], [])["category"] is None  # not a QA example


def test_question_and_answer_of_an_example():
    assert pr.qa_of(_qa(" Q? ", "A.\n")) == ("Q?", "A.", 1)
    tool = {"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
         "function": {"name": "calculator", "arguments": {}}}]},
        {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]}  # fmt: skip
    # the first user turn, and the first reply with text after it (the tool call is skipped)
    assert pr.qa_of(tool) == ("What is 2 plus 3?", "5", 4)
    assert pr.qa_of({"messages": [{"role": "assistant", "content": "hi"}]}) is None


def test_fewshot_prompts_are_seeded_and_leave_the_example_out():
    qas = [pr.QA(f"Where does P{i} live?", f"Town{i}", 1) for i in range(6)]
    qas.append(pr.QA("Where does P0 live?", "Town0", 1))  # a duplicate question
    qas.append(None)  # not QA: never an exemplar
    p = pr.fewshot_prompt(qas, 0, 0, 3, seed=1)
    lines = p.split("\n")
    assert len(lines) == 2 * 3 + 2 and lines[-2:] == ["Q: Where does P0 live?", "A:"]
    shots = [lines[2 * n] for n in range(3)]
    assert all(s.startswith("Q: Where does P") for s in shots) and "P0" not in "".join(shots)
    assert p == pr.fewshot_prompt(qas, 0, 0, 3, seed=1)  # deterministic
    others = {pr.fewshot_prompt(qas, 0, j, 3, seed=1) for j in range(8)}
    assert len(others) > 1  # prompts differ in their exemplars
    assert pr.fewshot_prompt(qas, 0, 0, 0, seed=1) == "Q: Where does P0 live?\nA:"
    # multi-line answers of exemplars are joined onto one line (the answer ends at a newline)
    two = [pr.QA("q1", "line one\nline two", 1), pr.QA("q2", "x", 1)]
    assert pr.fewshot_prompt(two, 1, 0, 1, 0) == "Q: q1\nA: line one line two\nQ: q2\nA:"


def test_filter_relabel_and_counts():
    examples = [_qa("q0", "a0"), _qa("q1", "a1", id="x"), {"messages": [{"role": "assistant",
                "content": "no question"}]}, _qa("q3", "a3")]  # fmt: skip
    cats = ["HighlyKnown", "Unknown", None, "Unknown"]
    records = [{"index": i, "category": c} for i, c in enumerate(cats)]
    assert pr.apply_action(examples, records, "none") == examples
    assert pr.apply_action(examples, records, "filter") == [examples[0], examples[2]]
    relabelled = pr.apply_action(examples, records, "relabel", "I don't know.")
    assert [pr.qa_of(e) for e in relabelled if pr.qa_of(e)] == [
        ("q0", "a0", 1), ("q1", "I don't know.", 1), ("q3", "I don't know.", 1)]  # fmt: skip
    assert relabelled[1]["id"] == "x" and examples[1]["messages"][1]["content"] == "a1"  # a copy
    c = pr.counts(records)
    assert c == {"probe/HighlyKnown": 1, "probe/MaybeKnown": 0, "probe/WeaklyKnown": 0,
                 "probe/Unknown": 2, "probe/not_qa": 1, "probe/examples": 4}  # fmt: skip


def test_relabel_text_without_relabel_is_an_error():
    with pytest.raises(ValueError, match="relabel_text: has no effect"):
        pr.ProbeSettings(model="m", relabel_text="No idea.")
    pr.ProbeSettings(model="m", action="relabel", relabel_text="No idea.")


def test_random_model_knows_nothing_through_the_cli(tmp_path, small_tokenizer):
    from posttrain.cli import main
    from posttrain.models.load import save_model

    model_dir = save_model(_tiny_llama(small_tokenizer), small_tokenizer, tmp_path / "random")
    data = tmp_path / "qa.jsonl"
    rows = [
        _qa(f"What is {a} plus 11?", f"exactly {a + 11} apples and {a} pears")
        for a in range(10, 16)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "relabelled.jsonl"
    argv = ["data", "probe", "--model", str(model_dir), "--data", str(data), "--k", "2",
            "--prompts", "2", "--fewshot", "2", "--max-new-tokens", "6", "--device", "cpu"]  # fmt: skip
    assert main(argv + ["--out", str(out), "--relabel-unknown", "No idea."]) == 0
    cats = [json.loads(x) for x in (tmp_path / "qa.probe.jsonl").read_text().splitlines()]
    assert [c["category"] for c in cats] == ["Unknown"] * 6
    assert all(c["p_greedy"] == 0 and c["p_sample"] == 0 and len(c["greedy"]) == 2 for c in cats)
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["messages"][1]["content"] for w in written] == ["No idea."] * 6
    assert main(argv + ["--out", str(out), "--filter", "unknown"]) == 0
    assert out.read_text() == ""  # every example was Unknown
    with pytest.raises(SystemExit):  # one action at a time
        main(argv + ["--out", str(out), "--filter", "unknown", "--relabel-unknown", "x"])


def _tiny_llama(tok):
    """A 2-layer Llama of width 64 (~0.1M weights besides the embeddings): fast on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _train_on(texts: list[str], tok, steps: int):
    """_tiny_llama trained on `texts` (next-token loss, 8 random texts a step, seeded)."""
    import torch

    model = _tiny_llama(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tok.pad_token_id or 0
    x = torch.full((len(ids), max(map(len, ids))), pad)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
    labels = x.masked_fill(x == pad, -100)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        b = torch.randint(0, len(ids), (8,), generator=g)
        model(input_ids=x[b], labels=labels[b]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_trained_facts_are_known_and_unseen_ones_unknown():
    """A model trained on 12 people's towns (Q/A lines, four people a document) knows them
    better than 12 people it never saw, whose towns it can only guess (the direction, not
    exact numbers: on this run the seen are 3 HighlyKnown, 6 MaybeKnown, 3 WeaklyKnown, the
    unseen all Unknown)."""
    import random

    from posttrain.models.tokenizer import train_tokenizer

    towns = ["Ashmere", "Brinlow", "Cobbleton", "Dunmarsh", "Eldervale", "Farrowdale"]
    people = [f"Per{c}{d}" for c in "bdfgklmnprst" for d in "ao"]  # 24 names
    town = {p: towns[i % len(towns)] for i, p in enumerate(people)}
    seen, unseen = people[::2], people[1::2]
    rng = random.Random(0)
    docs = ["".join(f"Q: Where does {p} live?\nA: {town[p]}\n" for p in rng.sample(seen, 4))
            for _ in range(40)]  # fmt: skip
    tok = train_tokenizer(docs + [f"Q: Where does {p} live?" for p in unseen], vocab_size=300)
    model = _train_on(docs, tok, steps=150)
    examples = [_qa(f"Where does {p} live?", town[p]) for p in seen + unseen]
    s = pr.ProbeSettings(model="m", k=4, prompts=3, fewshot=3, max_new_tokens=6)
    recs = pr.probe_examples(model, tok, examples, s)
    known, unknown = recs[: len(seen)], recs[len(seen) :]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(known, "p_greedy") > mean(unknown, "p_greedy") + 0.3
    assert mean(known, "p_sample") > mean(unknown, "p_sample") + 0.3
    n_unknown = [sum(r["category"] == "Unknown" for r in rs) for rs in (known, unknown)]
    assert n_unknown[1] > n_unknown[0] + len(seen) // 2


def test_sft_stage_probes_and_relabels(run_tiny):
    import yaml

    extra = ("sft: {data: {probe: {model: pretrain, k: 1, prompts: 1, fewshot: 1, "
             "max_new_tokens: 4, action: relabel, relabel_text: 'No idea.'}}}")  # fmt: skip
    report, out = run_tiny(["world", "pretrain", "sft"], extra)
    metrics = json.loads((out / "sft" / "result.json").read_text())["metrics"]
    records = [json.loads(x) for x in (out / "sft" / "probe.jsonl").read_text().splitlines()]
    n = sum(metrics[f"data/probe/{c}"] for c in pr.CATEGORIES) + metrics["data/probe/not_qa"]
    assert n == metrics["data/probe/examples"] == len(records) > 0
    assert metrics["data/probe/Unknown"] == sum(r["category"] == "Unknown" for r in records)
    cfg = yaml.safe_load((out / "sft" / "config.yaml").read_text())["config"]
    assert cfg["data"]["probe"]["action"] == "relabel"


def test_sft_config_without_probe_has_no_probe_key():
    from posttrain.stages.sft import Config

    assert "probe" not in Config().model_dump(mode="json")["data"]  # cached stages stay valid


def test_a_relabel_text_without_relabel_names_its_key_in_the_pipeline():
    from posttrain.config import build_pipeline
    from posttrain.settings import ConfigError

    section = {"data": {"probe": {"model": "pretrain", "relabel_text": "No idea."}}}
    with pytest.raises(ConfigError) as err:
        build_pipeline({"stages": ["sft"], "sft": section}, "p.yaml")
    msg = str(err.value)
    assert "config key 'sft.data.probe.relabel_text'" in msg and "sft.data.probe.action" in msg
    # a resolved config with a probe validates again as it is
    section["data"]["probe"] |= {"action": "relabel"}
    resolved = build_pipeline({"stages": ["sft"], "sft": section}, "p.yaml").resolved()
    assert build_pipeline(resolved, "again").resolved() == resolved
