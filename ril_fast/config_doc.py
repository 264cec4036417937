"""The config reference, ``docs/config.md``, generated from ``ril_fast/config.py`` so it cannot drift.

Every key's type and default come from the dataclasses; its "why" from the comment on its line and
the comment lines right above it, each section's summary from its class docstring.

    python -m ril_fast.config_doc > docs/config.md     # regenerate
    python -m ril_fast.config_doc --check               # exit 1 if docs/config.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing
from pathlib import Path

from ril_fast import config

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def field_comments(module=config) -> dict[tuple[str, str], str]:
    """(class name, field name) -> its comment text: the comment lines just above the field, then the one on it."""
    source = inspect.getsource(module)
    comments: dict[int, str] = {}
    own_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                own_line.add(tok.start[0])
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while line in own_line:
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(item.lineno, item.end_lineno + 1) if n in comments]
            out[(node.name, item.target.id)] = " ".join(above + trailing)
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def sections() -> list[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """(key prefix, class, rows of (key, type, default JSON, why)) for the top level and each section."""
    why = field_comments()
    found = [("", config.Config)]
    out = []
    while found:
        prefix, cls = found.pop(0)
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
            if dataclasses.is_dataclass(tp) or (item is not None and dataclasses.is_dataclass(item)):
                found.append((f"{prefix}{f.name}{'.N' if item is not None else ''}.", item or tp))
                continue
            rows.append((f"{prefix}{f.name}", config._type_name(tp), json.dumps(_default(f), ensure_ascii=False),
                         why.get((cls.__name__, f.name), "")))
        out.append((prefix.rstrip("."), cls, rows))
    return out


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "<!-- Generated from ril_fast/config.py by `python -m ril_fast.config_doc > docs/config.md`; do not edit. -->",
        "",
        "Every key a run config (JSON) takes, its type, its default and why it is there. A config names only",
        "what it changes; `--set KEY=VALUE` overrides any key from the command line (JSON-parsed; list items by",
        "index: `--set tasks.0.steps=5`). Unknown keys, wrong types and out-of-range values are refused before",
        "anything loads, one line each, exit code 2. The shipped examples are `configs/*.json`.",
    ]
    for prefix, cls, rows in sections():
        doc = (cls.__doc__ or "").strip()
        lines += ["", f"## {'`' + prefix + '`' if prefix else 'top level'}", ""]
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | why |", "| --- | --- | --- | --- |"]
        lines += [f"| `{k}` | {_cell(t)} | `{_cell(d)}` | {_cell(w)} |" for k, t, d, w in rows]
    return "\n".join(lines) + "\n"


def undocumented() -> list[str]:
    """Keys without a comment saying why (the generator's test refuses them)."""
    return [k for _, _, rows in sections() for k, _, _, why in rows if not why]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ril_fast.config_doc", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {DOC} differs from the generated text")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is stale: regenerate it with python -m ril_fast.config_doc > docs/config.md", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
