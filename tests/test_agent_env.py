"""Multi-turn tool-use episodes with a real tiny model whose turns are forced by a logit bias:
the token record built by hand (which tokens are actions), malformed calls, max_turns, batching,
and the invariant RL relies on: one forward pass over token_ids reproduces logprobs on every
action token, with the static and the hf decoding engines."""

import pytest
import torch

import posttrain.agent.env as env_mod
from posttrain.agent import Tool, run_episodes
from posttrain.generate import SamplingParams

SQUARE = Tool(
    "square",
    "Square an integer.",
    {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    lambda x: x * x,
)
USER = [{"role": "user", "content": "What is 3 squared plus 4 squared?"}]


def call_text(x, name="square") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"x": {x}}}}}\n</tool_call>'


TWO_CALLS = call_text(3) + "\n" + call_text(4)  # exactly as the template renders two calls
COMPACT = '<tool_call>{"name":"square","arguments":{"x":3}}</tool_call>'  # not the template's
MALFORMED = call_text('"three"') + "\n" + "<tool_call>\n{not json}\n</tool_call>"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(small_tokenizer):
    """toy-xs with sharp random weights (as helpers.sharp_toy_model), room for 1024 tokens."""
    from helpers import sharp_toy_model

    return sharp_toy_model(small_tokenizer, 0.1, positions=1024)


class Force:
    """Forces scripted turns through a logit bias that is a pure function of the context, so
    that a forward over a whole sequence gives the same logits as the cached decoder:
    +strength on `plan[(position, token)]`, the scripted next token after `token` at
    `position`, and +end_bias on <|im_end|> everywhere (unscripted turns end soon). The ids and
    positions come from pre-hooks on the embedding and the rotary embedding, which both engines
    and the plain forward call."""

    def __init__(self, model, tok, strength=30.0, end_bias=4.0):
        self.tok, self.strength, self.plan = tok, strength, {}
        self.end = torch.zeros(len(tok))
        self.end[tok.convert_tokens_to_ids("<|im_end|>")] = end_bias
        body = model.model
        self.handles = [
            body.embed_tokens.register_forward_pre_hook(self._ids),
            body.rotary_emb.register_forward_pre_hook(self._positions, with_kwargs=True),
            model.lm_head.register_forward_hook(self._bias),
        ]

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def script(self, context: list[int], text: str) -> list[int]:
        """Plan `text` + <|im_end|> as the turn that follows `context`; returns its ids."""
        turn = self.ids(text) + [self.tok.convert_tokens_to_ids("<|im_end|>")]
        seq = context + turn
        for j, nxt in enumerate(turn):
            at = len(context) - 1 + j
            assert self.plan.setdefault((at, seq[at]), nxt) == nxt, "conflicting scripts"
        return turn

    def _ids(self, module, args):
        self._cur = args[0]

    def _positions(self, module, args, kwargs):
        self._pos = args[1] if len(args) > 1 else kwargs["position_ids"]

    def _bias(self, module, args, out):
        q = out.shape[1] if out.dim() == 3 else 1
        ids = self._cur[:, -q:].tolist()
        pos = self._pos.expand(self._cur.shape)[:, -q:].tolist()
        bias = self.end.to(out).repeat(len(ids), q, 1)  # (b, q, V)
        for b, (row_ids, row_pos) in enumerate(zip(ids, pos, strict=True)):
            for i, key in enumerate(zip(row_pos, row_ids, strict=True)):
                if key in self.plan:
                    bias[b, i, self.plan[key]] += self.strength
        return out + bias.view(out.shape)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def force(model, small_tokenizer):
    f = Force(model, small_tokenizer)
    yield f
    f.remove()


def prompt_ids(tok, conv, tools=(SQUARE,)):
    return tok.apply_chat_template(conv, tools=[t.schema() for t in tools], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)  # fmt: skip


def tool_turns(*contents) -> str:
    """The template's text after an assistant turn's <|im_end|> up to the next header."""
    body = "".join(f"\n<|im_start|>tool\n{c}<|im_end|>" for c in contents)
    return body + "\n<|im_start|>assistant\n"


GREEDY = SamplingParams(max_new_tokens=120, greedy=True)


def test_two_call_trajectory_by_hand(model, small_tokenizer, force):
    tok = small_tokenizer
    prompt = prompt_ids(tok, USER)
    s1 = force.script(prompt, TWO_CALLS)
    between = force.ids(tool_turns(9, 16))  # 3 squared, 4 squared
    s2 = force.script(prompt + s1 + between, "25")
    [t] = run_episodes(model, tok, [USER], [SQUARE], GREEDY, max_turns=3)

    assert t.token_ids == prompt + s1 + between + s2
    # Actions: the two generated turns, each with its <|im_end|>; not the prompt, not the "\n"
    # after <|im_end|>, not the tool turns, not the next assistant header.
    P, A1, B, A2 = len(prompt), len(s1), len(between), len(s2)
    assert t.action_mask == [0] * P + [1] * A1 + [0] * B + [1] * A2
    assert t.turn_spans == [(P, P + A1), (P + A1 + B, P + A1 + B + A2)]
    assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.action_mask, strict=True) if not m)
    assert (t.finished, t.truncated, t.stop_reason, t.final_answer) == (True, False, "answer", "25")
    assert (t.turns, t.n_tool_calls, t.n_invalid_calls, t.n_tool_errors) == (2, 2, 0, 0)
    calls = [{"type": "function", "function": {"name": "square", "arguments": {"x": x}}}
             for x in (3, 4)]  # fmt: skip
    assert t.messages == [
        *USER,
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "name": "square", "content": "9"},
        {"role": "tool", "name": "square", "content": "16"},
        {"role": "assistant", "content": "25"},
    ]
    # The model wrote its turns as the template renders them, so re-rendering the messages gives
    # the same tokens (plus the "\n" the template puts after the last <|im_end|>).
    assert t.render_mismatches == 0
    rendered = tok.apply_chat_template(t.messages, tools=[SQUARE.schema()], tokenize=True,
                                       return_dict=False)  # fmt: skip
    assert rendered == t.token_ids + force.ids("\n")


def test_malformed_calls_get_error_messages_and_the_episode_goes_on(model, small_tokenizer, force):
    tok = small_tokenizer
    prompt = prompt_ids(tok, USER)
    s1 = force.script(prompt, MALFORMED)
    [t] = run_episodes(model, tok, [USER], [SQUARE], GREEDY, max_turns=3)
    errors = [
        "error: square: argument 'x' must be integer, got \"three\" (string)",
        "error: tool call is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
    ]
    assert [m["content"] for m in t.messages[2:4]] == errors
    assert [m["role"] for m in t.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    between = force.ids(tool_turns(*errors))
    assert t.token_ids[: len(prompt) + len(s1) + len(between)] == prompt + s1 + between
    assert (t.n_tool_calls, t.n_invalid_calls, t.n_tool_errors, t.turns) == (2, 2, 0, 2)
    assert t.finished and t.stop_reason == "answer"  # the free second turn answered


@pytest.mark.parametrize("max_turns", [1, 2])
def test_max_turns_truncates(model, small_tokenizer, force, max_turns):
    tok = small_tokenizer
    prompt = prompt_ids(tok, USER)
    s1 = force.script(prompt, TWO_CALLS)
    between = force.ids(tool_turns(9, 16))
    s2 = force.script(prompt + s1 + between, call_text(5))  # calls again instead of answering
    [t] = run_episodes(model, tok, [USER], [SQUARE], GREEDY, max_turns=max_turns)
    assert (t.finished, t.truncated, t.stop_reason, t.turns) == (
        False,
        True,
        "max_turns",
        max_turns,
    )
    # The last turn's calls are recorded, not run: no tool message, no template tokens after it.
    assert t.messages[-1]["role"] == "assistant" and t.messages[-1]["tool_calls"]
    if max_turns == 1:
        assert t.token_ids == prompt + s1 and t.n_tool_calls == 2
    else:
        assert t.token_ids == prompt + s1 + between + s2 and t.n_tool_calls == 3
    assert t.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and t.action_mask[-1] == 1


def test_a_context_that_no_longer_fits_ends_the_episode(model, small_tokenizer, force):
    tok = small_tokenizer
    prompt = prompt_ids(tok, USER)
    s1 = force.script(prompt, TWO_CALLS)
    between = force.ids(tool_turns(9, 16))
    # Turn 1 fits the 1024 positions (prompt + 700), turn 2 would not (prompt + s1 + tools + 700).
    assert len(prompt) + 700 <= 1024 < len(prompt + s1 + between) + 700
    params = SamplingParams(max_new_tokens=700, greedy=True)
    [t] = run_episodes(model, tok, [USER], [SQUARE], params, max_turns=3)
    assert (t.stop_reason, t.truncated, t.turns) == ("context", True, 1)
    assert t.token_ids == prompt + s1 + between and t.messages[-1]["role"] == "tool"


def test_a_call_written_unlike_the_template_keeps_its_generated_tokens(
    model, small_tokenizer, force
):
    tok = small_tokenizer
    prompt = prompt_ids(tok, USER)
    s1 = force.script(prompt, COMPACT)
    between = force.ids(tool_turns(9))
    s2 = force.script(prompt + s1 + between, "9")
    [t] = run_episodes(model, tok, [USER], [SQUARE], GREEDY, max_turns=3)
    assert t.token_ids == prompt + s1 + between + s2  # as generated, not as the template writes
    assert t.messages[1]["tool_calls"][0]["function"] == {"name": "square", "arguments": {"x": 3}}
    assert t.render_mismatches == 1  # re-rendering the messages gives other tokens for turn 1
    rendered = tok.apply_chat_template(t.messages, tools=[SQUARE.schema()], tokenize=True,
                                       return_dict=False)  # fmt: skip
    assert rendered != t.token_ids + force.ids("\n")


def recomputed_logps(model, t) -> torch.Tensor:
    """log p(token_ids[i] | token_ids[:i]) from one uncached forward, at the action tokens."""
    seq = torch.tensor([t.token_ids])  # (1, T)
    with torch.no_grad():
        logps = torch.log_softmax(model(seq).logits[0].float(), dim=-1)  # (T, V)
    targets = seq[0, 1:, None]  # (T - 1, 1)
    per_token = torch.cat([torch.zeros(1), logps[:-1].gather(-1, targets).squeeze(-1)])  # (T,)
    return per_token[torch.tensor(t.action_mask, dtype=torch.bool)]


@pytest.mark.parametrize("engine", ["auto", "hf"])
def test_one_forward_pass_reproduces_the_logprobs(
    model, small_tokenizer, force, monkeypatch, engine
):
    """A batch of four episodes sampled at temperature 1: two valid calls then a free answer,
    malformed calls, a direct free answer, and a call written unlike the template (a render
    mismatch: its generated tokens stay). Every turn is one batched generate call."""
    tok = small_tokenizer
    filler = " The cat sat on mat number 12." * 10  # spaces the scripts' positions apart
    users = [USER, [{"role": "user", "content": "The cat sat."}],
             [{"role": "user", "content": "Square 3." + filler}],
             [{"role": "user", "content": "Square three." + filler * 2}]]  # fmt: skip
    prompts = [prompt_ids(tok, u) for u in users]
    s1 = force.script(prompts[0], TWO_CALLS)
    compact = force.script(prompts[2], COMPACT)
    force.script(prompts[3], MALFORMED)
    batches = []
    real = env_mod.generate
    monkeypatch.setattr(env_mod, "generate", lambda m, t, p, sp: batches.append(len(p))
                        or real(m, t, p, sp))  # fmt: skip
    params = SamplingParams(max_new_tokens=120, seed=3, engine=engine)
    trajs = run_episodes(model, tok, users, [SQUARE], params, max_turns=3)

    assert [t.n_tool_calls for t in trajs] == [2, 0, 1, 2]
    assert batches[:2] == [4, 3]  # all four, then the three that called a tool, together
    assert trajs[2].render_mismatches >= 1  # the compact call (and maybe a sampled answer)
    assert trajs[2].token_ids[len(prompts[2]) :][: len(compact)] == compact
    assert trajs[0].token_ids[: len(prompts[0]) + len(s1)] == prompts[0] + s1
    for t in trajs:
        assert len(t.token_ids) == len(t.action_mask) == len(t.logprobs)
        recorded = torch.tensor([lp for lp, m in zip(t.logprobs, t.action_mask, strict=True) if m])
        assert torch.allclose(recomputed_logps(model, t), recorded, atol=1e-4, rtol=0)
        free = recorded[recorded < -1e-3]  # not forced: the check is not only on ~0 values
        assert t.turns < 2 or len(free) > 0
