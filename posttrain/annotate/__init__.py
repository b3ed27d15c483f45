"""The human annotation app: people rank a sample stage's candidates in a browser.

    posttrain annotate add-annotator NAME --run RUN [--group G] [--admin]   # one-time login link
    posttrain annotate serve --run RUN --stage sample [--host 127.0.0.1 --port 8000 --k 2]
    posttrain annotate export --run RUN      # RUN/annotate/{rankings,pairs}.jsonl, metrics.json

Labels live in `RUN/annotate/annotations.sqlite` (WAL, synchronous=FULL: a ranking the server
acknowledged survives a killed server). Login tokens and session ids are stored only as sha256
hashes; a login token works once. Each prompt goes to `k` annotators (rendezvous hashing of
prompt id and annotator name); an annotator sees only their own queue and labels, and a second
submission for a prompt updates that annotator's own label (never a duplicate; the same ranking
again changes nothing). The export writes the rank stage's records, so
`rank.labels: RUN/annotate/rankings.jsonl` trains reward models and DPO on human labels exactly
as on simulated ones.

Modules: `checks` (what input is accepted: names, orders, body size and depth; how much an
error quotes), `db` (schema, tokens, sessions, assignment, labels), `core` (what every route uses:
the Store, sessions, CSRF, the thread pool), `server` (the app, login and page routes), `api`
(JSON routes), `admin`, `pages` (templates, CSS, JS), `export`, `cli`, `testing` (a fake run,
servers in a thread or a process, an HTTP client: for the tests and demos).
"""
