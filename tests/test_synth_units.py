"""The pure parts of synthetic data and judging: ROUGE-L by hand, verdict parsing, filters."""

import pytest

from posttrain.eval.judge import JudgeConfig, combine, read_pairwise, read_score
from posttrain.eval.rouge import lcs_length, max_rouge_l, rouge_l, rouge_tokens


def test_rouge_l_by_hand():
    # the cat sat on the mat / the cat lay on a mat: LCS the, cat, on, mat = 4 of 6 and 6
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    # 5 and 5 tokens, LCS what, is, plus = 3: P = R = 3/5
    assert rouge_l("What is 23 plus 45?", "What is 12 plus 9?") == pytest.approx(0.6)
    # P = 2/2, R = 2/4: F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("a b", "a x b y") == pytest.approx(2 / 3)
    assert rouge_l("Hello, World!", "hello world") == 1.0
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("abc", "xyz") == 0.0


def test_rouge_tokens_and_lcs():
    assert rouge_tokens("It's 3:30 -- OK?") == ["it", "s", "3", "30", "ok"]
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (CLRS)
    assert max_rouge_l("the cat", [rouge_tokens("a dog"), rouge_tokens("the cat sat")]) == (
        pytest.approx(0.8)
    )
    assert max_rouge_l("x", []) == 0.0


@pytest.mark.parametrize(
    "reply,want",
    [("A", "A"), ("b", "B"), ("Tie.", "tie"), ("Reply B is better", "B"), ("I think A", "A"),
     ("neither", None), ("", None), ("AB", None), ("[[A]]", "A")],
)  # fmt: skip
def test_read_pairwise(reply, want):
    assert read_pairwise(reply) == want


def test_read_score():
    assert read_score("7", 1, 10) == 7.0
    assert read_score("Score: 10/10", 1, 10) == 10.0
    assert read_score("11", 1, 10) is None
    assert read_score("none", 1, 10) is None


def test_combine_controls_position_bias():
    assert combine(["1", "1"]) == "1"
    assert combine(["1", "2"]) == "tie"  # the judge followed the position, not the reply
    assert combine(["tie", "2"]) == "tie"
    assert combine(["2", None]) == "2"  # one unreadable order: the other decides
    assert combine([None, None]) == "tie"
    assert combine(["2"]) == "2"


def test_judge_config_checks_templates():
    client = {"url": "http://127.0.0.1:9/v1", "model": "m"}
    with pytest.raises(ValueError, match="missing field"):
        JudgeConfig.model_validate({"client": client, "pairwise_template": "{reply_a} only"})
    with pytest.raises(ValueError, match="unknown field"):
        JudgeConfig.model_validate({"client": client, "single_template": "{reply} {answer}"})
    with pytest.raises(ValueError, match="low must be below high"):
        JudgeConfig.model_validate({"client": client, "scale": [5, 5]})


def _si(**kw):
    from posttrain.synth.self_instruct import SelfInstructConfig

    return SelfInstructConfig.model_validate(
        {"teacher": {"url": "http://127.0.0.1:9/v1", "model": "t"}, "seeds": "s.jsonl"} | kw
    )


@pytest.mark.parametrize(
    "text,why",
    [("", "empty"), ("Sort", "too_few_words"), ("Draw a cat for me", "blacklisted_word"),
     ("Describe this image please", "blacklisted_word"), ("- list three fruits", "starts_with_punctuation"),
     ("Écris trois mots français", "starts_non_ascii"), ("Name three kinds of tree.", None),
     ("Make a graphic novel plan", None)],
)  # fmt: skip
def test_instruction_filters(text, why):
    from posttrain.synth.self_instruct import instruction_problem

    assert instruction_problem(text, _si()) == why


def test_self_instruct_settings_of_the_other_mode_are_errors():
    with pytest.raises(ValueError, match="completion_item"):
        _si(completion_item="Q: {instruction}")  # chat mode is the default
    with pytest.raises(ValueError, match="chat_prompt"):
        _si(mode="completion", chat_prompt="{examples}?")
    with pytest.raises(ValueError, match="must contain"):
        _si(mode="completion", completion_item="Q:")


def test_completion_prompt_ends_with_the_next_item():
    from posttrain.synth.self_instruct import _prompt

    cfg = _si(mode="completion", completion_header="", completion_item="Q: {instruction}")
    assert _prompt(cfg, ["a b c", "d e f"]) == "Q: a b c\nQ: d e f\nQ:"
    cfg = _si(mode="completion")
    assert _prompt(cfg, ["x y z"]) == "Come up with a series of tasks:\n1. x y z\n2."


def test_answers_settings():
    from posttrain.synth.answers import AnswersConfig

    base = {"teacher": {"path": "m"}, "prompts": "p.jsonl"}
    with pytest.raises(ValueError, match="give one scorer"):
        AnswersConfig.model_validate(base | {"verifier": "world", "reward_model": "rm"})
    with pytest.raises(ValueError, match="needs a scorer"):
        AnswersConfig.model_validate(base | {"min_score": 0.5})
    with pytest.raises(ValueError, match="best needs a scorer"):
        AnswersConfig.model_validate(base | {"n": 4})
    assert AnswersConfig.model_validate(base | {"n": 4, "keep": "all"}).scorer is None
    with pytest.raises(ValueError, match="is 1 for a verifier"):
        AnswersConfig.model_validate(base | {"verifier": "world", "min_score": 0.5})
    assert AnswersConfig.model_validate(base | {"n": 4, "verifier": "world"}).scorer == "verifier"


def test_near_duplicates_agree_with_the_plain_scan():
    import random

    from posttrain.eval.rouge import NearDuplicates

    rng = random.Random(0)
    words = "what is the plus minus of a cat dog sort first letter 1 2 3".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 7))) for _ in range(300)]
    for t in (0.5, 0.7, 0.85, 1.0):
        index, pool = NearDuplicates(t), []
        for text in texts:
            want = max_rouge_l(text, pool) >= t
            assert index.is_near_duplicate(text) == want, (text, t)
            if not want:
                index.add(text)
                pool.append(rouge_tokens(text))


def test_client_spec_from_the_command_line():
    from posttrain.synth.cli import client_spec

    assert client_spec("http://h:1/v1/", "m", "KEY") == {
        "url": "http://h:1/v1", "model": "m", "api_key_env": "KEY"}  # fmt: skip
    assert client_spec("runs/x/sft", None, None) == {"path": "runs/x/sft"}
    with pytest.raises(ValueError, match="go with a URL"):
        client_spec("runs/x/sft", "m", None)


def test_a_dead_teacher_leaves_nothing_half_written(tmp_path):
    """A refused connection: a clear error after bounded retries, and no output file."""
    import json
    import socket

    from posttrain.generate.client import ModelClientError
    from posttrain.synth.self_instruct import generate, lineage_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Name three kinds of tree."}) + "\n")
    cfg = _si(teacher={"url": f"http://127.0.0.1:{port}/v1", "model": "t", "max_retries": 1,
                       "backoff_s": 0.01}, seeds=str(seeds))  # fmt: skip
    out = tmp_path / "si.jsonl"
    with pytest.raises(ModelClientError, match="connection refused"):
        generate(cfg, out, tmp_path / "cache", log=lambda m: None)
    assert not out.exists() and not lineage_path(out).exists()


def test_report_sentence_of_the_self_instruct_stage():
    from posttrain.report.story import stage_sentence

    m = {"kind": "self_instruct", "self_instruct/examples_written": 2000,
         "self_instruct/instructions_proposed": 2325, "self_instruct/rounds": 10,
         "self_instruct/instructions_dropped/too_few_words": 114,
         "self_instruct/instructions_dropped/near_duplicate": 210}  # fmt: skip
    report = {"stages": {"si": m}, "settings": {"si": {"teacher": "sft", "proposer": "pretrain"}}}
    assert stage_sentence(report, "si") == (
        "pretrain wrote new instructions and sft answered them: 2,000 conversations from 2,325 "
        "proposed in 10 rounds; dropped 210 near duplicate, 114 too few words."
    )
