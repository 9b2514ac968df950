"""Configs from files: YAML (duplicate keys refused) plus `section.key=value` overrides into the
validated `Config` of config.py, with errors that name the file, the field and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from core.config import Config


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file (plus `a.b.c=value` overrides) into a validated Config, or raise ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"config file {path} {what}; pass a YAML file such as configs/demo-cpu.yaml")
    try:
        raw = yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start}); "
                         "re-save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections (run:, model:, ...), got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, *, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"{source}: invalid config\n{_explain(e)}") from None


MOVED_KEYS = {"learner.loss.drop_uniform_groups": "buffer.drop_uniform_groups"}
"""Keys that moved to another section: a config that still uses the old place is told the new one."""


def _explain(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden" and where in MOVED_KEYS:
            lines.append(f"  {where}: this key moved; write it as {MOVED_KEYS[where]}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key; remove it or check its spelling against core/config.py")
        elif err["type"] == "union_tag_not_found":
            lines.append(f"  {where}: `type:` is missing; add it (its values are the `type` literals of the "
                         f"{where} classes in core/config.py)")
        elif err["type"] == "value_error":
            lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. run.num_steps=5")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ValueError(f"override {item!r}: the value is not valid YAML ({problem}); if it is text, "
                         f"quote it: {key}={json.dumps(value)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one section; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
