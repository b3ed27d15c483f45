from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_tokenizer():
    """A toy tokenizer trained on generated text (fast; no toy world needed)."""
    from posttrain.models.tokenizer import train_tokenizer

    texts = [
        f"Q: What is {a} plus {b}?\nA: {a + b}\nThe cat sat on mat number {a}."
        for a in range(10, 60)
        for b in (11, 23)
    ]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared datasets not found at {SHARED_DATA} (expected ../shared/data next to the project)"
        )
    return SHARED_DATA
