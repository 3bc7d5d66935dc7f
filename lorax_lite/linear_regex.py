"""Regular expressions read from files, matched in time linear in the text.

Python's `re` backtracks: ``([a-z_.0-9]+)+x`` takes time exponential in the length of a
text it fails on, so a pattern read from a file (a PEFT ``rank_pattern`` key) could hang
the reader. `compile_pattern` parses the part of Python's syntax such files use (literals,
``.``, classes, ``\\d \\w \\s`` and their negations, groups, alternation, greedy and lazy
quantifiers, ``^ $ \\A \\Z``) into a Thompson automaton; `Pattern.fullmatch` runs it over
the text with every state at once, caching each step, so its time is the text's length
times the automaton's size, which is bounded. Back-references, look-arounds, inline flags,
word boundaries and possessive quantifiers are refused, naming the construct.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

# The most instructions an automaton may have (a counted repeat copies its body).
MAX_STATES = 5000
# Steps cached per pattern before the cache starts over (a guard on memory, not time).
MAX_CACHED_STEPS = 20000
CHAR, SPLIT, JUMP, START, END, MATCH = range(6)
CLASS_ESCAPES: dict[str, Callable[[str], bool]] = {
    "d": str.isdecimal,
    "w": lambda c: c.isalnum() or c == "_",
    "s": str.isspace,
}
CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}


class Pattern:
    """A compiled pattern: `fullmatch` says whether it matches a whole text."""

    def __init__(self, pattern: str, program: list[tuple]):
        self.pattern, self._program = pattern, program
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._start = self._closure([0], at_start=True)

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches all of ``text`` (as `re.fullmatch`)."""
        states = self._start
        for char in text:
            if not states:
                return False
            key = (states, char)
            if key not in self._steps:
                if len(self._steps) >= MAX_CACHED_STEPS:
                    self._steps.clear()
                moved = [pc + 1 for pc in states if self._program[pc][0] == CHAR]
                moved = [pc for pc in moved if self._program[pc - 1][1](char)]
                self._steps[key] = self._closure(moved, at_start=False)
            states = self._steps[key]
        # At the end of an empty text the start assertions hold too (``$^`` matches "").
        final = self._closure(states, at_start=not text, at_end=True)
        return MATCH in {self._program[pc][0] for pc in final}

    def _closure(self, pcs: Any, *, at_start: bool = False, at_end: bool = False) -> frozenset[int]:
        """The states reached from ``pcs`` without reading a character: those that read one,
        the match, and (unless ``at_end``) the end assertions, decided once the text ends."""
        seen, stack, found = set(), list(pcs), set()
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            op = self._program[pc]
            if op[0] == SPLIT:
                stack += [op[1], op[2]]
            elif op[0] == JUMP:
                stack.append(op[1])
            elif op[0] == START:
                stack += [pc + 1] if at_start else []
            elif op[0] == END and at_end:
                stack.append(pc + 1)
            else:
                found.add(pc)
        return frozenset(found)


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Pattern:
    """Parses ``pattern`` (Python's syntax, the subset above) into a `Pattern`.

    Raises:
        ValueError: naming the position and the construct that is invalid or refused,
            or saying that the pattern's automaton would exceed `MAX_STATES`.
    """
    parser = _Parser(pattern)
    tree = parser.alternation()
    if parser.pos < len(pattern):
        parser.fail("unbalanced parenthesis")
    program: list[tuple] = []
    _emit(tree, program)
    program.append((MATCH,))
    return Pattern(pattern, program)


def pattern_error(pattern: str) -> str | None:
    """Why `compile_pattern` refuses ``pattern``, or None."""
    try:
        compile_pattern(pattern)
    except ValueError as err:
        return str(err)
    return None


class _Parser:
    """Recursive descent over the pattern into nested tuples: ``("char", test)``,
    ``("cat", parts)``, ``("alt", parts)``, ``("repeat", part, low, high or None)``,
    ``("assert", START or END)``."""

    def __init__(self, pattern: str):
        self.text, self.pos = pattern, 0

    def fail(self, what: str) -> None:
        raise ValueError(f"{what} at position {self.pos}")

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self) -> tuple:
        parts = []
        while self.peek() not in ("", "|", ")"):
            parts.append(self.quantified(self.atom()))
        return ("cat", parts)

    def quantified(self, atom: tuple) -> tuple:
        bounds = self.quantifier()
        if bounds is None:
            return atom
        if atom[0] == "assert":
            self.fail("nothing to repeat")
        if self.peek() == "+":
            self.fail("a possessive quantifier is not supported")
        self.pos += self.peek() == "?"  # lazy: the same texts match
        if self.quantifier(peek_only=True):
            self.fail("multiple repeat")
        return ("repeat", atom, *bounds)

    def quantifier(self, *, peek_only: bool = False) -> tuple[int, int | None] | None:
        """The bounds of the quantifier at the position (``*``, ``+``, ``?``, ``{m}``,
        ``{m,}``, ``{,n}``, ``{m,n}``), or None (a ``{`` that is no quantifier is a literal)."""
        simple = {"*": (0, None), "+": (1, None), "?": (0, 1)}
        end = self.pos + 1
        if self.peek() in simple:
            bounds = simple[self.peek()]
        elif self.peek() == "{" and (end := self.text.find("}", self.pos) + 1) > 0:
            low, comma, high = self.text[self.pos + 1 : end - 1].partition(",")
            number = lambda x: x.isascii() and x.isdigit()
            if not (low or high) or not all(number(x) or not x for x in (low, high)):
                return None
            bounds = (int(low or 0), (int(high) if high else None) if comma else int(low))
            if bounds[1] is not None and bounds[1] < bounds[0]:
                self.fail("min repeat greater than max repeat")
        else:
            return None
        if not peek_only:
            self.pos = end
        return bounds

    def atom(self) -> tuple:
        char = self.peek()
        if char in "*+?" or (char == "{" and self.quantifier(peek_only=True)):
            self.fail("nothing to repeat")
        self.pos += 1
        if char == "(":
            return self.group()
        if char == "[":
            return ("char", self.char_class())
        if char == ".":
            return ("char", lambda c: c != "\n")
        if char in "^$":
            return ("assert", START if char == "^" else END)
        if char == "\\":
            return self.escape()
        return ("char", char.__eq__)

    def group(self) -> tuple:
        if self.peek() == "?":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.text.startswith("?P<", self.pos) and ">" in self.text[self.pos :]:
                self.pos = self.text.index(">", self.pos) + 1
            else:
                self.fail(f"the group '({self.text[self.pos : self.pos + 3]}' is not supported")
        inner = self.alternation()
        if self.peek() != ")":
            self.fail("missing ), unterminated subpattern")
        self.pos += 1
        return inner

    def escape(self) -> tuple:
        char = self.peek()
        self.pos += 1
        if char in ("A", "Z"):
            return ("assert", START if char == "A" else END)
        test = self.escaped_char(char)
        return ("char", test)

    def escaped_char(self, char: str) -> Callable[[str], bool]:
        if char.lower() in CLASS_ESCAPES:
            test = CLASS_ESCAPES[char.lower()]
            return test if char.islower() else lambda c: not test(c)
        if char in CHAR_ESCAPES:
            return CHAR_ESCAPES[char].__eq__
        if char == "":
            self.fail("a trailing backslash")
        if char.isascii() and char.isalnum():
            self.pos -= 1
            self.fail(f"the escape \\{char} is not supported")
        return char.__eq__

    def char_class(self) -> Callable[[str], bool]:
        negated = self.peek() == "^"
        self.pos += negated
        tests: list[Callable[[str], bool]] = []
        first = True
        while first or self.peek() != "]":
            first, char = False, self.peek()
            if not char:
                self.fail("unterminated character set")
            self.pos += 1
            if char == "\\":
                escaped = self.peek()
                self.pos += 1
                tests.append(self.escaped_char(escaped))
                if escaped.lower() in CLASS_ESCAPES:
                    continue
                char = CHAR_ESCAPES.get(escaped, escaped)
            else:
                tests.append(char.__eq__)
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                high = self.peek(1)
                self.pos += 2
                if high == "\\":
                    high = CHAR_ESCAPES.get(self.peek(), self.peek())
                    self.pos += 1
                if high < char:
                    self.fail("bad character range")

                def in_range(c: str, low: str = char, high: str = high) -> bool:
                    return low <= c <= high

                tests[-1] = in_range
        self.pos += 1
        return lambda c: any(test(c) for test in tests) != negated


# The place of an instruction that is filled in once the jump's target is known.
_PENDING: tuple = ()


def _emit(node: tuple, program: list[tuple]) -> None:
    """Appends the instructions of ``node`` to ``program``."""
    if len(program) > MAX_STATES:
        raise ValueError(f"the pattern needs more than {MAX_STATES} states (repeat counts)")
    kind = node[0]
    if kind == "char":
        program.append((CHAR, node[1]))
    elif kind == "assert":
        program.append((node[1],))
    elif kind == "cat":
        for part in node[1]:
            _emit(part, program)
    elif kind == "alt":
        jumps = []
        for branch in node[1][:-1]:
            split = len(program)
            program.append(_PENDING)
            _emit(branch, program)
            jumps.append(len(program))
            program.append(_PENDING)
            program[split] = (SPLIT, split + 1, len(program))
        _emit(node[1][-1], program)
        for jump in jumps:
            program[jump] = (JUMP, len(program))
    else:
        _, part, low, high = node
        _emit_repeat(part, low, high, program)


def _emit_repeat(part: tuple, low: int, high: int | None, program: list[tuple]) -> None:
    for _ in range(low):
        _emit(part, program)
    if high is None:
        loop = len(program)
        program.append(_PENDING)
        _emit(part, program)
        program.append((JUMP, loop))
        program[loop] = (SPLIT, loop + 1, len(program))
        return
    splits = []
    for _ in range(high - low):
        splits.append(len(program))
        program.append(_PENDING)
        _emit(part, program)
    for split in splits:
        program[split] = (SPLIT, split + 1, len(program))
