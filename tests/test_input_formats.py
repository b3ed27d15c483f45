"""Every data path takes JSONL, Parquet (a file or a folder of shards) and a `datasets`
save_to_disk folder, and the same records read the same from each (posttrain/data/tables.py)."""

import json
import sys

import pytest

from posttrain.data.preferences import load_feedback, load_pairs
from posttrain.data.readers import load_chat_data, load_prompts
from posttrain.data.schema import DataError
from posttrain.data.tables import MissingPyarrow, iter_records
from posttrain.data.text import read_texts

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _user(text):
    return {"role": "user", "content": text}


CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
OTHER_CALL = {"type": "function", "function": {"name": "now", "arguments": {"tz": "UTC"}}}

# Records of each kind, made so that Arrow must fill in nulls: fields that only some records
# (or messages, or tool calls) have.
RECORDS = {
    "messages": [
        {
            "messages": [
                _user("1+2?"),
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "3", "name": "add"},
                {"role": "assistant", "content": "3"},
            ],
            "id": "a",
        },  # fmt: skip
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                _user("time?"),
                {"role": "assistant", "content": "", "tool_calls": [OTHER_CALL]},
                {"role": "tool", "content": "noon"},
                {"role": "assistant", "content": "Noon."},
            ]
        },  # fmt: skip
        {"messages": [_user("hi"), {"role": "assistant", "content": "hello"}], "id": "c"},
    ],
    "alpaca": [
        {"instruction": "Add.", "input": "1 2", "output": "3"},
        {"instruction": "Greet.", "output": "Hello."},
        {"instruction": "Sum.", "input": "", "output": "0"},
    ],
    "sharegpt": [
        {
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
            "system": "Be brief.",
        },  # fmt: skip
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ],
    "hh": [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hi\n\nAssistant: go",
        },
        {
            "chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5",
        },
    ],
    "pairs": [
        {
            "prompt_id": "q1",
            "messages": [_user("2+2?")],
            "chosen": "4",
            "rejected": "5",
            "margin": 2.0,
            "annotator": "ann",
        },  # fmt: skip
        {
            "prompt_id": "q2",
            "messages": [{"role": "system", "content": "Be kind."}, _user("hi")],
            "chosen": "Hello!",
            "rejected": "Go.",
            "source": {"chosen": "a", "rejected": "b"},
        },  # fmt: skip
    ],
    "plain_pairs": [  # prompt_id from the file's stem and the record's number
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "3+3?", "chosen": "6", "rejected": "7"},
    ],
    "feedback": [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt_id": "x", "messages": [_user("3+3?")], "completion": "7", "label": False},
    ],
    "prompts": [
        {"prompt_id": "p1", "messages": [_user("2+2?")]},
        {"prompt": "3+3?"},
        {"prompt_id": "p3", "prompt": "4+4?", "family": "arith", "gold": {"answer": "8"}},
    ],
    "text": [{"text": "One document."}, {"text": "Another one."}],
}
READ = {
    "messages": lambda p: load_chat_data(p, "messages"),
    "alpaca": lambda p: load_chat_data(p, "alpaca"),
    "sharegpt": lambda p: load_chat_data(p, "sharegpt"),
    "hh": lambda p: (load_chat_data(p, "hh"), load_pairs(p, "hh")),
    "pairs": load_pairs,
    "plain_pairs": load_pairs,
    "feedback": load_feedback,
    "prompts": load_prompts,
    "text": read_texts,
}


def write_jsonl(folder, recs):
    folder.mkdir()
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder / "data.jsonl"


def table(recs):
    """A table with every field that any record has (from_pylist takes the first row's keys)."""
    return pa.Table.from_struct_array(pa.array(recs))


def write_parquet(folder, recs):
    folder.mkdir()
    pq.write_table(table(recs), folder / "data.parquet")
    return folder / "data.parquet"


@pytest.fixture(scope="module")
def datasets():
    mod = pytest.importorskip("datasets")
    mod.disable_progress_bars()
    return mod


def save_to_disk(datasets, folder, recs, **kw):
    """As a user's own dataset would be: every column that any record has (from_list would take
    only the first record's keys)."""
    keys = list(dict.fromkeys(k for r in recs for k in r))
    ds = datasets.Dataset.from_dict({k: [r.get(k) for r in recs] for k in keys})
    ds.save_to_disk(str(folder / "data"), **kw)
    return folder / "data"


@pytest.mark.parametrize("kind", list(RECORDS))
def test_jsonl_parquet_and_save_to_disk_read_the_same(tmp_path, datasets, kind):
    recs = RECORDS[kind]
    jsonl = READ[kind](write_jsonl(tmp_path / "j", recs))
    assert READ[kind](write_parquet(tmp_path / "p", recs)) == jsonl
    (tmp_path / "d").mkdir()
    assert READ[kind](save_to_disk(datasets, tmp_path / "d", recs)) == jsonl


def test_chat_format_is_detected_from_the_first_row(tmp_path, datasets):
    for kind in ("messages", "alpaca", "sharegpt", "hh"):
        path = write_parquet(tmp_path / kind, RECORDS[kind])
        assert load_chat_data(path)[1]["format"] == kind
    path = write_parquet(tmp_path / "pairs", RECORDS["pairs"])
    assert load_pairs(path) == load_pairs(write_jsonl(tmp_path / "pj", RECORDS["pairs"]))


def test_a_row_comes_out_as_its_json_line(tmp_path):
    """Lists of structs as lists of dicts, a struct field another row added left out, nulls in
    lists kept as None."""
    recs = [{"a": [{"x": 1}, {"x": 2, "y": "s"}], "n": [1, None]}, {"a": [], "b": True}]
    rows = list(iter_records(write_parquet(tmp_path / "p", recs)))
    assert [r for _, r in rows] == recs
    assert [w for w, _ in rows] == [f"{tmp_path}/p/data.parquet:row {i}" for i in (1, 2)]


def test_a_bad_row_names_the_file_and_the_row(tmp_path, datasets):
    recs = [*RECORDS["messages"], {"messages": [{"role": "bot", "content": "x"}]}]
    path = write_parquet(tmp_path / "p", recs)
    with pytest.raises(DataError, match=rf"^{path}:row 4: message 0: unknown role 'bot'"):
        load_chat_data(path, "messages")
    _, stats = load_chat_data(path, "messages", on_error="skip")
    assert (stats["kept"], stats["skipped"]) == (3, 1)
    bad = [RECORDS["pairs"][0], {"prompt_id": "q", "messages": [_user("x")], "chosen": "a"}]
    (tmp_path / "d").mkdir()
    path = save_to_disk(datasets, tmp_path / "d", bad)
    shard = path / "data-00000-of-00001.arrow"
    with pytest.raises(DataError, match=rf"^{shard}:row 2: missing field 'rejected'"):
        load_pairs(path, "pairs")


def test_shards_are_read_in_order_and_numbered_across_the_dataset(tmp_path, datasets):
    recs = [{"prompt": f"{i}+1?", "chosen": str(i + 1), "rejected": "no"} for i in range(6)]
    want, _ = load_pairs(write_jsonl(tmp_path / "j", recs))
    (tmp_path / "d").mkdir()
    path = save_to_disk(datasets, tmp_path / "d", recs, num_shards=2)
    assert len(list(path.glob("*.arrow"))) == 2
    got, _ = load_pairs(path)
    assert got == want  # prompt ids data/1 .. data/6: numbered over both shards
    shards = tmp_path / "pq" / "data"
    shards.mkdir(parents=True)
    for k in range(3):
        pq.write_table(table(recs[2 * k : 2 * k + 2]), shards / f"part-{k}.parquet")
    assert load_pairs(shards)[0] == want
    wheres = [w for w, _ in iter_records(shards)]
    assert wheres[2] == f"{shards}/part-1.parquet:row 1"


def test_a_dataset_dict_folder_asks_for_one_split(tmp_path, datasets):
    ds = datasets.Dataset.from_list(RECORDS["alpaca"])
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict \(splits: test, train\): point the path "
                                         rf"at the folder of the split to read, e.g. {tmp_path}/dd/train"):  # fmt: skip
        load_chat_data(tmp_path / "dd")
    examples, _ = load_chat_data(tmp_path / "dd" / "train")
    assert len(examples) == 3


def test_a_folder_of_several_splits_parquet_shards_is_refused(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        pq.write_table(table(RECORDS["text"]), folder / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"shards of several splits \(test, train\)"):
        read_texts(folder)


@pytest.mark.parametrize(
    "read", [load_chat_data, load_pairs, load_feedback, load_prompts, read_texts]
)
def test_a_hub_dataset_name_says_nothing_is_downloaded(tmp_path, monkeypatch, read):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        read("Anthropic/hh-rlhf")
    msg = str(e.value)
    assert "looks like a Hugging Face Hub dataset name; posttrain downloads nothing" in msg
    assert "datasets.load_dataset('Anthropic/hh-rlhf', split='train').save_to_disk('DIR')" in msg
    assert "point data.path" in msg and str(tmp_path / "Anthropic" / "hh-rlhf") in msg


def test_a_missing_path_is_named_as_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # "data/" exists: "data/chat" is a missing path, no Hub name
    for name in ("data/chat", "chat.parquet"):
        with pytest.raises(FileNotFoundError, match=f"not found: {name} \\(resolved: {tmp_path}/{name}\\)"):  # fmt: skip
            load_chat_data(name)


def test_without_pyarrow_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "p", RECORDS["text"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    with pytest.raises(MissingPyarrow, match=r"needs pyarrow: pip install 'posttrain\[data\]'"):
        read_texts(path)
    with pytest.raises(ValueError, match="posttrain\\[data\\]"):  # the CLI's plain error
        load_pairs(path, "pairs")
    assert read_texts(write_jsonl(tmp_path / "j", RECORDS["text"])) == [  # JSONL needs none
        "One document.",
        "Another one.",
    ]


def test_prompts_read_as_the_sample_stage_reads_them(tmp_path):
    from posttrain.stages.sample import load_prompts as sample_load_prompts

    path = write_jsonl(tmp_path / "j", RECORDS["prompts"])
    assert load_prompts(path) == sample_load_prompts(path)
    assert load_prompts(path, limit=2) == sample_load_prompts(path, limit=2)


def test_a_hub_name_in_a_pipeline_says_nothing_is_downloaded(run_tiny):
    import yaml

    for extra, what in (({"sft": {"data": {"path": "someorg/somedata"}}}, "save_to_disk"),
                        ({"sft": {"model": "someorg/somemodel"}}, "save_pretrained")):  # fmt: skip
        with pytest.raises(FileNotFoundError, match=what) as err:
            run_tiny(["world", "pretrain", "sft"], yaml.safe_dump(extra))
        assert "download" in str(err.value)
