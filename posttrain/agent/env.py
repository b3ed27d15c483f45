"""Batched multi-turn tool-use episodes, with the token-level record that RL trains on.

    tools = toy_tools(world, ["lookup", "calculator"])
    trajs = run_episodes(model, tok, [[{"role": "user", "content": q}] for q in qs], tools,
                         SamplingParams(max_new_tokens=64), max_turns=4)
    trajs[0].final_answer, trajs[0].token_ids, trajs[0].action_mask, trajs[0].logprobs

Each turn decodes every conversation still going in one `generate` call; then the tool calls of
that turn run (one after the other, each time-limited), and the next turn decodes again all the
conversations that called a tool. A turn without a tool call is the final answer.

The token record and its invariant
----------------------------------
`token_ids` is exactly the sequence one forward pass would score to reproduce `logprobs`: each
turn's context is the previous contexts' tokens, as generated, plus the template's tokens. It is
built incrementally, never by re-rendering the whole conversation:
- the prompt: `apply_chat_template(messages, tools, add_generation_prompt=True)`, tokenised;
- each assistant turn: the generated ids as they came out (the stop token included), never the
  re-tokenised text: the model may have sampled a non-canonical tokenisation, or written a call
  with other spacing or key order than the template renders, and it is scored on what it sampled;
- after a turn with tool calls: the template's text from the end of that turn (after its
  end-of-turn marker, e.g. the "\n" after <|im_end|>) through the tool messages to the next
  assistant header, computed as the difference of two renderings: R(before + assistant) and
  R(before + assistant + tools, add_generation_prompt=True). It begins right after the
  end-of-turn token, a special token that tokenizers never merge across, so tokenised alone it
  gives the ids that tokenising the whole rendering gives there.
When the template's own rendering of an assistant turn would not tokenise to the generated ids
(the cases above, or a turn ended by eos rather than the template's marker), the generated ids
stay and the turn is counted in `render_mismatches`: re-rendering `messages` would then give
another sequence, fine for reading and for SFT, wrong as RL's record. A template that is not
append-only (a later rendering rewrites an earlier part, e.g. dropping past reasoning) cannot
meet the invariant: ValueError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from posttrain.agent.parse import ParsedTurn, parse_turn
from posttrain.agent.tools import Tool, ToolResult, call
from posttrain.generate.decode import Generation, generate
from posttrain.generate.sampling import SamplingParams

STOP_REASONS = ("answer", "max_turns", "max_new_tokens", "context")


@dataclass
class Trajectory:
    """One episode. token_ids, action_mask and logprobs are (T,) and aligned:
    action_mask[t] = 1 where the model generated token_ids[t] (stop tokens included), 0 on the
    prompt, template and tool-result tokens; logprobs[t] = the decoder's raw (temperature 1)
    log p(token_ids[t] | token_ids[:t]) where action_mask[t] = 1, else 0."""

    messages: list[dict]  # the conversation at the end, assistant and tool messages appended
    final_answer: str  # the last assistant turn's content (its text outside tool-call blocks)
    finished: bool  # ended with an answer: a complete assistant turn without a tool call
    truncated: bool  # not finished: stop_reason is max_turns, max_new_tokens or context
    stop_reason: str  # one of STOP_REASONS
    turns: int  # assistant turns
    n_tool_calls: int  # calls the model made, invalid ones and those of a truncated last turn too
    n_invalid_calls: int  # calls that could not run (parse.ToolCall.error): answered "error: ..."
    n_tool_errors: int  # valid calls whose tool failed (exception, timeout, flaky)
    render_mismatches: int  # turns the template would render to other tokens (module docstring)
    prompt_len: int  # tokens of the rendered prompt, before the first assistant turn
    token_ids: list[int] = field(repr=False)
    action_mask: list[int] = field(repr=False)
    logprobs: list[float] = field(repr=False)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per turn


class _Renderer:
    """The chat template, rendered to text or ids, with the tools in the system turn."""

    def __init__(self, tokenizer, tools: list[Tool]):
        from posttrain.models.tokenizer import end_of_turn_ids

        self.tok = tokenizer
        self.schemas = [t.schema() for t in tools] or None
        self.end_markers = [tokenizer.decode([i]) for i in end_of_turn_ids(tokenizer)]

    def text(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tools=self.schemas, tokenize=False,
                                            add_generation_prompt=generation_prompt)  # fmt: skip

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def assistant_turn(self, before: list[dict], assistant: dict,
                       generated: list[int]) -> tuple[str, int, bool]:  # fmt: skip
        """(a = R(before + assistant), the index in `a` just past the turn's end-of-turn marker,
        whether the template's text of the turn tokenises to the `generated` ids)."""
        p = self.text(before, True)
        a = self.text([*before, assistant], False)
        start = len(p) if a.startswith(p) else 0
        ends = [a.rfind(m, start) + len(m) for m in self.end_markers if a.rfind(m, start) >= 0]
        if not ends:
            raise ValueError(f"the chat template ends an assistant turn with none of the "
                             f"end-of-turn markers {self.end_markers}")  # fmt: skip
        end = max(ends)
        return a, end, a.startswith(p) and self.ids(a[len(p) : end]) == generated

    def continuation(self, before: list[dict], assistant: dict, tool_msgs: list[dict],
                     a: str, end: int) -> list[int]:  # fmt: skip
        """The template's ids from the end of the assistant turn (a[end:]) through the tool
        messages to the next assistant header."""
        b = self.text([*before, assistant, *tool_msgs], True)
        if not b.startswith(a):
            raise ValueError(
                "the chat template is not append-only: rendering the tool messages changed the "
                "text of the turns before them, so no single token sequence holds every turn's "
                "context (see posttrain/agent/env.py)"
            )
        return self.ids(a[end:] + b[len(a) :])


class _Episode:
    """An episode under way: its messages and its token record so far."""

    def __init__(self, messages: list[dict], prompt_ids: list[int]):
        self.messages = messages
        self.ids, self.prompt_len = list(prompt_ids), len(prompt_ids)
        self.mask, self.logps = [0] * len(prompt_ids), [0.0] * len(prompt_ids)
        self.spans: list[tuple[int, int]] = []
        self.counts = dict.fromkeys(
            ("n_tool_calls", "n_invalid_calls", "n_tool_errors", "render_mismatches"), 0
        )
        self.stop_reason: str | None = None
        self.final_answer = ""

    def add(self, ids: list[int], logps: list[float] | None = None) -> None:
        """Append generated ids with their logps (action tokens), or template ids (logps None)."""
        if logps is not None:
            self.spans.append((len(self.ids), len(self.ids) + len(ids)))
        self.ids += ids
        self.mask += [0 if logps is None else 1] * len(ids)
        self.logps += [0.0] * len(ids) if logps is None else list(logps)

    def end(self, reason: str, answer: str = "") -> None:
        self.stop_reason, self.final_answer = reason, answer

    def trajectory(self) -> Trajectory:
        return Trajectory(
            messages=self.messages, final_answer=self.final_answer,
            finished=self.stop_reason == "answer", truncated=self.stop_reason != "answer",
            stop_reason=self.stop_reason, turns=len(self.spans), prompt_len=self.prompt_len,
            token_ids=self.ids, action_mask=self.mask, logprobs=self.logps,
            turn_spans=self.spans, **self.counts,
        )  # fmt: skip


def _run_calls(parsed: ParsedTurn, tools: dict[str, Tool], time_limit_s: float):
    return [call(tools[c.name], c.arguments, time_limit_s) if c.valid
            else ToolResult(f"error: {c.error}", True) for c in parsed.tool_calls]  # fmt: skip


def _after_turn(ep: _Episode, gen: Generation, last_turn: bool, tools: dict[str, Tool],
                render: _Renderer, time_limit_s: float) -> None:  # fmt: skip
    """Record one generated turn; end the episode, or run its calls and add their messages and
    the template's tokens up to the next assistant header."""
    ep.add(gen.token_ids, gen.logprobs)
    if not gen.finished:  # cut at max_new_tokens: the turn is incomplete, its calls are not run
        ep.messages.append({"role": "assistant", "content": gen.text})
        return ep.end("max_new_tokens", gen.text)
    parsed = parse_turn(gen.text, tools)
    calls = parsed.tool_calls
    assistant = {"role": "assistant", "content": parsed.content}
    if calls:
        assistant["tool_calls"] = [c.message() for c in calls]
    before, ep.messages = ep.messages, [*ep.messages, assistant]
    a, end, same = render.assistant_turn(before, assistant, gen.token_ids)
    ep.counts["render_mismatches"] += not same
    ep.counts["n_tool_calls"] += len(calls)
    ep.counts["n_invalid_calls"] += sum(not c.valid for c in calls)
    if not calls or last_turn:
        return ep.end("max_turns" if calls else "answer", parsed.content)
    results = _run_calls(parsed, tools, time_limit_s)
    pairs = list(zip(calls, results, strict=True))
    ep.counts["n_tool_errors"] += sum(r.error and c.valid for c, r in pairs)
    tool_msgs = [{"role": "tool", "name": c.name, "content": r.content} for c, r in pairs]
    ep.messages += tool_msgs
    ep.add(render.continuation(before, assistant, tool_msgs, a, end))


def run_episodes(
    model,
    tokenizer,
    conversations: list[list[dict]],
    tools: list[Tool],
    params: SamplingParams,
    max_turns: int,
    time_limit_s: float = 5.0,
) -> list[Trajectory]:
    """One episode per conversation (messages ending with a user turn), in their order.

    Turn k decodes all open episodes in one `generate` call with seed params.seed + k. An
    episode ends with an answer (a turn without a tool call), at max_turns assistant turns (the
    calls of that last turn are recorded but not run), at a turn cut by max_new_tokens, or when
    its context plus max_new_tokens no longer fits the model (stop_reason "context")."""
    if max_turns < 1:
        raise ValueError(f"run_episodes: max_turns={max_turns} must be >= 1")
    by_name = {t.name: t for t in tools}
    if len(by_name) != len(tools):
        raise ValueError("run_episodes: tool names must be unique")
    render = _Renderer(tokenizer, list(tools))
    episodes = [
        _Episode(list(conv), render.ids(render.text(list(conv), True))) for conv in conversations
    ]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for turn in range(max_turns):
        live = [e for e in episodes if e.stop_reason is None]
        for e in live:
            if limit is not None and len(e.ids) + params.max_new_tokens > limit:
                e.end("context")
        live = [e for e in live if e.stop_reason is None]
        if not live:
            break
        turn_params = dataclasses.replace(params, seed=params.seed + turn)
        gens = generate(model, tokenizer, [e.ids for e in live], turn_params)
        for e, g in zip(live, gens, strict=True):
            _after_turn(e, g, turn == max_turns - 1, by_name, render, time_limit_s)
    return [e.trajectory() for e in episodes]
