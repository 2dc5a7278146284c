"""The expression language of feature specs: derived features and row filters.

An expression is parsed once into a small tree (``Expr``) that every engine evaluates with its
own backend (Polars in batch); no formula is written twice. The grammar is a subset of Python's
expression syntax, parsed with ``ast`` and then rebuilt from allowed node kinds only, so
nothing of Python beyond it can run:

* numbers; strings only as the other side of ``==`` / ``!=`` (``channel == "ecom"``);
* names: a feature of the spec, a column of the log, or a calendar part of the timestamp
  (``hour`` 0-23, ``weekday`` 1-7 Monday to Sunday, ``is_weekend``, ``is_night`` 00:00-06:00,
  all UTC);
* ``+ - * /``, unary ``-``, one comparison ``< <= > >= == !=``, ``and``, ``or``, ``not``;
* functions ``log1p(x)``, ``abs(x)``, ``min(a, b)``, ``max(a, b)``, ``clip(x, lo, hi)``,
  ``where(cond, a, b)``, ``coalesce(a, b)`` (a unless it is null).

Null rules (the same in every engine): arithmetic and comparisons with a null give null;
``x / 0`` gives null; ``where`` takes ``b`` when ``cond`` is false or null; ``min``/``max``
ignore a null side; a boolean result used as a feature is 1.0 or 0.0.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from fraudflow.errors import ConfigError

__all__ = [
    "CALENDAR",
    "FUNCTIONS",
    "Binary",
    "Call",
    "Compare",
    "Expr",
    "Literal",
    "Logical",
    "Name",
    "Not",
    "parse_expression",
    "referenced_names",
]

CALENDAR = ("hour", "weekday", "is_weekend", "is_night")
NIGHT_END_HOUR = 6  # is_night: hours [0, 6) UTC
# name -> number of arguments
FUNCTIONS = {"log1p": 1, "abs": 1, "min": 2, "max": 2, "clip": 3, "where": 3, "coalesce": 2}

_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_COMPARE = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


@dataclass(frozen=True)
class Literal:
    value: float | str


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Binary:
    op: str  # + - * /
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Compare:
    op: str  # < <= > >= == !=
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Logical:
    op: str  # and | or
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Expr, ...]


Expr = Literal | Name | Binary | Compare | Logical | Not | Call


def parse_expression(text: str) -> Expr:
    """Parse ``text``; a ``ConfigError`` says what is not allowed, and where."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(f"cannot parse {text!r}: {exc.msg} (column {exc.offset})") from None
    return _build(tree.body, text)


def _build(node: ast.AST, text: str) -> Expr:
    if isinstance(node, ast.Constant):
        return _constant(node, text)
    if isinstance(node, ast.Name):
        return Name(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return Binary(_BINARY[type(node.op)], _build(node.left, text), _build(node.right, text))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return Binary("-", Literal(0.0), _build(node.operand, text))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return Not(_build(node.operand, text))
    if isinstance(node, ast.BoolOp):
        op = "and" if isinstance(node.op, ast.And) else "or"
        parts = [_build(value, text) for value in node.values]
        out = parts[0]
        for part in parts[1:]:
            out = Logical(op, out, part)
        return out
    if isinstance(node, ast.Compare):
        return _compare(node, text)
    if isinstance(node, ast.Call):
        return _call(node, text)
    raise ConfigError(f"{text!r}: {type(node).__name__} is not allowed in a feature expression")


def _constant(node: ast.Constant, text: str) -> Literal:
    if isinstance(node.value, bool) or not isinstance(node.value, int | float | str):
        raise ConfigError(f"{text!r}: the constant {node.value!r} is not a number or a string")
    return Literal(node.value if isinstance(node.value, str) else float(node.value))


def _compare(node: ast.Compare, text: str) -> Compare:
    if len(node.ops) != 1 or type(node.ops[0]) not in _COMPARE:
        raise ConfigError(f"{text!r}: one comparison (< <= > >= == !=) at a time")
    op = _COMPARE[type(node.ops[0])]
    left, right = _build(node.left, text), _build(node.comparators[0], text)
    strings = [isinstance(side, Literal) and isinstance(side.value, str) for side in (left, right)]
    if any(strings) and op not in ("==", "!="):
        raise ConfigError(f"{text!r}: strings can only be compared with == or !=")
    return Compare(op, left, right)


def _call(node: ast.Call, text: str) -> Call:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        known = ", ".join(FUNCTIONS)
        raise ConfigError(f"{text!r}: unknown function {name!r} (expected one of {known})")
    if node.keywords or len(node.args) != FUNCTIONS[node.func.id]:
        raise ConfigError(
            f"{text!r}: {node.func.id}() takes {FUNCTIONS[node.func.id]} positional arguments"
        )
    return Call(node.func.id, tuple(_build(arg, text) for arg in node.args))


def referenced_names(expr: Expr) -> set[str]:
    """Every name the expression reads (features, columns, calendar parts)."""
    if isinstance(expr, Name):
        return {expr.name}
    if isinstance(expr, Literal):
        return set()
    if isinstance(expr, Not):
        return referenced_names(expr.operand)
    if isinstance(expr, Call):
        return set().union(*(referenced_names(arg) for arg in expr.args))
    return referenced_names(expr.left) | referenced_names(expr.right)
