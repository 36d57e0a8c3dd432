"""Deforum keyframe schedules ("0:(7.5), 30:(0.5*sin(t/10)+7)") with a safe arithmetic evaluator.

Semantics follow Deforum: a keyframe whose value is a plain number pins that frame, and
frames between numbers are interpolated linearly (held constant before the first and
after the last); a keyframe whose value is an expression is evaluated at every frame
from it until the next keyframe, with ``t`` the frame index, ``max_f`` the last frame
and ``s`` the seed. Expressions are parsed with ``ast`` and only arithmetic, the math
functions below and those three names are allowed: no Python ``eval``.
"""

from __future__ import annotations

import ast
import bisect
import math
import re
import operator
from dataclasses import dataclass

from .errors import short_repr, shorten

FUNCTIONS = {
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
    "atan": math.atan, "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "abs": abs,
    "min": min, "max": max, "floor": math.floor, "ceil": math.ceil, "round": round,
    "where": lambda cond, a, b: a if cond else b,  # numexpr's where(), as Deforum users write it
}
CONSTANTS = {"pi": math.pi, "e": math.e}
VARIABLES = ("t", "max_f", "s")
_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_COMPARE = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
MAX_EXPONENT = 1000  # 9**9**9 would otherwise hang the planner
# Bounds on what a job file can make validation do (numbers are floats, so no operation is slow):
MAX_SCHEDULE_CHARS = 1_000_000
MAX_EXPRESSION_CHARS = 1000
MAX_KEYFRAMES = 10_000
MAX_EVALUATIONS = 2_000_000  # expression nodes x frames evaluated, per schedule (about a second)
_FRAME = re.compile(r"[0-9]{1,9}")  # ASCII digits: int() would also read '٣' or '０'


class ScheduleError(ValueError):
    """A schedule that cannot be parsed or evaluated; the message says where."""


class Expression:
    """A compiled arithmetic expression over t, max_f and s."""

    def __init__(self, text: str):
        self.text = text.strip()
        if len(self.text) > MAX_EXPRESSION_CHARS:
            raise ScheduleError(f"expression of {len(self.text):,} characters; the limit is {MAX_EXPRESSION_CHARS:,}")
        try:
            tree = ast.parse(self.text, mode="eval")
        except SyntaxError as exc:
            raise ScheduleError(f"bad expression {shorten(self.text)!r}: {exc.msg}") from None
        except (ValueError, RecursionError, MemoryError):  # a NUL; nesting the parser refuses
            raise ScheduleError(f"bad expression {shorten(self.text)!r}") from None
        self._check(tree.body)
        self.tree = tree.body
        self.size = sum(1 for _ in ast.walk(tree))
        self.constant = not any(isinstance(n, ast.Name) and n.id in VARIABLES for n in ast.walk(tree))

    def _check(self, node) -> None:
        for child in ast.walk(node):
            allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Compare,
                       ast.Load, ast.operator, ast.unaryop, ast.cmpop)
            if not isinstance(child, allowed):
                raise ScheduleError(f"{type(child).__name__} is not allowed in {self.text!r}: use arithmetic, "
                                    f"{', '.join(VARIABLES)} and functions {', '.join(FUNCTIONS)}")
            if isinstance(child, ast.Constant) and (isinstance(child.value, bool)
                                                    or not isinstance(child.value, (int, float))):
                raise ScheduleError(f"only numbers are allowed in {self.text!r}, got {short_repr(child.value)}")
            if isinstance(child, ast.Constant) and isinstance(child.value, int) and child.value.bit_length() > 1000:
                raise ScheduleError(f"number too large in {shorten(self.text)!r}")
            if isinstance(child, ast.Name) and child.id not in FUNCTIONS and child.id not in CONSTANTS \
                    and child.id not in VARIABLES:
                raise ScheduleError(f"unknown name '{child.id}' in {self.text!r}; names: "
                                    f"{', '.join(VARIABLES + tuple(CONSTANTS))}")
            if isinstance(child, ast.Call) and not (isinstance(child.func, ast.Name) and child.func.id in FUNCTIONS):
                raise ScheduleError(f"unknown function in {self.text!r}; functions: {', '.join(FUNCTIONS)}")

    def __call__(self, t: float = 0, max_f: float = 0, s: float = 0) -> float:
        scope = {"t": t, "max_f": max_f, "s": s, **CONSTANTS}
        try:
            value = _evaluate(self.tree, scope)
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise ScheduleError(f"{self.text!r} fails at t={t}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ScheduleError(f"{self.text!r} gives {value!r} at t={t}, not a finite number")
        return float(value)


def _evaluate(node, scope: dict):
    # Numbers are floats throughout (as in Deforum's numexpr): a power of a power of a huge
    # integer would otherwise compute for hours; a float overflows at once.
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(scope[node.id])
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, scope))
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, scope), _evaluate(node.right, scope)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, scope)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node, scope)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        value = FUNCTIONS[node.func.id](*(_evaluate(arg, scope) for arg in node.args))
        return value if isinstance(value, (bool, float)) else float(value)  # floor() and round() give ints
    raise ValueError(f"unsupported {type(node).__name__}")


@dataclass
class Schedule:
    """Keyframes of a numeric parameter: frame -> Expression."""

    keyframes: dict

    @classmethod
    def parse(cls, text) -> "Schedule":
        """Parse Deforum's ``frame:(expression), ...``; a bare number is a constant schedule."""
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            if not math.isfinite(text) or abs(text) > 1e300:
                raise ScheduleError(f"expected a finite number, got {short_repr(text)}")
            return cls({0: Expression(repr(float(text)))})
        text = str(text)
        if len(text) > MAX_SCHEDULE_CHARS:
            raise ScheduleError(f"schedule of {len(text):,} characters; the limit is {MAX_SCHEDULE_CHARS:,}")
        keyframes = {}
        pairs = _split(text)
        if len(pairs) > MAX_KEYFRAMES:
            raise ScheduleError(f"{len(pairs):,} keyframes; a schedule may have at most {MAX_KEYFRAMES:,}")
        for frame_text, expression in pairs:
            if not _FRAME.fullmatch(frame_text.strip()):
                raise ScheduleError(f"keyframe {shorten(frame_text.strip())!r} is not a frame number")
            frame = int(frame_text)
            if frame in keyframes:
                raise ScheduleError(f"frame {frame} appears twice")
            keyframes[frame] = Expression(expression)
        if not keyframes:
            raise ScheduleError("empty schedule; write e.g. \"0:(7.5), 48:(12)\"")
        return cls(dict(sorted(keyframes.items())))

    def values(self, frames: int, seed: int = 0) -> list[float]:
        """The value at every frame 0..frames-1."""
        self._check_cost(frames)
        max_f = frames - 1
        series: list[float | None] = [None] * frames
        current = None
        for f in range(frames):
            if f in self.keyframes:
                current = self.keyframes[f]
                if current.constant:
                    series[f] = current(f, max_f, seed)
            if current is not None and not current.constant:
                series[f] = current(f, max_f, seed)
        return _fill_linear(series)


    def _check_cost(self, frames: int) -> None:
        """Refuse a schedule whose expressions would take long to evaluate over ``frames`` frames."""
        starts = sorted(self.keyframes)
        cost = 0
        for position, frame in enumerate(starts):
            expression = self.keyframes[frame]
            end = starts[position + 1] if position + 1 < len(starts) else frames
            span = 1 if expression.constant else max(0, min(end, frames) - frame)
            cost += expression.size * span
        if cost > MAX_EVALUATIONS:
            raise ScheduleError(f"evaluating it over {frames:,} frames takes {cost:,} steps; the limit is "
                                f"{MAX_EVALUATIONS:,}: use shorter expressions or plain numbers between keyframes")


def _split(text: str) -> list[tuple[str, str]]:
    """``0:(a), 10:(b)`` -> [("0", "a"), ("10", "b")], honouring nested parentheses (one pass)."""
    pairs, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            return pairs
        colon = text.find(":", i)
        if colon < 0:
            raise ScheduleError(f"expected 'frame:(value)' at {shorten(text[i:].strip())!r}")
        frame = shorten(text[i:colon].strip())
        start = colon + 1
        while start < n and text[start] in " \t":
            start += 1
        if start >= n or text[start] != "(":
            raise ScheduleError(f"expected '(' after '{frame}:'")
        depth, j = 0, start
        while j < n:
            char = text[j]
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth:
            raise ScheduleError(f"unbalanced parentheses after '{frame}:'")
        pairs.append((text[i:colon], text[start + 1:j]))
        i = j + 1
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] != ",":
            raise ScheduleError(f"expected ',' before {text[i:i + 20]!r}")
        i += 1


def _fill_linear(series: list) -> list[float]:
    """Linear interpolation over the None gaps; constant before the first and after the last value."""
    known = [i for i, v in enumerate(series) if v is not None]
    result = list(series)
    for i in range(len(series)):
        if result[i] is not None:
            continue
        position = bisect.bisect_left(known, i)  # known[position] is the first value after i
        before = known[position - 1] if position else None
        after = known[position] if position < len(known) else None
        if before is None:
            result[i] = series[after]
        elif after is None:
            result[i] = series[before]
        else:
            w = (i - before) / (after - before)
            result[i] = series[before] + (series[after] - series[before]) * w
    return result
