"""Validate a ``/status`` document against the JSON Schema published in docs/status.md.

Only the keywords that schema uses are implemented (``type``, ``enum``, ``required``,
``properties``, ``items``, ``$ref`` into ``$defs``), so the check needs no extra dependency.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "status.md"

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "null": type(None),
    "boolean": bool,
}


def published_schema() -> dict[str, Any]:
    text = DOC.read_text()
    section = text.split("## JSON Schema", 1)[1]
    m = re.search(r"```json\n(.*?)```", section, re.S)
    assert m, "docs/status.md has no JSON Schema block"
    schema: dict[str, Any] = json.loads(m.group(1))
    return schema


def _is(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def errors(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return errors(value, root["$defs"][name], root, path)
    out: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_is(value, n) for n in names):
            return [f"{path}: {value!r} is not {types}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        out += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in value]
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                out += errors(value[k], sub, root, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += errors(item, schema["items"], root, f"{path}[{i}]")
    return out


def assert_valid(doc: Any) -> None:
    schema = published_schema()
    problems = errors(doc, schema, schema)
    assert not problems, problems
