"""The README's table of every setting (environment variable, type, default, description), read from the model.

``python -m pipeline.settings_doc`` prints it; ``--write`` updates README.md between its markers; ``--check``.
"""

from __future__ import annotations

import argparse
import ast
import enum
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.settings import Settings

ENV_PREFIX = "VECTORSTREAM_"
NESTED = "__"
START = "<!-- settings-table:start -->"
END = "<!-- settings-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


@dataclass(frozen=True)
class Setting:
    env: str
    path: tuple[str, ...]
    field: FieldInfo
    description: str


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """``#:`` comment lines right above each field of ``model``'s class body (Sphinx's convention)."""
    try:
        lines, _ = inspect.getsourcelines(model)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    out: dict[str, str] = {}
    src_lines = source.splitlines()
    cls = ast.parse(source).body[0]
    assert isinstance(cls, ast.ClassDef)
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc: list[str] = []
            i = node.lineno - 2
            while i >= 0 and src_lines[i].strip().startswith("#:"):
                doc.insert(0, src_lines[i].strip()[2:].strip())
                i -= 1
            if doc:
                out[node.target.id] = " ".join(doc)
    return out


def settings(
    model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX, path: tuple[str, ...] = ()
) -> Iterator[Setting]:
    """Every leaf setting, depth first in declaration order, with the environment variable that sets it."""
    comments = _comments(model)
    for name, info in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        annotation = info.annotation
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            yield from settings(annotation, env + NESTED, (*path, name))
        else:
            yield Setting(env, (*path, name), info, info.description or comments.get(name, ""))


def env_names() -> set[str]:
    return {s.env for s in settings()}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in rest)
        return f"{name} (optional)" if len(rest) < len(args) else name
    if annotation is SecretStr:
        return "secret"
    if annotation is Path:
        return "path"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{m.value}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(parts)


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True) if info.default is not PydanticUndefined else None
    if value is None:
        return "(none)"
    if isinstance(value, SecretStr):
        return "(a development secret)" if value.get_secret_value() else "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int | float):
        return f"`{value}`"
    return f"`{value}`" if str(value) else '`""`'


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The Markdown table (no trailing newline)."""
    rows = ["| environment variable | type | default | description |", "|---|---|---|---|"]
    for s in settings():
        kind = _type_name(s.field.annotation)
        bounds = _bounds(s.field)
        kind = f"{kind}, {bounds}" if bounds else kind
        rows.append(f"| `{s.env}` | {_cell(kind)} | {_cell(_default(s.field))} | {_cell(s.description)} |")
    return "\n".join(rows)


def replace_table(text: str, table: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README must contain {START} ... {END} once")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.settings_doc", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"update the table in {README.name}")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if the table in {README.name} is stale")
    args = parser.parse_args(argv)
    table = render()
    if not (args.write or args.check):
        print(table)
        return 0
    current = README.read_text()
    wanted = replace_table(current, table)
    if args.check:
        if wanted != current:
            print(
                f"{README.name}'s settings table is stale: run python -m pipeline.settings_doc --write", file=sys.stderr
            )
            return 1
        return 0
    if wanted != current:
        README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
