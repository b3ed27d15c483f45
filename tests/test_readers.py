"""Chat-data schema and readers: small hand-written files and the real datasets in shared/data."""

import gzip
import json

import pytest
from helpers import msgs, write_lines

from posttrain.data.readers import (
    READERS,
    detect_format,
    load_chat_data,
    parse_hh_transcript,
    read_alpaca,
    read_hh,
    read_messages_jsonl,
    read_oasst_trees,
    read_sharegpt,
)
from posttrain.data.schema import DataError, validate_example

HH_FILE = "hh-rlhf/harmless-base/test.jsonl.gz"
OASST_FILE = "oasst/en_100_tree.jsonl"
SEED_FILE = "self-instruct/seed_tasks.jsonl"


# ---------------------------------------------------------------- schema


def test_validate_normalises_tool_calls_and_drops_unknown_keys():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    rec = {
        "id": 7,
        "extra": "dropped",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "1+1?", "weight": 1},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "add"},
            {"role": "assistant", "content": "2"},
        ],
    }
    out = validate_example(rec, "f:1")
    assert out["id"] == "7" and "extra" not in out
    assert out["messages"][1] == {"role": "user", "content": "1+1?"}
    assert out["messages"][2]["content"] == ""  # None with tool_calls -> ""
    assert out["messages"][2]["tool_calls"][0]["function"]["name"] == "add"
    assert out["messages"][3]["tool_call_id"] == "c1"


@pytest.mark.parametrize(
    "rec, fragment",
    [
        ([], "not an object"),
        ({"messages": []}, 'missing or empty "messages"'),
        ({"messages": ["hi"]}, "message 0: not an object"),
        ({"messages": msgs(("bot", "x"))}, "unknown role 'bot'"),
        ({"messages": msgs(("user", "q"), ("assistant", " \n"))}, "empty response"),
        ({"messages": [{"role": "user", "content": 3}]}, "content is not a string (got int)"),
        ({"messages": [{"role": "user", "content": None}]}, "content is not a string"),
        ({"messages": msgs(("user", "q"))}, "no assistant turn"),
        ({"messages": msgs(("user", "q"), ("system", "s"), ("assistant", "a"))}, "system message"),
        (
            {"messages": [*msgs(("user", "q")), {"role": "assistant", "tool_calls": [{}]}]},
            "tool_calls[0] has no function name",
        ),
    ],
)
def test_validate_rejects_bad_records_naming_where(rec, fragment):
    with pytest.raises(DataError) as e:
        validate_example(rec, "data.jsonl:12")
    assert str(e.value).startswith("data.jsonl:12: ")
    assert fragment in str(e.value)


# ---------------------------------------------------------------- messages JSONL

GOOD_TOOL = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {}}}],
        },
        {"role": "tool", "content": "sunny", "name": "weather"},
        {"role": "assistant", "content": "It is sunny."},
    ],
    "tools": [{"type": "function", "function": {"name": "weather"}}],
}
BAD_LINES = {  # line number in the file below -> the error it must give
    3: ("{not json", "malformed JSON"),
    4: (json.dumps({"msgs": []}), 'missing "messages"'),
    5: (json.dumps({"messages": msgs(("user", "hi"), ("bot", "yo"))}), "unknown role 'bot'"),
    6: (json.dumps({"messages": msgs(("user", "hi"), ("assistant", ""))}), "empty response"),
    7: (json.dumps({"messages": [{"role": "user", "content": ["x"]}]}), "content is not a string"),
}


@pytest.fixture
def messages_file(tmp_path):
    conv = {"conversations": msgs(("user", "hi"), ("assistant", "hello")), "id": "c"}
    lines = [json.dumps(GOOD_TOOL), json.dumps(conv)] + [BAD_LINES[i][0] for i in sorted(BAD_LINES)]
    return write_lines(tmp_path / "chat.jsonl", lines)


def test_messages_valid_records_parse(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [json.dumps(GOOD_TOOL), "", json.dumps(GOOD_TOOL)])
    examples, stats = load_chat_data(path)
    assert stats["format"] == "messages" and stats["kept"] == 2 and stats["skipped"] == 0
    assert examples[0]["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"
    assert examples[0]["messages"][2]["role"] == "tool" and examples[0]["tools"]
    assert [w for w, _ in read_messages_jsonl(path)] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize("line", sorted(BAD_LINES))
def test_messages_malformed_line_names_file_and_line(tmp_path, line):
    text, fragment = BAD_LINES[line]
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD_TOOL)] * (line - 1) + [text])
    with pytest.raises(DataError) as e:
        load_chat_data(path, format="messages")
    assert str(e.value).startswith(f"{path}:{line}: ") and fragment in str(e.value)


def test_messages_skip_counts_bad_records(messages_file):
    examples, stats = load_chat_data(messages_file, on_error="skip")
    assert (stats["read"], stats["kept"], stats["skipped"]) == (7, 2, 5)
    assert examples[1]["id"] == "c"  # the "conversations" key with role/content is accepted
    assert [e.split(": ")[0] for e in stats["errors"]] == [
        f"{messages_file}:{i}" for i in range(3, 8)
    ]
    with pytest.raises(DataError, match=r":3: malformed JSON"):
        list(read_messages_jsonl(messages_file))


def test_load_rejects_unknown_format_and_missing_file(messages_file, tmp_path):
    with pytest.raises(ValueError, match="known: auto, messages, alpaca, sharegpt, oasst, hh"):
        load_chat_data(messages_file, format="chatml")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_chat_data(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_chat_data(messages_file, on_error="ignore")


# ---------------------------------------------------------------- ShareGPT


def test_sharegpt_maps_roles_and_names_unknown_from(tmp_path):
    good = {
        "id": "s1",
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Add 1 and 2"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "3"},
        ],
    }
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bard", "value": "Yo"}]}
    path = tmp_path / "share.json"
    path.write_text(json.dumps([good, bad]), encoding="utf-8")
    assert detect_format(path) == "sharegpt"
    examples, stats = load_chat_data(path, on_error="skip")
    roles = [m["role"] for m in examples[0]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "tool", "assistant"]
    assert examples[0]["messages"][4]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert stats["skipped"] == 1 and stats["errors"][0].startswith(f"{path}:record 2: turn 1: ")
    assert "unknown \"from\" 'bard'" in stats["errors"][0]
    with pytest.raises(DataError, match="'bard'"):
        list(read_sharegpt(path))


# ---------------------------------------------------------------- Alpaca / self-instruct


def test_alpaca_list_joins_instruction_and_input(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "  ", "output": "hi"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert detect_format(path) == "alpaca"
    (w1, e1), (_, e2) = read_alpaca(path)
    assert w1 == f"{path}:record 1"
    assert e1["messages"] == msgs(("user", "Translate.\n\nchat"), ("assistant", "cat"))
    assert e2["messages"][0]["content"] == "Say hi."  # blank input adds nothing


def test_alpaca_on_self_instruct_seed_tasks(shared_data):
    path = shared_data / SEED_FILE
    tasks = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    n_instances = sum(len(t["instances"]) for t in tasks)
    assert len(tasks) == 175
    assert detect_format(path) == "alpaca"
    examples, stats = load_chat_data(path)
    assert stats["skipped"] == 0 and len(examples) == n_instances == 175
    first, inst = tasks[0], tasks[0]["instances"][0]
    expected = first["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
    assert examples[0]["messages"] == msgs(("user", expected), ("assistant", inst["output"]))
    assert examples[0]["id"] == first["id"]
    with_input = next(i for i, t in enumerate(tasks) if t["instances"][0]["input"].strip())
    assert examples[with_input]["messages"][0]["content"].endswith(
        "\n\n" + tasks[with_input]["instances"][0]["input"]
    )
    assert [w for w, _ in read_alpaca(path)][:2] == [f"{path}:1", f"{path}:2"]


# ---------------------------------------------------------------- OASST trees


def _best_of(replies):
    """Independent statement of the rule: lowest rank first, unranked after, tree order on ties."""
    usable = [
        (k, r)
        for k, r in enumerate(replies)
        if r["role"] == "assistant" and not r["deleted"] and r["review_result"]
    ]
    usable.sort(key=lambda kr: (kr[1].get("rank") is None, kr[1].get("rank") or 0, kr[0]))
    return usable[0][1] if usable else None


def _count_paths(root):
    """Leaves of the pruned tree, counted with an explicit stack (no recursion)."""
    count, stack = 0, [root]
    while stack:
        best = _best_of(stack.pop()["replies"])
        if best is None:
            continue
        answered = [
            c for c in best["replies"] if c["role"] == "prompter" and _best_of(c["replies"])
        ]
        answered = [c for c in answered if not c["deleted"] and c["review_result"]]
        if answered:
            stack.extend(answered)
        else:
            count += 1
    return count


def test_oasst_follows_best_ranked_replies(shared_data):
    path = shared_data / OASST_FILE
    trees = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert detect_format(path) == "oasst"
    examples, stats = load_chat_data(path)
    assert stats["records"] == 100 and stats["skipped"] == 0
    assert len(examples) == sum(_count_paths(t["prompt"]) for t in trees) == 102
    by_id = {}
    for tree in trees:
        stack = [tree["prompt"]]
        while stack:
            node = stack.pop()
            by_id[node["message_id"]] = node
            stack.extend(node["replies"])
    for ex in examples:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) % 2 == 0
    # Walk each conversation down its tree: every assistant turn is its best-ranked sibling.
    for where, ex in read_oasst_trees(path):
        node = trees[int(where.rsplit(":", 1)[1]) - 1]["prompt"]
        for k, msg in enumerate(ex["messages"]):
            assert not node["deleted"] and msg["content"] == node["text"]
            if k + 1 < len(ex["messages"]):
                nxt = ex["messages"][k + 1]["content"]
                node = next(c for c in node["replies"] if c["text"] == nxt)
                if node["role"] == "assistant":
                    assert node is _best_of(by_id[node["parent_id"]]["replies"])
        assert node["message_id"] == ex["id"] and node["role"] == "assistant"


def test_oasst_rank_rule_on_a_small_tree(tmp_path):
    def m(role, text, rank=None, replies=(), deleted=False):
        return {"role": role, "text": text, "rank": rank, "deleted": deleted,
                "message_id": text, "replies": list(replies)}  # fmt: skip

    follow_ups = [m("prompter", "q2", replies=[m("assistant", "a2")]), m("prompter", "q3")]
    tree = m("prompter", "q1", replies=[
        m("assistant", "worse", rank=1, replies=[m("prompter", "ignored", replies=[m("assistant", "x")])]),
        m("assistant", "deleted-best", rank=0, deleted=True),
        m("assistant", "best", rank=0, replies=follow_ups),
    ])  # fmt: skip
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"message_tree_id": "t", "prompt": tree})])
    examples, _ = load_chat_data(path)
    # "q3" has no answer, so it ends no conversation: one path q1-best-q2-a2.
    assert [[x["content"] for x in e["messages"]] for e in examples] == [["q1", "best", "q2", "a2"]]


# ---------------------------------------------------------------- Anthropic HH


def test_parse_hh_transcript():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello. Human: is not a turn here\n\nHuman: Bye\n\nAssistant: Bye!"
    assert parse_hh_transcript(text, "f:1") == msgs(
        ("user", "Hi there"),
        ("assistant", "Hello. Human: is not a turn here"),
        ("user", "Bye"),
        ("assistant", "Bye!"),
    )
    with pytest.raises(DataError, match=r"^f:9: HH transcript does not start with"):
        parse_hh_transcript("Human: Hi\n\nAssistant: Hello", "f:9")
    with pytest.raises(DataError, match=r"^f:2: .*two Assistant turns in a row"):
        parse_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "f:2")


def test_hh_reader_names_the_bad_line(tmp_path):
    good = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go",
    }
    bad = {"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "x"}
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert detect_format(path) == "hh"
    with pytest.raises(DataError, match=rf"^{path}:2: HH transcript does not start with"):
        list(read_hh(path))
    examples, stats = load_chat_data(path, on_error="skip", field="rejected")
    assert stats["skipped"] == 1 and examples[0]["messages"][-1]["content"] == "Go"


def test_hh_on_harmless_base_test(shared_data):
    path = shared_data / HH_FILE
    assert detect_format(path) == "hh"
    examples, stats = load_chat_data(path, on_error="skip")
    # Every record is read; 12 "chosen" transcripts are rejected (found by hand in the file):
    # 4 end in an empty Assistant turn, 8 have two Assistant turns in a row.
    assert (stats["records"], stats["read"]) == (2312, 2312)
    assert (stats["kept"], stats["skipped"]) == (2300, 12)
    assert stats["errors"][0].startswith(f"{path}:87: message 3: empty response")
    assert stats["errors"][2].startswith(f"{path}:668: HH transcript has two Assistant turns")
    for ex in examples:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) % 2 == 0
        assert all(m["content"].strip() for m in ex["messages"][1::2])
    with pytest.raises(DataError, match=rf"^{path}:87: "):
        load_chat_data(path)
    _, rejected = load_chat_data(path, on_error="skip", field="rejected")
    assert (rejected["kept"], rejected["skipped"]) == (2307, 5)


# ---------------------------------------------------------------- format detection


def test_detect_format_on_real_files(shared_data):
    assert detect_format(shared_data / SEED_FILE) == "alpaca"
    assert detect_format(shared_data / OASST_FILE) == "oasst"
    assert detect_format(shared_data / HH_FILE) == "hh"
    with pytest.raises(ValueError, match="cannot detect the chat format"):
        detect_format(shared_data / "gsm8k/test.jsonl")


def test_detect_format_on_small_files(tmp_path, messages_file):
    assert detect_format(messages_file) == "messages"
    share = write_lines(tmp_path / "s.jsonl", [json.dumps({"conversations": [{"from": "human"}]})])
    assert detect_format(share) == "sharegpt"
    seed = write_lines(tmp_path / "a.jsonl", [json.dumps({"instruction": "x", "instances": []})])
    assert detect_format(seed) == "alpaca"
    assert set(READERS) == {"messages", "alpaca", "sharegpt", "oasst", "hh"}


# ---------------------------------------------------------------- bytes not UTF-8, a directory
# Every reader of data files (chat formats, preference pairs, KTO feedback, plain text, the JSONL
# of other stages) names the file, the line and the byte offset, and says what to do.

GOOD = json.dumps({"messages": msgs(("user", "hi"), ("assistant", "hello"))})
PAIR = json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"})
FEEDBACK = json.dumps({"prompt": "hi", "completion": "a", "label": True})
TEXT = json.dumps({"text": "hello"})


def _latin1_line(good: str) -> bytes:
    """`good` with its last string value's last character replaced by a Latin-1 e-acute."""
    cut = good.rindex('"')
    return good[: cut - 1].encode() + b"\xe9" + good[cut:].encode()


def _readers():
    from posttrain.data.preferences import load_feedback, load_pairs
    from posttrain.data.text import read_texts
    from posttrain.io import read_jsonl

    return {
        "chat": (load_chat_data, GOOD),
        "chat-messages": (lambda p: list(read_messages_jsonl(p)), GOOD),
        "pairs": (load_pairs, PAIR),
        "feedback": (load_feedback, FEEDBACK),
        "text": (read_texts, TEXT),
        "jsonl": (read_jsonl, TEXT),
    }


@pytest.mark.parametrize("kind", list(_readers()))
def test_bytes_not_utf8_name_file_line_and_byte_offset(tmp_path, kind):
    read, good = _readers()[kind]
    bad = _latin1_line(good)
    path = tmp_path / "data.jsonl"
    path.write_bytes((good + "\n").encode() * 2 + bad + b"\n")
    offset = 2 * (len(good) + 1) + bad.index(b"\xe9")
    with pytest.raises(ValueError) as e:
        read(path)
    assert str(e.value).startswith(
        f"{path}:3: not valid UTF-8 (byte 0xe9 at byte offset {offset}); fix that line or "
        "re-encode the file as UTF-8"
    )


def test_bytes_not_utf8_in_gz_json_list_and_txt_files(tmp_path):
    from posttrain.data.text import read_texts

    gz = tmp_path / "chat.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write((GOOD + "\n").encode() + _latin1_line(GOOD) + b"\n")
    with pytest.raises(DataError, match=r"chat\.jsonl\.gz:2: not valid UTF-8 .* uncompressed "):
        load_chat_data(gz)
    lst = tmp_path / "chat.json"  # a whole-file JSON list: the line of the bad byte
    lst.write_bytes(b"[\n" + GOOD.encode() + b",\n" + _latin1_line(GOOD) + b"\n]\n")
    with pytest.raises(DataError, match=r"chat\.json:3: not valid UTF-8 \(byte 0xe9"):
        load_chat_data(lst, format="messages")
    txt = tmp_path / "book.txt"
    txt.write_bytes(b"one\ntwo\nthr\xe9e\n")
    with pytest.raises(ValueError, match=r"book\.txt:3: not valid UTF-8 \(byte 0xe9 at byte "
                                         r"offset 11\)"):  # fmt: skip
        read_texts(txt)


def test_a_line_not_utf8_is_skipped_and_counted_like_any_bad_record(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes((GOOD + "\n").encode() + _latin1_line(GOOD) + b"\n" + (GOOD + "\n").encode())
    examples, stats = load_chat_data(path, on_error="skip")
    assert (stats["kept"], stats["skipped"]) == (2, 1)
    assert stats["errors"][0].startswith(f"{path}:2: not valid UTF-8")


def test_utf8_with_crlf_and_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\r\n").encode() + GOOD.replace("hi", "hé").encode())
    examples, _ = load_chat_data(path)
    assert [e["messages"][0]["content"] for e in examples] == ["hi", "hé"]
    path = tmp_path / "chat.data"  # no suffix: sniffed as a JSON list after the BOM
    path.write_bytes(b"\xef\xbb\xbf [" + GOOD.encode() + b"]")
    assert load_chat_data(path)[1]["format"] == "messages"


@pytest.mark.parametrize("kind", list(_readers()))
def test_a_directory_given_as_a_data_file_says_so(tmp_path, kind):
    read, _ = _readers()[kind]
    path = tmp_path / "data.jsonl"
    path.mkdir()
    with pytest.raises(ValueError, match=f"{path} is a directory, expected a file"):
        read(path)
