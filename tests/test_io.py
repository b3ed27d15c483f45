import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from posttrain.io import (
    atomic_dir,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    hash_path,
    read_jsonl,
)


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_exception_mid_write_leaves_no_final_file_and_no_temp(tmp_path):
    p = tmp_path / "result.json"
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("killed")
    assert not p.exists()
    assert os.listdir(tmp_path) == []


def test_exception_keeps_previous_version(tmp_path):
    p = tmp_path / "result.json"
    atomic_write_json(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("garbage")
            raise RuntimeError
    assert json.loads(p.read_text()) == {"v": 1}


def test_sigkill_mid_write_leaves_no_file_under_final_name(tmp_path):
    # A child process streams a large file through atomic_path and is SIGKILLed half-way.
    final = tmp_path / "big.txt"
    code = textwrap.dedent(f"""
        import sys, time
        from posttrain.io import atomic_path
        with atomic_path({str(final)!r}) as tmp:
            with open(tmp, "w") as f:
                for i in range(10**6):
                    f.write("x" * 100 + "\\n")
                    if i == 1000:
                        f.flush(); print("writing", flush=True)
                        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    time.sleep(0.05)
    assert not final.exists()
    leftovers = os.listdir(tmp_path)
    assert all(name.startswith(".big.txt.") for name in leftovers)  # only the temp name


def test_atomic_dir_replaces_existing_and_cleans_on_error(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "w.bin").write_text("1")
    with atomic_dir(d) as tmp:
        (tmp / "w.bin").write_text("2")
    assert (d / "w.bin").read_text() == "2"
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            (tmp / "w.bin").write_text("3")
            raise ValueError
    assert (d / "w.bin").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: malformed JSON"):
        read_jsonl(p)


def test_hash_path_changes_with_content(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "f").write_text("a")
    h1 = hash_path(d)
    assert hash_path(d) == h1
    (d / "f").write_text("b")
    assert hash_path(d) != h1
    with pytest.raises(FileNotFoundError):
        hash_path(tmp_path / "missing")
