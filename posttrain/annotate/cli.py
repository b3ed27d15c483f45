"""`posttrain annotate serve | add-annotator | add-admin | export` (argparse only at import)."""

from __future__ import annotations

import argparse
from urllib.parse import quote


def add_parser(sub) -> None:
    ann = sub.add_parser("annotate", help="the human annotation app: people rank candidates")
    acts = ann.add_subparsers(dest="action", required=True)
    serve = acts.add_parser("serve", help="serve a sample stage's candidates for ranking")
    serve.add_argument("--run", required=True, help="run directory")
    serve.add_argument("--stage", default="sample", help="stage whose candidates.jsonl is ranked")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--k", type=int, default=2, help="annotators per prompt (default 2)")
    serve.add_argument("--guidelines", help="a text file of ranking guidelines shown above the "
                       "candidates (replaces the stored ones; default: the built-in guidelines; "
                       "the admin page edits them too)")  # fmt: skip
    for name, what in (("add-annotator", "an annotator"), ("add-admin", "an admin")):
        add = acts.add_parser(name, help=f"register {what}; prints a one-time login link")
        add.add_argument("name", help="letters, digits, '_', '.', '-'; not path-like ('..')")
        add.add_argument("--run", required=True, help="run directory")
        add.add_argument("--url", default="http://127.0.0.1:8000",
                         help="the app's address, for the printed link")  # fmt: skip
        if name == "add-annotator":
            add.add_argument("--group", help="annotator group (default: 'default')")
            add.add_argument("--admin", action="store_true", help="an admin instead")
    exp = acts.add_parser("export", help="write RUN/annotate/rankings.jsonl and pairs.jsonl")
    exp.add_argument("--run", required=True, help="run directory")
    exp.add_argument("--stage", help="the sample stage (default: the one the app served)")


def main(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"the annotation app needs the 'annotate' extra ({e.name} is missing): "
            "pip install -e '.[annotate]'"
        ) from None
    if args.action == "serve":
        from posttrain.annotate.server import serve

        serve(args.run, args.stage, args.host, args.port, args.k, args.guidelines)
    elif args.action in ("add-annotator", "add-admin"):
        add(args)
    else:
        report_export(args.run, args.stage)
    return 0


def add(args: argparse.Namespace) -> None:
    from posttrain.annotate import db

    admin = args.action == "add-admin" or args.admin
    group = getattr(args, "group", None)
    token, created = db.add_annotator(db.db_path(args.run), args.name, group, admin=admin)
    role = "admin" if admin else "annotator"
    print(f"{role} {args.name} " + ("registered" if created else "exists: a new login link"))
    print(f"login link (works once): {args.url.rstrip('/')}/login?token={quote(token)}")
    print(f"token: {token}")
    print("Only a hash of the token is stored; this link is not shown again.")


def report_export(run: str, stage: str | None) -> None:
    from posttrain.annotate.export import export

    e = export(run, stage)
    print(f"wrote {e.rankings} rankings and {e.pairs} pairs:")
    for path in e.paths.values():
        print(f"  {path}")
    for k, v in e.metrics.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    if e.invalid:
        print(f"warning: left out {len(e.invalid)} invalid stored ranking(s):")
        for r in e.invalid:
            print(f"  invalid ranking id {r['id']}: {r['problem']}")
    print(f"train on them with the rank stage: rank.labels: {e.paths['rankings']}")
