"""LoRA adapters (Hu et al. 2106.09685) for every training stage, through peft.

One base model in memory: where a stage needs a reference (DPO, KTO, the RL stages), the
reference is the same module with its adapters switched off (`adapters_off`), as TRL does with
`ref_model=None` and a peft model. A reward or value model gets adapters on its decoder and a
fully trained scalar head (peft's `modules_to_save`). Saved merged (a plain Hugging Face
directory) or as an adapter (adapter_config.json naming the base directory, which
`posttrain.models.load` and `posttrain.models.reward` load back and merge).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.settings import SettingError, StrictModel, is_set


class LoraSettings(StrictModel):
    enabled: bool = Field(
        False, description="Train LoRA adapters instead of all weights (Hu et al. 2021)."
    )
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names that get adapters."
    )
    save: Literal["merged", "adapter"] = Field(
        "merged", description="Save the merged full model, or only the adapter (plus base path)."
    )

    @model_validator(mode="after")
    def _no_settings_while_off(self) -> LoraSettings:
        unused = sorted(k for k in self.model_fields_set - {"enabled"} if is_set(self, k))
        if not self.enabled and unused:
            raise SettingError(unused[0], "is set but {at}enabled is false, so it has no effect: "
                               "set {at}enabled: true or drop it")  # fmt: skip
        return self


def lora_field(description: str = "LoRA adapters (peft) instead of training every weight."):
    """The `lora` setting of a stage; left out of the resolved config (the cache key) while off,
    so that stages cached before the option existed stay cached."""
    return Field(
        default_factory=LoraSettings, exclude_if=lambda v: not v.enabled, description=description
    )


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def unwrap(model):
    """The transformers model under a peft wrapper (adapters stay injected in its layers)."""
    return model.get_base_model() if is_peft(model) else model


def apply_lora(model, settings: LoraSettings, task: Literal["causal_lm", "scalar"] = "causal_lm"):
    """`model` with adapters on `settings.target_modules`; every other weight frozen, except a
    scalar model's head (task "scalar": reward and value models), which trains in full."""
    from peft import LoraConfig, get_peft_model

    from posttrain.models.reward import score_head

    kw = {"task_type": "CAUSAL_LM"}
    if task == "scalar":
        head = score_head(model)
        name = next(n for n, m in model.named_children() if m is head)
        kw = {"task_type": "SEQ_CLS", "modules_to_save": [name]}
    missing = [t for t in settings.target_modules
               if not any(n.split(".")[-1] == t for n, _ in model.named_modules())]  # fmt: skip
    if missing:
        raise ValueError(f"lora.target_modules: {missing} not found in {type(model).__name__} "
                         "(name the model's linear layers, e.g. q_proj, v_proj)")  # fmt: skip
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=settings.target_modules, **kw)  # fmt: skip
    return get_peft_model(model, cfg)


@contextlib.contextmanager
def adapters_off(model):
    """Run `model` as its base (the reference of a LoRA policy): no second copy in memory."""
    if not is_peft(model):
        raise TypeError(f"{type(model).__name__} has no adapters to switch off")
    with model.disable_adapter():
        yield model


class BaseView:
    """The base model under a peft policy, callable like a model (every call with adapters off);
    stands in for a frozen reference copy. Only for no-grad passes."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_off(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self.model, name)
        if not callable(attr) or name not in ("get_decoder", "get_output_embeddings"):
            return attr

        def off(*a, **kw):  # a module fetched here is called later: switch off around the call
            return _OffModule(self.model, attr(*a, **kw))

        return off


class _OffModule:
    def __init__(self, owner, module):
        self.owner, self.module = owner, module

    def __call__(self, *args, **kwargs):
        with adapters_off(self.owner):
            return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def save_trained(model, tokenizer, out_dir: str | Path, settings: LoraSettings | None):
    """Save a stage's final model: a plain HF directory, or with `lora.save: adapter` only the
    adapter (and a scalar model's head), naming the base directory it was loaded from. Merging
    happens in place (peft's merge_and_unload): use the returned model afterwards, not `model`."""
    from posttrain.models.load import save_model

    if settings is not None and settings.enabled and is_peft(model):
        if settings.save == "merged":
            model = model.merge_and_unload()
    save_model(model, tokenizer, out_dir)
    return model
