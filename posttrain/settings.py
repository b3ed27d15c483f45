"""What every config model shares: the strict pydantic base and the config error.

This sits below the stages (which build their `Config` on `StrictModel`) and below train/,
data/ and world/ (whose settings do too); `posttrain.config` builds the pipeline on top.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated, and a float
    must be finite (`1e9999` or `.inf` as a learning rate is a typo, never a setting)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A config problem; the message names the file and the dotted key."""
