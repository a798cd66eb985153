"""The shell variables of a pasted launch script, resolved as bash would when the script runs with no arguments
and an empty environment, so the launcher command the readers split carries values, not ``$NAMES``.

Why: the frameworks' example scripts set their numbers in variables (veRL ``gen_tp=2 ...
rollout.tensor_model_parallel_size=$gen_tp``, ``NNODES=${NNODES:-1}``, ``max_len=$((1024 * 2))``; OpenRLHF bash
arrays ``ENGINE_ARGS=(--actor.num_gpus_per_node 4 ...) ... ${ENGINE_ARGS[@]}``; DeepSpeed-Chat
``ACTOR_ZERO_STAGE=$3`` then ``if [ "$ACTOR_ZERO_STAGE" == "" ]; then ACTOR_ZERO_STAGE=2; fi``). Read literally,
``$gen_tp`` is no number and ``rollout.name=$ENGINE`` silently becomes the default engine.

What is resolved: plain and ``export``-ed assignments, arrays, ``$NAME``, ``${NAME}``, ``${NAME:-word}``, ``${NAME-
word}``, ``${NAME:=word}``, ``${NAME:+word}``, ``${ARRAY[@]}`` and integer ``$((...))``. Positional parameters, the
environment (``$HOME``), command substitution, a variable set to nothing (``MODEL_PATH= # fill in``) and other
expansions stay as written: unknown. An assignment inside ``if``/``case``/``for``/``while`` fills a variable that is
unset or empty (the scripts' default pattern); one that would change a set value makes it unknown (which branch runs
is not known). The readers refuse a setting they use whose value is still unknown.
"""
from __future__ import annotations

import ast
import operator
import re
import shlex

UNSET = "a shell variable the pasted text does not set to one value"  # the readers' words for what stays ``$NAME``
_NAME = re.compile(r"[A-Za-z_]\w*")
_ASSIGN = re.compile(r"(?:export\s+|declare\s+(?:-\w+\s+)*|local\s+|readonly\s+)?([A-Za-z_]\w*)=(.*)", re.S)
_ARRAY = re.compile(r"(?:export\s+|declare\s+(?:-\w+\s+)*|local\s+)?[A-Za-z_]\w*=\(.*\)", re.S)
_OPEN = {"if", "case", "for", "while", "until", "select"}
_CLOSE = {"fi", "esac", "done"}
_LEADING = ("then", "else", "do", "elif")
_Value = str | list[str] | None  # None: unknown (set from what the script does not say)


def unresolved(text: str) -> bool:
    """Whether a value still holds a shell expansion (``$NAME``, ``${...}``, ``$(...)``)."""
    return re.search(r"\$[{(\w@*#?!-]", text) is not None


def expand_script(text: str) -> str:
    """``text`` (comments dropped, line continuations joined) with the variables it sets expanded."""
    text = re.sub(r'"(\$\{[A-Za-z_]\w*\[@\]\})"', r"\1", text)  # "${A[@]}": one word per element, as unquoted here
    env: dict[str, _Value] = {}
    ambiguous: set[str] = set()
    depth, out = 0, []
    for seg in _segments(text):
        body = seg.strip()
        while True:  # ``then X=1``, ``else X=2``: the assignment after the keyword
            first = body.split(None, 1)
            if first and first[0] in _LEADING:
                body = first[1] if len(first) > 1 else ""
                if first[0] == "elif":
                    break
                continue
            break
        word = body.split(None, 1)[0] if body.split() else ""
        if word in _OPEN:
            depth += 1
        elif word in _CLOSE:
            depth = max(0, depth - 1)
        assigned = _assignment(body, env)
        if assigned is not None:
            name, value = assigned
            current = env.get(name)
            if depth == 0:
                env[name] = value
                ambiguous.discard(name)
            elif name not in ambiguous and current in (None, "", []):
                env[name] = value
            elif current != value:
                env[name] = None
                ambiguous.add(name)
            if isinstance(value, list) or _ARRAY.fullmatch(body):  # its words count where it is expanded
                continue
        out.append(_expand(seg, env))
    return "\n".join(out)


class Quoting:
    """bash's quoting, read one character at a time: :meth:`plain` says whether a character stands outside
    quotes and unescaped (the one place the readers' scanners keep that state)."""

    def __init__(self) -> None:
        self.quote, self.escaped = "", False

    def plain(self, ch: str) -> bool:
        if self.escaped:
            self.escaped = False
        elif ch == "\\" and self.quote != "'":
            self.escaped = True
        elif self.quote:
            self.quote = "" if ch == self.quote else self.quote
        elif ch in "'\"":
            self.quote = ch
        else:
            return True
        return False


def _segments(text: str) -> list[str]:
    """Commands split at newlines and ``;`` outside quotes and outside an array's parentheses."""
    segs: list[str] = []
    quoting, start, parens = Quoting(), 0, 0
    for i, ch in enumerate(text):
        if not quoting.plain(ch):
            continue
        if ch == "(":
            parens += 1
        elif ch == ")":
            parens = max(0, parens - 1)
        elif parens == 0 and (ch == "\n" or (ch == ";" and text[i + 1:i + 2] != ";" and text[i - 1:i] != ";")):
            segs.append(text[start:i])
            start = i + 1
    segs.append(text[start:])
    return [s for s in segs if s.strip()]


def _assignment(body: str, env: dict[str, _Value]) -> tuple[str, _Value] | None:
    """(name, value) when ``body`` is one variable assignment and nothing else, else None."""
    m = _ASSIGN.fullmatch(body)
    if not m:
        return None
    name, raw = m.group(1), m.group(2).strip()
    if raw.startswith("(") and raw.endswith(")"):  # an array
        try:
            words = shlex.split(_expand(raw[1:-1], env))
        except ValueError:
            return name, None
        return name, None if any(unresolved(w) for w in words) else words
    if not _one_word(raw):  # ``X=1 cmd ...``: an environment for one command, not an assignment
        return None
    try:
        words = shlex.split(_expand(raw, env))
    except ValueError:
        return name, None
    value = " ".join(words)
    return name, None if unresolved(value) else value


def _one_word(raw: str) -> bool:
    """Whether ``raw`` is one shell word: no blank outside quotes, ``$(...)``, ``$((...))`` and ``${...}``."""
    quoting, level = Quoting(), 0
    for i, ch in enumerate(raw):
        if not quoting.plain(ch):
            continue
        if ch in "({" and (raw[i - 1:i] in ("$", "(") or level):
            level += 1
        elif ch in ")}" and level:
            level -= 1
        elif ch.isspace() and not level:
            return False
    return True


def _expand(seg: str, env: dict[str, _Value]) -> str:
    """``seg`` with every expansion of a known variable replaced (quoted so the shell's word split is kept)."""
    out, i, quote = [], 0, ""
    while i < len(seg):
        ch = seg[i]
        if ch == "\\" and quote != "'" and i + 1 < len(seg):
            out.append(seg[i:i + 2])
            i += 2
            continue
        if quote == "'":
            quote = "" if ch == "'" else quote
        elif ch in "'\"" and (not quote or quote == ch):
            quote = "" if quote else ch
        elif ch == "$":
            end, value = _reference(seg, i, env)
            if value is None:
                out.append(seg[i:end])
            else:
                out.append(_quoted(value, inside=quote == '"'))
            i = end
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _quoted(value: str | list[str], inside: bool) -> str:
    if inside:  # within "...": one word, with what the shell would re-read escaped
        text = " ".join(value) if isinstance(value, list) else value
        return re.sub(r'(["\\$`])', r"\\\1", text)
    words = value if isinstance(value, list) else value.split()
    return " ".join(shlex.quote(w) for w in words)


def _reference(seg: str, i: int, env: dict[str, _Value]) -> tuple[int, str | list[str] | None]:
    """(end index, value) of the expansion starting at ``seg[i] == '$'``; value None when unknown."""
    if seg.startswith("$((", i):
        end = _matching(seg, i + 1, "(", ")")
        if end is None or seg[end - 2:end] != "))":
            return i + 1, None
        return end, _arith(seg[i + 3:end - 2], env)
    if seg.startswith("${", i):
        end = _matching(seg, i + 1, "{", "}")
        if end is None:
            return i + 1, None
        return end, _braced(seg[i + 2:end - 1], env)
    m = _NAME.match(seg, i + 1)
    if m:
        return m.end(), _scalar(env.get(m.group())) or None
    return i + 1, None


def _matching(seg: str, start: int, open_: str, close: str) -> int | None:
    """Index after the bracket that closes ``seg[start]``."""
    level = 0
    for j in range(start, len(seg)):
        if seg[j] == open_:
            level += 1
        elif seg[j] == close:
            level -= 1
            if level == 0:
                return j + 1
    return None


def _scalar(value: _Value) -> str | None:
    if isinstance(value, list):
        return value[0] if value else ""
    return value


def _braced(inner: str, env: dict[str, _Value]) -> str | list[str] | None:
    m = re.fullmatch(r"([A-Za-z_]\w*)\[[@*]\]", inner)
    if m:
        value = env.get(m.group(1))
        return value if isinstance(value, list) else None
    m = re.fullmatch(r"([A-Za-z_]\w*|\d+)(?:(:?[-=+])(.*))?", inner, re.S)  # $1..: no arguments given
    if not m:
        return None  # ${#X}, ${X//a/b}, ${1}, ...: not resolved
    name, op, word = m.group(1), m.group(2), m.group(3)
    value = _scalar(env.get(name)) if name in env else None
    if op is None:  # an empty value stays ``$NAME`` too: ``ACTOR_MODEL_PATH= # provide the path`` is a blank to fill
        return value or None
    known = name in env and env[name] is not None
    use_default = (value in (None, "")) if op.startswith(":") else not known
    if name in env and env[name] is None:  # unknown: cannot tell which side applies
        return None
    if op.endswith("+"):
        return "" if use_default else _word(word, env)
    if not use_default:
        return value
    default = _word(word, env)
    if op.endswith("=") and default is not None:
        env[name] = default
    return default


def _word(word: str, env: dict[str, _Value]) -> str | None:
    try:
        words = shlex.split(_expand(word, env))
    except ValueError:
        return None
    text = " ".join(words)
    return None if unresolved(text) else text


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Mod: operator.mod,
        ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


def _arith(expr: str, env: dict[str, _Value]) -> str | None:
    """An integer ``$((...))`` of + - * / % ** over numbers and variables holding integers, else None."""
    def name(m: re.Match[str]) -> str:
        v = _scalar(env.get(m.group(1)))
        return v if v is not None and re.fullmatch(r"-?\d+", v) else "?"

    text = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", name, expr)
    text = re.sub(r"\b([A-Za-z_]\w*)\b", name, text)
    if not re.fullmatch(r"[\d\s+\-*/%()]*", text) or not text.strip():
        return None
    try:
        tree = ast.parse(text.replace("/", "//").strip(), mode="eval")
        return str(_eval(tree.body))
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def _eval(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and not 0 <= right <= 64:  # 10**10**10 would not finish
            raise ValueError("exponent out of range")
        if isinstance(node.op, ast.FloorDiv):  # bash truncates toward zero
            quotient = abs(left) // abs(right)
            return quotient if (left < 0) == (right < 0) else -quotient
        return int(_OPS[type(node.op)](left, right))
    raise ValueError("not an integer expression")
