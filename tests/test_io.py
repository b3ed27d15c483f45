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


# ---------------------------------------------------------------- a full disk
# The errors a full disk raises through each writer: open/write, torch.save's C++ stream writer,
# safetensors (what save_pretrained writes weights with).
def _disk_full_errors():
    import errno

    from safetensors import SafetensorError

    return [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1216 vs 1114"),
        SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
            'message: "No space left on device" })'
        ),
    ]


@pytest.mark.parametrize("error", _disk_full_errors(), ids=["oserror", "torch", "safetensors"])
def test_disk_full_is_a_clear_error_naming_the_file_with_no_temp_left(tmp_path, error):
    from posttrain.io import DiskFullError

    p = tmp_path / "step_0000003.pt"
    with pytest.raises(DiskFullError) as info:
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise error
    msg = str(info.value)
    assert msg.startswith(f"no space left on device while writing {p}; free space")
    assert "--resume" in msg
    assert isinstance(info.value, ValueError)  # the command line: exit 2, "posttrain: error: "
    assert info.value.__cause__ is error
    assert os.listdir(tmp_path) == []
    d = tmp_path / "model"
    with pytest.raises(DiskFullError, match=f"while writing {d};"):
        with atomic_dir(d) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise error
    assert os.listdir(tmp_path) == []


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(RuntimeError, match="^boom$"):
        with atomic_path(tmp_path / "a.pt"):
            raise RuntimeError("boom")
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "a.pt"):
            raise PermissionError(13, "Permission denied")


def test_disk_full_in_save_model_keeps_the_previous_model(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import posttrain.io
    from posttrain.io import DiskFullError
    from posttrain.models.load import save_model

    class Model:
        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, out, safe_serialization=True):
            (out / "model.safetensors").write_bytes(b"weights")
            if self.fail:
                raise SafetensorError("Error while serializing: I/O error: No space left on device")

    save_model(Model(fail=False), None, tmp_path / "model")
    with pytest.raises(DiskFullError, match=f"while writing {tmp_path / 'model'}; free space"):
        save_model(Model(fail=True), None, tmp_path / "model")
    assert os.listdir(tmp_path) == ["model"]
    assert (tmp_path / "model/model.safetensors").read_bytes() == b"weights"
    # a full disk when the previous version is already set aside: it is put back
    real = posttrain.io.os.replace
    calls = []

    def replace(src, dst):
        calls.append(1)
        if len(calls) == 2:  # the new folder onto "model"
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(posttrain.io.os, "replace", replace)
    with pytest.raises(DiskFullError):
        save_model(Model(fail=False), None, tmp_path / "model")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model"]


def test_append_jsonl_cut_short_by_a_full_disk_leaves_whole_lines(tmp_path, monkeypatch):
    import posttrain.io
    from posttrain.io import DiskFullError, append_jsonl

    p = tmp_path / "metrics.jsonl"
    append_jsonl(p, {"step": 1})
    real = posttrain.io.os.write
    monkeypatch.setattr(posttrain.io.os, "write", lambda fd, data: real(fd, data[:5]))
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        append_jsonl(p, {"step": 2})
    monkeypatch.undo()
    assert read_jsonl(p) == [{"step": 1}]


# ---------------------------------------------------------------- leftovers of killed writes


def test_clean_stale_temps_removes_only_atomic_leftovers(tmp_path):
    from posttrain.io import clean_stale_temps

    leftovers = [".step_0000004.pt.k2x_9abc.tmp", ".result.json.abcdefgh.tmp"]
    for name in leftovers + ["step_0000002.pt", ".hidden", "notes.tmp", ".x.tmp"]:
        (tmp_path / name).write_text("x")
    for name in (".model.a1b2c3d4.tmp", ".model.zz9_zz9z.old", "model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_text("x")
    (tmp_path / ".tokenizer.abcdefgh.tmp").mkdir()
    assert {p.name for p in clean_stale_temps(tmp_path, "model")} == {
        ".model.a1b2c3d4.tmp",
        ".model.zz9_zz9z.old",
    }
    removed = {p.name for p in clean_stale_temps(tmp_path)}
    assert removed == set(leftovers) | {".tokenizer.abcdefgh.tmp"}
    assert sorted(os.listdir(tmp_path)) == [".hidden", ".x.tmp", "model", "notes.tmp",
                                            "step_0000002.pt"]  # fmt: skip
    assert clean_stale_temps(tmp_path / "missing") == []


def test_a_sigkilled_write_leaves_a_temp_that_clean_stale_temps_matches(tmp_path):
    # The names mkstemp / mkdtemp really give, not the test's guesses.
    import tempfile

    from posttrain.io import clean_stale_temps

    fd, _ = tempfile.mkstemp(prefix=".step_0000004.pt.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    tempfile.mkdtemp(prefix=".model.", suffix=".tmp", dir=tmp_path)
    tempfile.mkdtemp(prefix=".model.", suffix=".old", dir=tmp_path)
    assert len(clean_stale_temps(tmp_path)) == 3
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- modes follow the umask


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])  # fmt: skip
def test_artifacts_get_the_modes_of_the_umask(tmp_path, umask, file_mode, dir_mode):
    import stat

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "result.json", {"a": 1})
        with atomic_path(tmp_path / "step_0000001.pt") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)

    def mode(name):
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("result.json") == mode("step_0000001.pt") == file_mode
    assert mode("model") == dir_mode
    assert mode("model/config.json") == file_mode


# ---------------------------------------------------------------- what a reader is given


def test_read_jsonl_names_file_line_and_byte_offset_of_bytes_not_utf8(tmp_path):
    p = tmp_path / "x.jsonl"
    # Latin-1 e-acute: line 2 starts at byte 9, and '{"a": "caf' is 10 bytes long -> byte 19.
    p.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte "
                                         r"offset 19\); .*re-encode the file as UTF-8"):  # fmt: skip
        read_jsonl(p)


def test_read_jsonl_of_a_directory_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"d\.jsonl is a directory, expected a file"):
        (tmp_path / "d.jsonl").mkdir()
        read_jsonl(tmp_path / "d.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_read_jsonl_reads_crlf_and_a_byte_order_mark(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": "\xc3\xa9"}\r\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": "é"}]
