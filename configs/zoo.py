"""A zoo config: models x settings quantized by ``loaq zoo`` as one Prefect flow on one store.

    name: nightly
    models:                 # each a run config's model section, plus an optional short name
      - {name: smollm2, source: embedded:smollm2}
      - {source: Qwen/Qwen3-0.6B}
    settings:               # each a run config's quantize section (omitted fields: their defaults)
      - {method: gptq, bits: 4}
      - {method: loaq, bits: 3, alpha_in: 0.5, alpha_out: 0.5, beta: 0.25}
    concurrency: 2          # models quantized at the same time when the zoo runs in one process
    # every other section is a run config's, shared by all members: data_dir, calibration,
    # evaluation, runtime, store, export, report_dir

Each model x setting is a member: the run config ``<zoo>-<model>-<setting>``. The members of one
model share their calibration, embeddings, clean stream and FP evaluation (keyed by the model and
calibration only), so they form one group that runs in order; groups of different models share no
record and run side by side.
"""

from __future__ import annotations

import os
import re

from pydantic import Field, ValidationError, model_validator

from .load import ConfigError, describe, preset_path, read_yaml
from .schema import ModelConfig, QuantizeConfig, RunConfig, SharedSections

_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class ZooModel(ModelConfig):
    name: str | None = Field(None, pattern=_NAME, description="label in names and the report; "
                             "null = the last part of the source")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        tail = os.path.basename(self.source.rstrip("/")).removeprefix("embedded:")
        return re.sub(r"[^A-Za-z0-9_.-]", "-", tail) or "model"

    def model_config_only(self) -> ModelConfig:
        return ModelConfig(**self.model_dump(exclude={"name"}))


def setting_slug(q: QuantizeConfig) -> str:
    """The setting's part of a member name: the fields that tell the zoo's settings apart."""
    alpha_in, alpha_out, beta = q.alphas_beta()
    slug = f"{q.method}-w{q.bits}" + (f"-g{q.group_size}" if q.group_size else "")
    if any(q.terms):
        slug += f"-a{alpha_in:g}" + (f"-{alpha_out:g}" if alpha_out != alpha_in else "")
    if q.terms.soa:
        slug += f"-b{beta:g}"
    return slug


class ZooConfig(SharedSections):
    name: str = Field("zoo", pattern=_NAME)
    models: tuple[ZooModel, ...] = Field(min_length=1)
    settings: tuple[QuantizeConfig, ...] = Field(min_length=1)
    concurrency: int = Field(2, ge=1, description="model groups run at once in one process (threads)")

    @model_validator(mode="after")
    def _distinct(self) -> "ZooConfig":
        # One group per model: two entries of one model would compute its shared records twice, at once.
        for what, values in (("models' names", [m.label for m in self.models]),
                             ("models' sources", [(m.source, m.revision) for m in self.models]),
                             ("settings", [setting_slug(s) for s in self.settings])):
            for i, value in enumerate(values):
                if value in values[:i]:
                    j = values.index(value)
                    raise ValueError(f"{what} {j} and {i} are the same ({value if isinstance(value, str) else value[0]}); "
                                     "list each once" + ("" if what != "settings" else
                                                         " (fields a method does not use do not count)"))
        return self

    def member(self, model: ZooModel, setting: QuantizeConfig) -> RunConfig:
        shared = self.model_dump(include=set(SharedSections.model_fields))
        return RunConfig.model_validate({**shared, "name": f"{self.name}-{model.label}-{setting_slug(setting)}",
                                         "model": model.model_config_only().model_dump(),
                                         "quantize": setting.model_dump()})

    def groups(self) -> list[tuple[str, list[RunConfig]]]:
        """(model label, its members in settings order) for every model, in the config's order."""
        return [(m.label, [self.member(m, s) for s in self.settings]) for m in self.models]


def load_zoo(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ZooConfig:
    """The zoo config in a file or zoo preset; every mistake is one ``ConfigError`` line naming the field."""
    data = read_yaml(preset_path(name_or_path, zoo=True), overrides)
    try:
        return ZooConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, "zoo config")) from None
