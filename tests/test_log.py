import io
import json

from posttrain.log import Logger


def test_plain_progress_lines_and_namespaced_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")  # force plain lines
    stream = io.StringIO()
    log = Logger(every=2, stream=stream)
    steps = log.progress("pretrain", 4, tmp_path)
    steps.begin(0)
    for s in range(1, 5):
        steps.log(s, {"train/loss": 2.0 / s, "train/lr": 3e-4, "train/tokens_per_s": 12345.6})
    steps.close()
    lines = stream.getvalue().splitlines()
    # step 1 (first), 2 and 4 (every 2; last)
    assert [ln.split(" |")[0] for ln in lines] == [
        "pretrain step 1/4",
        "pretrain step 2/4",
        "pretrain step 4/4",
    ]
    assert "loss 1 | lr 3.00e-04 | tok/s 12,346 | eta " in lines[1]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["train/loss"] == 2.0


def test_begin_drops_metrics_after_a_resume_point(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    log = Logger(stream=io.StringIO())
    steps = log.progress("s", 10, tmp_path)
    for s in range(1, 7):
        steps.log(s, {"train/loss": 1.0})
    steps = log.progress("s", 10, tmp_path)
    steps.begin(4)
    steps.log(5, {"train/loss": 0.5})
    assert [
        json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2, 3, 4, 5]


def test_tensorboard_event_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    log = Logger(stream=io.StringIO(), tensorboard=True)
    steps = log.progress("s", 2, tmp_path)
    steps.log(1, {"train/loss": 1.0})
    steps.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_every_field_of_a_progress_line_has_its_own_label(tmp_path, monkeypatch):
    """SFT's training and held-out losses, and an RL step's sampling and update speeds, read
    differently: no line says `loss ... | loss ...` or `tok/s ... | tok/s ...`."""
    from posttrain.log import shown_fields

    sft = {"train/loss": 9.013, "train/lr": 1e-3, "train/tokens_per_s": 1234.5, "eval/loss": 8.98}
    assert shown_fields(sft) == [("loss", "9.013"), ("lr", "1.00e-03"), ("tok/s", "1,234"),
                                 ("val loss", "8.98")]  # fmt: skip
    grpo = {"reward/mean": 0.5, "policy/loss": 0.1, "rollout/tokens_per_s": 38.0,
            "train/tokens_per_s": 122.0}  # fmt: skip
    assert [label for label, _ in shown_fields(grpo)] == ["policy loss", "gen tok/s",
                                                           "train tok/s"]  # fmt: skip
    ppo = grpo | {"value/loss": 0.2}
    labels = [label for label, _ in shown_fields(ppo)]
    assert len(labels) == len(set(labels)) and "value loss" in labels
    monkeypatch.setenv("CI", "true")
    stream = io.StringIO()
    steps = Logger(stream=stream).progress("grpo", 1, tmp_path)
    steps.log(1, grpo)
    assert "| policy loss 0.1 | gen tok/s 38 | train tok/s 122 |" in stream.getvalue()
