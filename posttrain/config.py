"""Pipeline configuration: one YAML file, pydantic models per stage, dotted CLI overrides.

A pipeline file has a few top-level settings (`name`, `out`, `seed`, `device`, `log`), a
`stages` list, and one section per stage keyed by the stage's name. A section may set `kind`
to reuse a stage type under another name (e.g. `eval_base: {kind: evaluate, ...}`). Sections
of stages not in `stages` are validated but not run, so `stages=[world, pretrain]` runs a
prefix of a full file. Every error names the file and the dotted key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from posttrain.settings import ConfigError, SettingError, StrictModel


class WandbConfig(StrictModel):
    project: str = Field(min_length=1, description="W&B project the stages' runs go to.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online",
        description="online: sync as it runs; offline: write runs to disk only (`wandb sync` "
        "uploads them later); disabled: log nothing.",
    )
    entity: str | None = Field(None, description="W&B team or user (default: your default).")
    group: str | None = Field(
        None, description="Group of the stages' runs (default: the pipeline's run name)."
    )
    tags: list[str] = Field(default_factory=list, description="Tags on every stage's run.")
    dir: str | None = Field(
        None,
        description="Folder that holds W&B's local files, in <dir>/wandb/ (default: the run "
        "directory, so runs/<name>/wandb/).",
    )


class LogConfig(StrictModel):
    every: int = Field(10, ge=1, description="Print a plain progress line every N steps (non-TTY).")
    tensorboard: bool = Field(
        False, description="Also write TensorBoard event files to <stage>/tb/."
    )
    # Left out of the resolved config while off: pipeline.yaml (and its hash in the report) of
    # runs that don't set it stay as they were.
    wandb: WandbConfig | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Also log each stage's metrics, final results and resolved config to "
        "Weights & Biases, one run per stage named <run name>/<stage> (needs `pip install "
        "'posttrain[wandb]'`); null: off.",
    )


class PipelineConfig(StrictModel):
    name: str = Field(
        "toy", min_length=1, description="Run name; the default output is runs/<name>."
    )
    out: str | None = Field(None, description="Run directory (default runs/<name>).")
    seed: int = Field(0, description="Global seed; each stage derives its own from it.")
    device: str = Field(
        "auto",
        description="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...",
    )
    log: LogConfig = Field(default_factory=LogConfig, description="Logging and progress settings.")
    stages: list[str] = Field(min_length=1, description="Stage names, run in this order.")

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")


@dataclass
class StageSpec:
    name: str  # section name in the file, and folder name in the run directory
    kind: str  # stage type (key of posttrain.stages.STAGES)
    config: BaseModel


@dataclass
class Pipeline:
    config: PipelineConfig
    stages: list[StageSpec]
    source: str
    # Sections of stages not in `stages` (e.g. after `stages=[sft]` on a full file): validated,
    # never run; kept so that the world stays the file's and pipeline.yaml reloads the same.
    unlisted: list[StageSpec] = field(default_factory=list)

    def world_config(self):
        """The toy world's settings: those of the first `world` stage (listed first, else an
        unlisted one: the world that stage built), else the defaults."""
        from posttrain.world import WorldConfig

        for s in [*self.stages, *self.unlisted]:
            if s.kind == "world":
                return WorldConfig(**s.config.model_dump(include=set(WorldConfig.model_fields)))
        return WorldConfig()

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def resolved(self) -> dict:
        """The full config with every default filled in, as it would be written to pipeline.yaml."""
        d = self.config.model_dump(mode="json")
        for s in [*self.stages, *self.unlisted]:
            sec = s.config.model_dump(mode="json")
            d[s.name] = ({"kind": s.kind} if s.kind != s.name else {}) | sec
        return d


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. pretrain.lr=3e-4")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty part in key {key!r}")
    return parts, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for ov in overrides:
        parts, value = parse_override(ov)
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return raw


def _hint(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_validation(err: ValidationError, source: str, prefix: str, model) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join([prefix, *map(str, e["loc"])] if prefix else map(str, e["loc"]))
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, SettingError):  # a validator naming the key and why
            full, msg = cause.render(f"{key}." if key else "")
            lines.append(f"{source}: config key '{full}': {msg}")
        elif e["type"] == "extra_forbidden":
            fields = _fields_at(model, e["loc"][:-1])
            lines.append(f"{source}: unknown config key '{key}'{_hint(str(e['loc'][-1]), fields)}")
        else:
            fix = "; give a finite number" if e["type"] == "finite_number" else ""
            lines.append(f"{source}: config key '{key}': {e['msg']} (got {e.get('input')!r}){fix}")
    return ConfigError("\n".join(lines))


def _fields_at(model, loc) -> list[str]:
    """The field names of the model nested at `loc` (an optional one, `X | None`, counts as X)."""
    import typing

    for part in loc:
        info = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        ann = getattr(info, "annotation", None)
        models = [a for a in (typing.get_args(ann) or (ann,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]  # fmt: skip
        if len(models) != 1:
            return []
        model = models[0]
    return list(getattr(model, "model_fields", {}))


def validate(model_cls, data: Any, source: str, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: config key '{prefix}' must be a mapping, got {data!r}")
    try:
        return model_cls(**data)
    except ValidationError as e:
        raise _format_validation(e, source, prefix, model_cls) from None


def build_pipeline(raw: dict, source: str) -> Pipeline:
    from posttrain.stages import STAGES

    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the file must hold a mapping of keys, got {type(raw).__name__}"
        )
    raw = dict(raw)
    top = {k: raw.pop(k) for k in list(raw) if k in PipelineConfig.model_fields}
    cfg = validate(PipelineConfig, top, source)
    if len(set(cfg.stages)) != len(cfg.stages):
        raise ConfigError(f"{source}: config key 'stages' lists a stage twice: {cfg.stages}")
    for name in cfg.stages:  # a name with neither a stage type nor a section is a typo
        if name not in STAGES and not isinstance(raw.get(name), dict):
            raise ConfigError(
                f"{source}: config key 'stages' names an unknown stage {name!r}"
                f"{_hint(name, STAGES)}; known stages: {sorted(STAGES)} (or add a section "
                f"'{name}: {{kind: <stage>}}' to run a stage type under another name)"
            )
    for key, section in raw.items():  # a section for an unlisted stage is allowed (not run)
        is_stage = isinstance(section, dict) and "kind" in section
        if key not in cfg.stages and key not in STAGES and not is_stage:
            allowed = [*PipelineConfig.model_fields, *cfg.stages, *STAGES]
            raise ConfigError(
                f"{source}: unknown config key '{key}'{_hint(key, allowed)}; top-level keys are "
                f"{list(PipelineConfig.model_fields)}, a stage type {sorted(STAGES)}, or a "
                "section with 'kind' naming one"
            )
    specs = [_stage_spec(name, raw.get(name), source, STAGES) for name in cfg.stages]
    unlisted = [_stage_spec(k, v, source, STAGES) for k, v in raw.items() if k not in cfg.stages]
    return Pipeline(cfg, specs, source, unlisted)


def _stage_spec(name: str, section, source: str, stages: dict) -> StageSpec:
    """One stage's section validated against its stage type's Config."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{source}: config key '{name}' must be a mapping, got {section!r}")
    section = dict(section or {})
    if "kind" not in section and name not in stages:
        raise ConfigError(
            f"{source}: config key '{name}': {name!r} is not a stage type{_hint(name, stages)}; "
            f"set '{name}.kind' to one of {sorted(stages)}"
        )
    kind = section.pop("kind", name)
    if kind not in stages:
        raise ConfigError(
            f"{source}: config key '{name}.kind': unknown stage type {kind!r}"
            f"{_hint(str(kind), stages)}; known: {sorted(stages)}"
        )
    return StageSpec(name, kind, validate(stages[kind].Config, section, source, name))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        )
    return out


def read_config(path: Path, _seen: tuple = ()) -> dict | object:
    """A pipeline YAML as a dict. `extends: OTHER.yaml` (relative to this file) starts from
    that config: its mappings are merged key by key under this one's, anything else (a list
    such as `stages`, a number) is replaced."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw  # (build_pipeline names what is wrong with a non-mapping)
    parent = raw.pop("extends")
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: config key 'extends' must be a file name (got {parent!r})")
    base = (path.parent / parent).resolve()
    if base in _seen or base == path.resolve():
        raise ConfigError(f"{path}: config key 'extends': {parent} extends itself in a cycle")
    try:
        inherited = read_config(base, (*_seen, path.resolve()))
    except ConfigError as e:
        raise ConfigError(f"{path}: config key 'extends': {e}") from None
    return _deep_merge(inherited, raw)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    path = Path(path)
    raw = read_config(path)
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return build_pipeline(apply_overrides(raw, list(overrides or [])), source)


def load_stage_file(
    path: str | Path, kind: str, overrides: list[str] | None = None, out: str | None = None
) -> Pipeline:
    """A one-stage pipeline from a file that holds just one stage's settings (what `posttrain
    sft --config my_sft.yaml` takes): the run is named after the file, in runs/<file stem>."""
    path, overrides = Path(path), list(overrides or [])
    section = read_config(path)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: the file must hold the {kind} stage's settings as a mapping")
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return stage_pipeline(apply_overrides(section, overrides), kind, source, path.stem, out)


def stage_pipeline(section: dict, kind: str, source: str, name: str, out: str | None = None):
    """A pipeline of one stage, `kind`, with these settings, in runs/<name> unless `out`."""
    raw = {"name": name, "out": out or f"runs/{name}", "stages": [kind], kind: section}
    return build_pipeline(raw, source)


def stage_kinds_of(path: str | Path) -> list[str]:
    """The stage types whose settings a stage-alone file validates as (for `config show` on
    such a file without --stage): usually one, since most stages have keys of their own."""
    from posttrain.stages import STAGES

    section = read_config(Path(path))
    if not isinstance(section, dict):
        return []
    fits = []
    for kind, module in STAGES.items():
        try:
            module.Config(**section)
        except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
            continue
        fits.append(kind)
    return fits
