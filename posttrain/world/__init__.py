"""The toy world: a seeded synthetic language with a gold truth for every behaviour.

world = World(WorldConfig(seed=0))
world.corpus("train")          # pre-training documents
world.tasks("eval", "safety")  # held-out prompts with gold
check(task, response)          # Check(score, components)
"""

from posttrain.world.agent_tasks import AGENT, AGENT_TOOLS
from posttrain.world.checkers import check
from posttrain.world.config import WorldConfig
from posttrain.world.knowledge import Entity
from posttrain.world.task import FAMILIES, SPLITS, Check, Task
from posttrain.world.world import World

__all__ = [
    "AGENT",
    "AGENT_TOOLS",
    "FAMILIES",
    "SPLITS",
    "Check",
    "Entity",
    "Task",
    "World",
    "WorldConfig",
    "check",
]
