"""Sweeps over named train.py constants: parse ``--param NAME=SPEC``, generate points, apply them.

Pure functions, no wire: ``autoresearch-coord sweep`` (coordinator.cli) feeds the points it
generates here to the coordinator, one at a time, as backpressure allows (coordinator.pacing).

Specs (one ``--param`` per constant):

    NAME=2,3,4            a list (grid axis; in random mode one of them, uniformly)
    NAME=lin:A:B[:N]      uniform between A and B; in grid mode N evenly spaced values A..B
    NAME=log:A:B[:N]      log-uniform between A and B (0 < A < B); in grid mode N values
                          evenly spaced in log A..log B

Values keep the type they are written in: ``2`` is an int, ``2.0`` and ``1e-3`` are floats,
``true``/``false`` are booleans, quoted text (``'SSSL'``) is a string. A range whose bounds are
both ints draws ints (rounded, duplicates dropped); a float range draws floats rounded to
``SIG_DIGITS`` significant digits, so descriptions and the rewritten lines stay readable.

Modes: ``grid`` is the cartesian product of the axes, in the order given (the last ``--param``
varies fastest); ``random`` draws ``count`` distinct points with ``random.Random(seed)``. The
default (``mode=None``) is grid when every axis is a list or a range with N, else random.

Each point is applied to the head's train.py with ``trainer.presets.apply_overrides``, the same
constant rewriter the presets use, so a point changes exactly the named ``NAME = value`` lines
(comments kept). A name with no such line in train.py is an error before anything is submitted;
a point whose values equal the head's (evaluated from its lines: ``2**16`` equals ``65536``) is
skipped, since it would measure the head again under another name.
"""
from __future__ import annotations

import ast
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Iterator

from trainer.presets import apply_overrides

SIG_DIGITS = 4           # significant digits kept of a drawn float
MAX_GRID_POINTS = 100_000  # a grid larger than this is refused (a typo like lin:1:1e9:1e9)
DRAWS_PER_POINT = 200    # random mode gives up after count * this draws (small int spaces)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+|\.\d+[eE][+-]?\d+)$")


class SweepError(ValueError):
    """A bad --param spec or a sweep that cannot apply to train.py; the message says which."""


@dataclass(frozen=True)
class Axis:
    """One swept constant: either explicit ``values`` or a ``lin``/``log`` range."""
    name: str
    spec: str                       # as written, for error messages
    kind: str                       # "list" | "lin" | "log"
    values: tuple = ()              # kind "list"
    low: float | int = 0            # ranges
    high: float | int = 0
    steps: int | None = None        # grid points of a range (None: random mode only)
    ints: bool = False              # both range bounds written as ints

    @property
    def griddable(self) -> bool:
        return self.kind == "list" or self.steps is not None

    def grid_values(self) -> tuple:
        if self.kind == "list":
            return self.values
        if self.steps is None:
            raise SweepError(f"{self.name}={self.spec}: a range in grid mode needs a number of "
                             f"values, e.g. {self.name}={self.kind}:{self.low}:{self.high}:5")
        n = self.steps
        if n == 1:
            raw = [self.low]
        elif self.kind == "lin":
            raw = [self.low + (self.high - self.low) * i / (n - 1) for i in range(n)]
        else:
            lo, hi = math.log(self.low), math.log(self.high)
            raw = [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
        return _dedupe(self._typed(v) for v in raw)

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "list":
            return rng.choice(self.values)
        if self.kind == "lin":
            if self.ints:
                return rng.randint(int(self.low), int(self.high))
            return self._typed(rng.uniform(self.low, self.high))
        lo, hi = math.log(self.low), math.log(self.high)
        return self._typed(math.exp(rng.uniform(lo, hi)))

    def _typed(self, x: float) -> Any:
        if self.ints:
            return int(round(x))
        return float(f"{x:.{SIG_DIGITS}g}")


def _dedupe(values) -> tuple:
    out: list = []
    for v in values:
        if not any(type(v) is type(o) and v == o for o in out):
            out.append(v)
    return tuple(out)


def parse_value(token: str, where: str) -> Any:
    """One written value: int, float, bool or quoted string, else SweepError."""
    t = token.strip()
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t):
        return float(t)
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    raise SweepError(f"{where}: {token!r} is not a number, true/false or a quoted string "
                     "(quote text values: NAME=\"'SSSL','SSLL'\")")


def parse_param(text: str) -> Axis:
    """``NAME=SPEC`` -> Axis, or SweepError naming the bad spec."""
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name:
        raise SweepError(f"--param {text!r}: expected NAME=SPEC, e.g. MATRIX_LR=log:0.01:0.1 "
                         "or DEPTH=2,3,4")
    if not _NAME.match(name):
        raise SweepError(f"--param {text!r}: {name!r} is not a train.py constant name")
    where = f"--param {name}={spec}"
    if not spec:
        raise SweepError(f"{where}: no values given")
    head, _, rest = spec.partition(":")
    if head in ("lin", "log") and rest:
        return _parse_range(name, spec, head, rest.split(":"), where)
    if head in ("lin", "log"):
        raise SweepError(f"{where}: expected {head}:LOW:HIGH[:N]")
    if any(not tok.strip() for tok in spec.split(",")):
        raise SweepError(f"{where}: an empty value in the list")
    values = tuple(parse_value(tok, where) for tok in spec.split(","))
    return Axis(name=name, spec=spec, kind="list", values=_dedupe(values))


def _parse_range(name: str, spec: str, kind: str, parts: list[str], where: str) -> Axis:
    if len(parts) not in (2, 3):
        raise SweepError(f"{where}: expected {kind}:LOW:HIGH[:N]")
    low, high = (parse_value(p, where) for p in parts[:2])
    for v in (low, high):
        if isinstance(v, (bool, str)):
            raise SweepError(f"{where}: range bounds must be numbers, got {v!r}")
    if not low < high:
        raise SweepError(f"{where}: LOW must be below HIGH")
    if kind == "log" and low <= 0:
        raise SweepError(f"{where}: a log range needs 0 < LOW")
    steps = None
    if len(parts) == 3:
        if not _INT.match(parts[2].strip()) or int(parts[2]) < 1:
            raise SweepError(f"{where}: N must be a positive integer, got {parts[2]!r}")
        steps = int(parts[2])
    ints = isinstance(low, int) and isinstance(high, int)
    return Axis(name=name, spec=spec, kind=kind, low=low, high=high, steps=steps, ints=ints)


def parse_params(texts: list[str] | tuple[str, ...]) -> list[Axis]:
    """Every ``--param``; a name given twice is an error."""
    if not texts:
        raise SweepError("nothing to sweep: give at least one --param NAME=SPEC")
    axes = [parse_param(t) for t in texts]
    seen: set[str] = set()
    for a in axes:
        if a.name in seen:
            raise SweepError(f"--param {a.name} is given twice")
        seen.add(a.name)
    return axes


def resolve_mode(axes: list[Axis], mode: str | None) -> str:
    """``grid`` | ``random``; None picks grid when every axis can be listed."""
    if mode is None:
        return "grid" if all(a.griddable for a in axes) else "random"
    if mode not in ("grid", "random"):
        raise SweepError(f"unknown sweep mode {mode!r} (grid or random)")
    if mode == "grid":
        for a in axes:
            a.grid_values()     # raises for a range without N
    return mode


def grid_points(axes: list[Axis]) -> Iterator[dict]:
    """The cartesian product, first axis slowest."""
    lists = [a.grid_values() for a in axes]
    size = math.prod(len(v) for v in lists)
    if size > MAX_GRID_POINTS:
        raise SweepError(f"the grid has {size} points (more than {MAX_GRID_POINTS}): use fewer "
                         "values or --mode random")
    for combo in itertools.product(*lists):
        yield dict(zip((a.name for a in axes), combo))


def random_points(axes: list[Axis], seed: int) -> Iterator[dict]:
    """An endless seeded stream of draws (may repeat; ``points`` drops repeats)."""
    rng = random.Random(seed)
    while True:
        yield {a.name: a.draw(rng) for a in axes}


def _key(point: dict) -> tuple:
    return tuple(sorted((k, type(v).__name__, v) for k, v in point.items()))


def points(axes: list[Axis], mode: str | None = None, count: int | None = None,
           seed: int = 0, head: dict | None = None) -> list[dict]:
    """The sweep's distinct points, at most ``count`` (grid: default all; random: required),
    leaving out the one equal to ``head`` (the head's values, see ``head_point``)."""
    mode = resolve_mode(axes, mode)
    if mode == "random" and count is None:
        raise SweepError("a random sweep needs --count N")
    if count is not None and count < 1:
        raise SweepError("--count must be at least 1")
    seen: set = set()
    out: list[dict] = []
    source = grid_points(axes) if mode == "grid" else random_points(axes, seed)
    budget = None if mode == "grid" else count * DRAWS_PER_POINT
    for p in source:
        if budget is not None:
            if budget == 0:
                break   # a small space (int ranges, short lists) holds fewer points than asked
            budget -= 1
        k = _key(p)
        if k in seen or same_as_head(p, head):
            continue
        seen.add(k)
        out.append(p)
        if count is not None and len(out) >= count:
            break
    return out


# ---- train.py side ------------------------------------------------------------------------

def _const_value(node: ast.AST) -> Any:
    """The value of a constant expression (literals, + - * / // % **, unary -, tuples)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_const_value(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _const_value(node.operand)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp):
        a, b = _const_value(node.left), _const_value(node.right)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.Div: lambda: a / b, ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b,
               ast.Pow: lambda: a ** b if abs(b) < 64 else None}
        fn = ops.get(type(node.op))
        if fn is not None and all(isinstance(x, (int, float)) for x in (a, b)):
            return fn()
    raise ValueError("not a constant expression")


_UNKNOWN = object()


def head_values(train_py: str, names: list[str]) -> dict:
    """The current value of each named top-level constant; a name whose value is not a plain
    constant expression (a call, another name) is left out."""
    try:
        tree = ast.parse(train_py)
    except SyntaxError as exc:
        raise SweepError(f"the head's train.py does not parse: {exc}") from None
    found: dict = {}
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id in names):
            try:
                found[stmt.targets[0].id] = _const_value(stmt.value)
            except (ValueError, ArithmeticError, TypeError):
                found[stmt.targets[0].id] = _UNKNOWN
    return {k: v for k, v in found.items() if v is not _UNKNOWN}


def check_names(train_py: str, axes: list[Axis]) -> None:
    """Every swept name has exactly one ``NAME = ...`` line in train.py, else SweepError."""
    for a in axes:
        try:
            apply_overrides(train_py, {a.name: _probe(a)})
        except RuntimeError as exc:
            raise SweepError(f"--param {a.name}: not a constant of the head's train.py "
                             f"({exc})") from None


def _probe(a: Axis) -> Any:
    return a.values[0] if a.kind == "list" else a.low


def head_point(train_py: str, axes: list[Axis]) -> dict | None:
    """The head's values of the swept names (None if any is not a plain constant)."""
    vals = head_values(train_py, [a.name for a in axes])
    if len(vals) != len(axes):
        return None
    return {a.name: vals[a.name] for a in axes}


def same_as_head(point: dict, head: dict | None) -> bool:
    """Numerically equal values count as the head (DEPTH=4 and DEPTH=4.0 train the same)."""
    if head is None:
        return False
    return all(k in head and head[k] == v and isinstance(head[k], bool) == isinstance(v, bool)
               for k, v in point.items())


def apply_point(train_py: str, point: dict) -> str:
    """train.py with the point's constants rewritten (``apply_overrides``)."""
    try:
        return apply_overrides(train_py, point)
    except RuntimeError as exc:
        raise SweepError(str(exc)) from None


def describe(point: dict) -> str:
    """``sweep: MATRIX_LR=0.02, DEPTH=3`` -- the candidate's description."""
    return "sweep: " + ", ".join(f"{k}={v!r}" for k, v in point.items())


__all__ = ["Axis", "SweepError", "parse_param", "parse_params", "parse_value", "resolve_mode",
           "grid_points", "random_points", "points", "head_values", "head_point",
           "check_names", "same_as_head", "apply_point", "describe"]
