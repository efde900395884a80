"""Command lines generated from option dataclasses (litgpt's way, on plain argparse): a field is an option, its
type, default and attribute docstring are the option's type, default and ``--help`` text; nothing is restated.

    @dataclass
    class ExportOptions:
        ckpt: str
        '''Lightning checkpoint: a .ckpt file or a sharded directory.'''
        mtp_depths: int | None = None
        '''Export only the head's first N depths (None: all).'''

    opts = parse_options(ExportOptions, argv, prog="salm-mtp export", description="...")

Rules: ``field_name`` -> ``--field-name`` (``option(flag="--type")`` renames it; ``option(positional=True)`` makes
it an argument, a list field takes one or more); a field without a default is required; ``bool`` fields default
False and are switches; ``Literal[...]`` gives the choices; ``list[X]`` with ``option(repeat=True)`` is given once
per value. A dataclass ``__post_init__`` that raises ``ValueError`` becomes argparse's one-line usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def option(*, flag: str | None = None, positional: bool = False, repeat: bool = False, metavar: str | None = None,
           default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with command-line metadata (see the module docstring)."""
    meta = {"flag": flag, "positional": positional, "repeat": repeat, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cli": meta})


def field_docs(cls: type) -> dict[str, str]:
    """``{field: its attribute docstring, on one line}`` of a dataclass."""
    import docstring_parser

    return {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(cls).params
            if p.description}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of the option dataclass ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli", {})
        kind, _ = _unwrap(hints[f.name])
        kwargs: dict[str, Any] = {"help": docs.get(f.name, "").replace("%", "%%")}
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = typing.get_args(kind)
            kind = type(typing.get_args(kind)[0])
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            kwargs["type"] = item
            kwargs["nargs" if meta.get("positional") else "action"] = "+" if meta.get("positional") else "append"
            if not meta.get("repeat") and not meta.get("positional"):
                raise TypeError(f"{cls.__name__}.{f.name}: a list option needs option(repeat=True) or positional")
        else:
            kwargs["type"] = kind
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if not required and kind is not bool and default is not None:
            kwargs["help"] += f" (default: {default})"
        if meta.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = [] if kwargs.get("action") == "append" else default
        parser.add_argument(flag, dest=f.name, **kwargs)
    return parser


def parse_options(cls: type[T], argv: list[str] | None, prog: str, description: str | None = None) -> T:
    """Parse ``argv`` into an instance of the option dataclass ``cls`` (errors: argparse's usage line, exit 2)."""
    parser = build_parser(cls, prog, description)
    ns = parser.parse_intermixed_args(argv)  # positionals may come between options
    try:
        return cls(**vars(ns))
    except ValueError as e:
        parser.error(str(e))
