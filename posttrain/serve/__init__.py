"""`posttrain serve MODEL_DIR`: an OpenAI-compatible server for a model directory.

    engine = Engine(model, tokenizer, max_batch=32, batch_wait_ms=5)  # the thread owning the model
    app = create_app(engine, "my-model")                               # FastAPI: /v1/chat/completions, ...

Concurrent requests decode together (engine.py); replies are those of
`posttrain.generate.requests.run_requests` on the same model, so a client of the server and
the model loaded in-process agree for the same seed. fastapi is imported by app.py only.
"""

from posttrain.serve.engine import Engine
from posttrain.serve.protocol import APIError

__all__ = ["APIError", "Engine"]
