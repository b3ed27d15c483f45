"""What every config model shares: the strict pydantic base and the config error.

This sits below the stages (which build their `Config` on `StrictModel`) and below train/,
data/ and world/ (whose settings do too); `posttrain.config` builds the pipeline on top.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated, and a float
    must be finite (`1e9999` or `.inf` as a learning rate is a typo, never a setting)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _over_the_stage_defaults(cls, data):
        """A mapping given for a nested setting whose default sets fields of its own (sft's
        `train` default has weight_decay 0.0 and warmup_steps 10, dpo's lr 5e-6) is laid over
        that default: `train: {precision: bf16}` must not silently bring back the class's
        defaults (weight_decay 0.1, lr 1e-3) for the keys it does not name."""
        if not isinstance(data, dict):
            return data
        out = data
        for name, info in cls.model_fields.items():
            given = data.get(name)
            if not isinstance(given, dict) or info.default_factory is None:
                continue
            try:
                default = info.default_factory()
            except TypeError:  # a factory that takes the validated data: not a stage default
                continue
            if isinstance(default, BaseModel) and default.model_fields_set:
                base = {k: getattr(default, k) for k in default.model_fields_set}
                out = (dict(data) if out is data else out) | {name: base | given}
        return out


class ConfigError(ValueError):
    """A config problem; the message names the file and the dotted key."""


_DEFAULT = object()


def is_set(model: BaseModel, name: str, default=_DEFAULT) -> bool:
    """Whether setting `name` was given explicitly, with a value other than its default (the
    field's, or `default`): defaults, and a resolved config that spells them out, never count."""
    if name not in model.model_fields_set:
        return False
    if default is _DEFAULT:
        default = type(model).model_fields[name].get_default(call_default_factory=True)
    return getattr(model, name) != default


class SettingError(ValueError):
    """A setting that has no effect (or cannot work) given the others: "no silent settings".

    `key` is its dotted name inside the model whose validator raises it; "{at}" in `message`
    stands for that model's own place in the file (e.g. "dpo."), which the config layer fills in,
    so that the message names every key it mentions in full (`dpo.loss`, not `loss`)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message.replace('{at}', '')}")

    def render(self, at: str) -> tuple[str, str]:
        """(the full dotted key, the message) for a model placed at `at` ("" or "dpo.")."""
        return at + self.key, self.message.replace("{at}", at)
