"""The parameter reference of ``docs/configuration.md``, generated from the schema in :mod:`shrinkfleet.config`.

    python -m shrinkfleet.reference           # rewrite the block between the markers
    python -m shrinkfleet.reference --check   # exit 1 if the block is not what the schema gives

Every pydantic model of the schema gets a section: where it sits in ``params.yaml``, its
docstring's first paragraph, and one row per field with its type, default, constraints and
description. The block lies between ``<!-- reference:start -->`` and ``<!-- reference:end -->``;
the rest of the page is written by hand. Imports nothing but :mod:`shrinkfleet.config`
(no Prefect, no TensorFlow), so it runs anywhere the schema does.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from shrinkfleet import config

START = "<!-- reference:start -->"
END = "<!-- reference:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
# Built by shrinkfleet from the others, never written in params.yaml.
INTERNAL = {"ResolvedModel"}


def schema_classes() -> list[type[BaseModel]]:
    """The public models of the schema, in the order the file reads: FleetConfig, then what it holds."""
    defined = [obj for obj in vars(config).values() if inspect.isclass(obj) and issubclass(obj, BaseModel)
               and obj.__module__ == config.__name__ and not obj.__name__.startswith("_")
               and obj.__name__ not in INTERNAL]
    for cls in defined:  # resolve forward references (a dataset's features: FeatureConfig, defined later)
        cls.model_rebuild()
    order: list[type[BaseModel]] = []

    def visit(cls: type[BaseModel]) -> None:
        if cls in order:
            return
        order.append(cls)
        for field in cls.model_fields.values():
            for inner in _models_in(field.annotation):
                visit(inner)

    visit(config.FleetConfig)
    return order + [cls for cls in defined if cls not in order]


def where(cls: type[BaseModel]) -> list[str]:
    """The key paths at which ``cls`` appears in params.yaml (``models.<name>.teacher``)."""
    found: list[str] = []

    def visit(model: type[BaseModel], path: str, seen: tuple[type, ...]) -> None:
        for name, field in model.model_fields.items():
            key = field.alias or name
            for inner, sub in _models_in(field.annotation, f"{path}.{key}" if path else key):
                if inner is cls and sub not in found:
                    found.append(sub)
                if inner not in seen:
                    visit(inner, sub, (*seen, inner))

    if cls is config.FleetConfig:
        return ["(the whole file)"]
    visit(config.FleetConfig, "", (config.FleetConfig,))
    return found


def _models_in(annotation: Any, path: str | None = None) -> list:
    """The BaseModel classes inside a type; with ``path``, each with the key path it takes there."""
    out: list = []

    def walk(tp: Any, p: str | None) -> None:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            walk(typing.get_args(tp)[0], p)
        elif origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                walk(arg, p)
        elif origin is dict:
            walk(typing.get_args(tp)[1], None if p is None else f"{p}.<name>")
        elif origin in (list, tuple):
            for arg in typing.get_args(tp):
                walk(arg, None if p is None else f"{p}[]")
        elif inspect.isclass(tp) and issubclass(tp, BaseModel):
            out.append(tp if p is None else (tp, p))

    walk(annotation, path)
    return out


def type_name(tp: Any) -> str:
    """A type as a reader of params.yaml sees it: ``list of int (>= 1)``, ``'mlp' | 'cnn'``, ``null``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Annotated:
        limits = [c for m in args[1:] for c in _constraints(m.metadata if isinstance(m, FieldInfo) else [m])]
        inner = type_name(args[0])
        return f"{inner} ({', '.join(limits)})" if limits else inner
    if origin is typing.Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return f"[{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if tp is Any:
        return "any"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return getattr(tp, "__name__", str(tp))


def _constraints(metadata: list[Any]) -> list[str]:
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    out: list[str] = []
    for item in metadata:
        for attr, symbol in symbols.items():
            if getattr(item, attr, None) is not None:
                out.append(f"{symbol} {getattr(item, attr)}")
        if getattr(item, "min_length", None) is not None:
            out.append(f"at least {item.min_length} item(s)")
        if getattr(item, "max_length", None) is not None:
            out.append(f"at most {item.max_length} item(s)")
        if getattr(item, "pattern", None) is not None:
            out.append(f"matches `{item.pattern}`")
    return out


def default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "its section's defaults"
    if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        return ", ".join(f"`{k}`" for k in value)
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A value in YAML flow style, as it would be written in params.yaml."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _summary(annotation: Any) -> str:
    """A field with no description of its own that holds one section: that section's summary."""
    inner = _models_in(annotation)
    return _docline(inner[0]) if len(inner) == 1 else ""


def _docline(cls: type[BaseModel]) -> str:
    """The first paragraph of a class's docstring, on one line, with Markdown backticks."""
    return inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ").replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The generated block, markers excluded."""
    lines = ["<!-- Generated by `python -m shrinkfleet.reference` from shrinkfleet/config.py; "
             "edit the field descriptions there, not here. -->", ""]
    for cls in schema_classes():
        lines.append(f"### {cls.__name__}")
        lines.append("")
        paths = where(cls)
        if paths:
            lines.append("In params.yaml: " + ", ".join(p if p.startswith("(") else f"`{p}`" for p in paths) + ".")
            lines.append("")
        doc = _docline(cls)
        if doc:
            lines += [doc, ""]
        lines.append("| key | type | default | constraints | description |")
        lines.append("|---|---|---|---|---|")
        for name, field in cls.model_fields.items():
            key = field.alias or name
            lines.append("| " + " | ".join(_cell(c) for c in (
                f"`{key}`", type_name(field.annotation), default(field),
                ", ".join(_constraints(field.metadata)), field.description or _summary(field.annotation))) + " |")
        lines.append("")
    return "\n".join(lines)


def replace_block(text: str, block: str, start: str = START, end: str = END) -> str:
    """``text`` with what lies between the ``start`` and ``end`` markers replaced by ``block``.

    Raises:
        ValueError: a marker is missing, or they are out of order.
    """
    head, sep, rest = text.partition(start)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"markers {start} ... {end} not found")
    return f"{head}{start}\n{block.strip()}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the parameter reference in docs/configuration.md.")
    ap.add_argument("--check", action="store_true", help="exit 1 if the reference is stale; write nothing")
    ap.add_argument("--file", type=Path, default=DOC, help=f"the page (default {DOC})")
    args = ap.parse_args(argv)
    text = args.file.read_text()
    new = replace_block(text, render())
    if args.check:
        if new != text:
            print(f"{args.file}: the parameter reference is stale; run `python -m shrinkfleet.reference`",
                  file=sys.stderr)
            return 1
        print(f"{args.file}: the parameter reference is current")
        return 0
    if new != text:
        args.file.write_text(new)
        print(f"rewrote the parameter reference in {args.file}")
    else:
        print(f"{args.file}: the parameter reference is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
