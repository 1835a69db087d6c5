"""Reading a run config: YAML file (or a preset name) + ``--set a.b=value`` overrides -> RunConfig.

Every mistake becomes one ``ConfigError`` line naming the field, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from .schema import RunConfig

PRESETS_DIR = Path(__file__).parent
#: Presets whose name starts with this are zoo configs (``loaq zoo``), not run configs.
ZOO_PREFIX = "zoo"


class ConfigError(ValueError):
    pass


def preset_path(name_or_path: str | None, zoo: bool = False) -> Path:
    """The file ``name_or_path`` names: a path, or a run preset (a zoo preset if ``zoo``) in configs/."""
    if name_or_path is None:
        return PRESETS_DIR / ("zoo.yaml" if zoo else "default.yaml")
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml") if p.stem.startswith(ZOO_PREFIX) == zoo)
    if name_or_path in names:
        return PRESETS_DIR / f"{name_or_path}.yaml"
    raise ConfigError(f"{'zoo ' if zoo else ''}config {name_or_path!r} is neither a file nor a preset "
                      f"(presets: {', '.join(names)})")


def apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. --set quantize.bits=4")
    dotted, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node = data
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    node[parts[-1]] = value


def describe(error: ValidationError, what: str = "config") -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{what} field {field!r} is not known (misspelled?); value {first.get('input')!r}"
    if first["type"] == "missing":
        return f"{what} field {field!r} is required"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    if not field:  # a check across fields (a model validator) names them in its message
        return f"{what}: {msg}{more}"
    return f"{what} field {field!r} = {first.get('input')!r}: {msg}{more}"


def read_yaml(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The mapping in YAML file ``path`` with ``--set`` overrides applied."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of fields at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data = read_yaml(preset_path(name_or_path), overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e)) from None
