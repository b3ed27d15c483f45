"""The lab: the lecture's claims as experiments that compute their own verdicts.

Each experiment is a module here with `NAME`, `TITLE` and `run(lab) -> result dict`, and a
config `configs/lab/<NAME>.yaml` extending the toy pipeline. `posttrain lab list` shows them;
`posttrain lab run NAME|all [--seeds ...] [--quick] [--out ...]` runs them.
"""

from __future__ import annotations

import importlib

EXPERIMENTS = {
    "rlhf_gains": "posttrain.lab.rlhf_gains",
    "overopt_bon": "posttrain.lab.overopt_bon",
    "overopt_rl": "posttrain.lab.overopt_rl",
    "calibration_diversity": "posttrain.lab.calibration_diversity",
    "dpo_frontier": "posttrain.lab.dpo_frontier",
    "length_hacking": "posttrain.lab.length_hacking",
    "safety_tradeoff": "posttrain.lab.safety_tradeoff",
    "annotator_groups": "posttrain.lab.annotator_groups",
    "hallucination_trap": "posttrain.lab.hallucination_trap",
    "midtraining": "posttrain.lab.midtraining",
    "style_vs_capability": "posttrain.lab.style_vs_capability",
    "agent_tools": "posttrain.lab.agent_tools",
}


def experiment(name: str):
    """The experiment module called `name` (a clear error listing the others if none is)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"no lab experiment named {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])
