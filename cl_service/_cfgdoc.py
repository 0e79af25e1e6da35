"""Every key of a typed config with its type, default and docstring: ``clsvc config show`` and the generated
reference ``docs/config.md`` (a test regenerates it, so it cannot drift from the dataclasses).

A field's docstring is the string literal right under it in the class body (the litgpt / torchtune habit this
codebase follows); it is read from the source with :mod:`ast`, so nothing has to be declared twice.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from typing import Any, Iterator


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str        # dotted, e.g. expert.train.lr
    type: str
    default: Any
    doc: str


@lru_cache(maxsize=None)
def _field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literals that follow each annotated field of ``cls``."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def keys(cls: type, prefix: str = "") -> Iterator[KeyDoc]:
    """Every leaf key of the config dataclass ``cls`` (nested dataclasses flattened to dotted keys)."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from keys(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        yield KeyDoc(prefix + f.name, _type_name(tp), default, docs.get(f.name, ""))


def value_of(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def show(cls: type, cfg: Any | None = None) -> str:
    """A plain-text listing: ``key = value  (type; default ...)`` and the docstring under it."""
    lines = []
    for k in keys(cls):
        val = value_of(cfg, k.key) if cfg is not None else k.default
        changed = "" if val == k.default else f"; default {k.default!r}"
        lines.append(f"{k.key} = {val!r}  ({k.type}{changed})")
        if k.doc:
            lines.extend("    " + line for line in textwrap.wrap(k.doc, 100))
    return "\n".join(lines)


def reference(sections: dict[str, type]) -> str:
    """The Markdown config reference: one table per workload config."""
    out = ["# Configuration reference", "",
           "Generated from the config dataclasses by `clsvc config reference` (a test regenerates it and compares):",
           "do not edit by hand. Every key can be set in the YAML or overridden as `key.sub=value`.", ""]
    for title, cls in sections.items():
        out += [f"## {title} (`{cls.__module__}.{cls.__name__}`)", "", "| key | type | default | meaning |",
                "|---|---|---|---|"]
        for k in keys(cls):
            doc = k.doc.replace("|", "\\|")
            typ = k.type.replace("|", "\\|")
            out.append(f"| `{k.key}` | {typ} | `{k.default!r}` | {doc} |")
        out.append("")
    return "\n".join(out)
