"""`posttrain data generate self-instruct|answers`: SFT data written by a teacher model.

    posttrain data generate self-instruct --teacher runs/big/sft/model \\
        --seeds ../shared/data/self-instruct/seed_tasks.jsonl --num 200 --out data/si.jsonl
    posttrain data generate answers --teacher http://127.0.0.1:8000/v1 --teacher-model big \\
        --prompts prompts.jsonl --n 4 --verifier world --keep best --out data/distill.jsonl

A teacher (or judge) is a local model directory or an OpenAI-compatible base URL (then
--teacher-model names the served model, --api-key-env the variable holding the key). Every
setting of the generator can also come from --config FILE (YAML) and dotted KEY=VALUE
overrides (`posttrain data generate self-instruct --config si.yaml num_instructions=50`);
flags win over the file. Replies are cached under --cache (default `<out>.cache/`), so a rerun
of the same settings asks the teacher nothing again.
"""

from __future__ import annotations

from pathlib import Path


def client_spec(target: str, model: str | None, key_env: str | None) -> dict:
    """A client config from a command line: a URL (with the served model's name) or a path."""
    if target.startswith(("http://", "https://")):
        spec = {"url": target.rstrip("/"), "model": model or "default"}
        return spec | ({"api_key_env": key_env} if key_env else {})
    if model or key_env:
        raise ValueError(f"{target}: --*-model and --api-key-env go with a URL, not a local model")
    return {"path": target}


def add_parser(data_sub) -> None:
    gen = data_sub.add_parser(
        "generate", help="SFT data from a teacher model: self-instruct, answers"
    )
    kinds = gen.add_subparsers(dest="generator", required=True)
    si = kinds.add_parser("self-instruct", help="new instructions and answers from seed tasks")
    si.add_argument("--seeds", help="seed tasks JSONL ({instruction} or chat records)")
    si.add_argument("--num", type=int, help="new instructions to keep (num_instructions)")
    si.add_argument("--mode", choices=["chat", "completion"], help="how the teacher is asked")
    si.add_argument("--answerer", help="model that answers (default: the teacher)")
    si.add_argument("--answerer-model", help="served name of the answerer (with a URL)")
    ans = kinds.add_parser("answers", help="a teacher answers prompts (rejection sampling)")
    ans.add_argument("--prompts", help="prompts file ({messages} or {prompt} records)")
    ans.add_argument("--n", type=int, help="answers sampled per prompt")
    ans.add_argument("--judge", help="an LLM judge scores the answers: model dir or URL")
    ans.add_argument("--judge-model", help="served name of the judge (with a URL)")
    ans.add_argument("--reward-model", help="a reward model directory scores the answers")
    ans.add_argument("--verifier", choices=["world", "gsm8k"], help="a verifier scores them 1/0")
    ans.add_argument("--keep", choices=["best", "all", "passing"], help="what to keep per prompt")
    for p in (si, ans):
        p.add_argument(
            "--teacher", help="the teacher: a model directory or an OpenAI-compatible URL"
        )
        p.add_argument("--teacher-model", help="served name of the teacher (with a URL)")
        p.add_argument("--api-key-env", help="environment variable holding the API key (URLs)")
        p.add_argument("--config", help="YAML file of the generator's settings")
        p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides")
        p.add_argument("--out", required=True, help="chat JSONL to write")
        p.add_argument("--cache", help="reply cache folder (default <out>.cache)")


def _settings(args) -> dict:
    from posttrain.config import apply_overrides, read_config

    raw = read_config(Path(args.config)) if args.config else {}
    if not isinstance(raw, dict):
        raise ValueError(f"{args.config}: expected a mapping of settings")
    raw = apply_overrides(raw, args.overrides)
    if args.teacher:
        raw["teacher"] = client_spec(args.teacher, args.teacher_model, args.api_key_env)
    if args.generator == "self-instruct":
        flags = {"seeds": args.seeds, "num_instructions": args.num, "mode": args.mode}
        if args.answerer:
            raw["answerer"] = client_spec(args.answerer, args.answerer_model, args.api_key_env)
    else:
        flags = {"prompts": args.prompts, "n": args.n, "reward_model": args.reward_model,
                 "verifier": args.verifier, "keep": args.keep}  # fmt: skip
        if args.judge:
            raw["judge"] = {"client": client_spec(args.judge, args.judge_model, args.api_key_env)}
    return raw | {k: v for k, v in flags.items() if v is not None}


def main(args) -> int:
    import json

    from posttrain.config import validate

    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out.with_name(out.name + ".cache")
    raw = _settings(args)
    source = args.config or "command line"
    if args.generator == "self-instruct":
        from posttrain.synth.self_instruct import SelfInstructConfig, generate

        counts = generate(validate(SelfInstructConfig, raw, source), out, cache)
    else:
        from posttrain.synth.answers import AnswersConfig, generate_answers

        counts = generate_answers(validate(AnswersConfig, raw, source), out, cache)
    print(json.dumps(counts))
    return 0
