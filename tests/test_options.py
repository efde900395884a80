"""salm_mtp/options.py: a parser generated from an option dataclass (types, defaults, choices, help from field
docstrings), the instance it returns, and its one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from salm_mtp.options import build_parser, option, parse_options


@dataclass
class Opts:
    """Options of a test command."""

    out: str
    """output directory"""
    inputs: list[str] = option(positional=True, metavar="INPUT")
    """files to read"""
    batch_size: int | None = None
    """rows per batch (default: the run's)"""
    rate: float = 0.5
    """a fraction"""
    kind: Literal["a", "b"] = option(flag="--type", default="a")
    """which kind"""
    tag: list[str] = option(repeat=True, default_factory=list)
    """a tag; repeat for several"""
    quiet: bool = False
    """print less"""

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"--rate must be in [0, 1], got {self.rate}")


def test_parses_into_the_dataclass_with_its_defaults():
    got = parse_options(Opts, ["x.jsonl", "--out", "o", "y.jsonl", "--batch-size", "3", "--type", "b", "--tag", "t1",
                               "--tag", "t2", "--quiet"], prog="t")
    assert got == Opts(out="o", inputs=["x.jsonl", "y.jsonl"], batch_size=3, rate=0.5, kind="b", tag=["t1", "t2"],
                       quiet=True)
    assert parse_options(Opts, ["--out", "o", "x"], prog="t") == Opts(out="o", inputs=["x"])


def test_help_is_the_field_docstrings_with_defaults():
    text = " ".join(build_parser(Opts, prog="t").format_help().split())
    assert "--out OUT output directory" in text
    assert "--rate RATE a fraction (default: 0.5)" in text
    assert "--type {a,b} which kind (default: a)" in text
    assert "--batch-size BATCH_SIZE rows per batch (default: the run's)" in text  # None: the docstring says it
    assert "INPUT files to read" in text and "--quiet print less" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["x"], "the following arguments are required: --out"),
    (["--out", "o"], "the following arguments are required: INPUT"),
    (["--out", "o", "x", "--type", "c"], "argument --type: invalid choice: 'c'"),
    (["--out", "o", "x", "--rate", "2"], "--rate must be in [0, 1], got 2.0"),
])
def test_mistakes_are_one_usage_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_options(Opts, argv, prog="t")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: t")


def test_a_list_option_must_say_how_it_is_given():
    @dataclass
    class Bad:
        files: list[str] = option(default_factory=list)
        """files"""

    with pytest.raises(TypeError, match="Bad.files: a list option needs option"):
        build_parser(Bad, prog="t")
