"""Config files as text: reading a YAML or JSON mapping (yaml.safe_load, json: nothing loaded runs code), writing
one as YAML, and the one-line meaning of each dataclass field from the comment on its line (draccus reads them).
What the fields may hold is HarmoDTConfig's to check (config.py), not this module's."""
from __future__ import annotations

import json
import os

MAX_CONFIG_FILE_BYTES = 1 << 20  # a config is a few KB; a bound on sanity, checked before the file is parsed
SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}


def read_mapping(path) -> dict:
    """The mapping a .yaml, .yml or .json file holds (an empty file: {}); a ValueError naming the file otherwise
    (another suffix, unreadable, too large, not valid YAML or JSON with its line and column, not a mapping, a key
    that is not a string)."""
    path = os.fspath(path)
    kind = SUFFIXES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"config file {path}: expected a .yaml, .yml or .json file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"config file {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_FILE_BYTES:
        raise ValueError(f"config file {path}: over {MAX_CONFIG_FILE_BYTES} bytes; a config is a few KB")
    try:
        text = data.decode("utf-8")
        mapping = json.loads(text) if kind == "JSON" else _safe_load(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {path}: not valid JSON: {exc.msg} (line {exc.lineno}, column "
                         f"{exc.colno})") from None
    except ValueError as exc:  # _safe_load's, one line with the position
        raise ValueError(f"config file {path}: not valid YAML: {exc}") from None
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ValueError(f"config file {path}: expected a mapping of config fields (name: value), got a "
                         f"{type(mapping).__name__}")
    keys = [k for k in mapping if not isinstance(k, str)]
    if keys:
        raise ValueError(f"config file {path}: field names must be text, got {keys[0]!r}")
    return mapping


def _safe_load(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{problem}{where}") from None


def yaml_text(mapping: dict, header: str = "") -> str:
    """`mapping` as block-style YAML in its own key order, after `header` as comment lines; a value YAML cannot hold
    (not a number, text, bool, None, list or dict) is a ValueError naming its key."""
    import yaml

    lines = "".join(f"# {line}\n" for line in header.splitlines())
    for key, value in mapping.items():
        try:
            lines += yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=1 << 16,
                                    allow_unicode=True)
        except yaml.YAMLError as exc:
            raise ValueError(f"config field {key!r} cannot be written as YAML: {exc}") from None
    return lines


def yaml_value(value) -> str:
    """One value as it is written in a YAML file (null, true, 0.0001, relu, {}, [a, b])."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def field_comments(cls) -> dict[str, str]:
    """Each field of the dataclass `cls` -> the comment at the end of its line in the source ("" where none)."""
    import dataclasses

    from draccus.wrappers.docstring import get_attribute_docstring

    return {f.name: get_attribute_docstring(cls, f.name).comment_inline.strip() for f in dataclasses.fields(cls)}
