"""Ten JSON schemas of different shapes for bench.structured and the structured-output tests:
nested objects, arrays with minItems/maxItems, enums, bounded numbers, required and optional
properties, strings with patterns. Every string has maxLength <= 32, every array maxItems, and
no object takes properties it does not name, so a constrained output always ends (OpenAI's strict
mode asks the same). `min_items` raises every array's minItems (the benchmark uses it to make
outputs long)."""

from __future__ import annotations

import copy


def _obj(properties: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


NAME = {"type": "string", "maxLength": 16}
SCHEMAS: dict[str, dict] = {
    "person": _obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "nested": _obj(
        {"play": NAME, "scene": _obj({"act": {"type": "integer", "minimum": 1, "maximum": 5}, "place": NAME})}
    ),
    "tags": _obj(
        {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 4}}
    ),
    "enum": _obj({"mood": {"enum": ["joy", "grief", "rage"]}, "speaker": {"enum": ["ROMEO", "JULIET"]}}),
    "numbers": _obj(
        {
            "price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.25},  # bounded digits
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
        }
    ),
    "optional": _obj(
        {"title": NAME, "subtitle": NAME, "year": {"type": "integer", "minimum": 1500, "maximum": 1700}}, ["title"]
    ),
    "pattern": _obj(
        {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$", "maxLength": 6}, "ok": {"type": "boolean"}}
    ),
    "matrix": _obj(
        {
            "rows": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 1,
                    "maxItems": 3,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        }
    ),
    "cast": _obj(
        {
            "cast": {
                "type": "array",
                "items": _obj({"role": NAME, "lines": {"type": "integer", "minimum": 0, "maximum": 999}}),
                "minItems": 1,
                "maxItems": 3,
            }
        }
    ),
    "mixed": _obj(
        {
            "id": {"type": "string", "pattern": "^[a-f0-9]{4}$", "maxLength": 4},
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 0, "maxItems": 3},
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 12}]},
        }
    ),
}


def with_min_items(schema: dict, min_items: int) -> dict:
    """The schema with every array's minItems (and maxItems, if lower) raised to `min_items`."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "array":
                node["minItems"] = max(node.get("minItems", 0), min_items)
                node["maxItems"] = max(node.get("maxItems", min_items), min_items)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema
