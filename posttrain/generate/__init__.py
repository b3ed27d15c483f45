"""Batched sampling with a KV cache: one response per prompt, n per prompt, or from chats.

from posttrain.generate import SamplingParams, generate_chat
gens = generate_chat(model, tok, [[{"role": "user", "content": "hi"}]], SamplingParams())
gens[0].text, gens[0].token_ids, gens[0].logprobs, gens[0].finished
"""

from posttrain.generate.decode import Generation, generate, generate_chat, sample_n
from posttrain.generate.sampling import SamplingParams

__all__ = ["Generation", "SamplingParams", "generate", "generate_chat", "sample_n"]
