"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""

import importlib.util
from pathlib import Path


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]
