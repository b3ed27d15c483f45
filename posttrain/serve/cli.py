"""`posttrain serve MODEL_DIR [--host --port --name --device --dtype --max-batch ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server for a model directory",
                       description="Serve MODEL_DIR with the OpenAI API (chat, completions, "
                       "streaming); concurrent requests decode in batches.")  # fmt: skip
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a save_pretrained folder (config.json, "
                   "weights, tokenizer files), or a stage folder holding model/")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model id clients ask for (default: the folder's name)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-batch", type=int, default=32,
                   help="most requests (conversations or prompts) decoded together")  # fmt: skip
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests once one has arrived")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=256,
                   help="a chat reply's max_tokens when the request gives none (capped by the "
                   "model's context)")  # fmt: skip


def resolve_model_dir(path: str | Path) -> Path:
    """`path` if it is a model directory, else its model/ (a stage folder); else a
    FileNotFoundError naming `path`."""
    from posttrain.models.load import check_model_dir

    path = Path(path)
    if (path / "model" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "model"
    return check_model_dir(path)


def main(args: argparse.Namespace) -> int:
    import socket

    import torch

    model_dir = resolve_model_dir(args.model_dir)  # before anything slow: a bad path exits 2
    if args.max_batch < 1 or args.batch_wait_ms < 0 or args.max_tokens < 1:
        raise ValueError("--max-batch and --max-tokens must be >= 1, --batch-wait-ms >= 0")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"posttrain serve needs the 'serve' extra ({e.name} is missing): "
                         "pip install -e '.[serve]'") from None  # fmt: skip
    with socket.socket() as s:  # a port in use: say so before loading the model
        try:
            s.bind((args.host, args.port))
        except OSError as e:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    from posttrain.models.load import load_model, resolve_device
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.serve.app import create_app
    from posttrain.serve.engine import Engine

    name = args.name or Path(args.model_dir).resolve().name
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tokenizer = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir, device, dtype), tokenizer, args.max_batch,
                    args.batch_wait_ms)  # fmt: skip
    app = create_app(engine, name, args.max_tokens)
    print(f"serving {model_dir} as {name!r} on {device} ({args.dtype})")
    print(f"OpenAI API at http://{args.host}:{args.port}/v1  (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning"))  # fmt: skip
    try:
        server.run()  # Ctrl-C / SIGTERM: a graceful shutdown, open requests finished
    except KeyboardInterrupt:  # uvicorn raises the signal it handled again once it has stopped
        pass
    finally:
        engine.close()
    print("posttrain serve: stopped")
    return 0
