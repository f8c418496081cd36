"""An embedded, offline, deterministic multi-domain chat corpus.

`build_corpus(seed, records_per_domain)` returns chat records
`{"domain": str, "messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` from
four labelled domains, so routing can be analysed per domain:

- `arithmetic`: add, subtract and multiply small integers ("What is 37 + 48?" -> "85").
- `strings`: reverse, upper-case, sort the letters of, or count a random word.
- `brackets`: is a bracket string balanced, its nesting depth, close the open brackets.
- `prose`: real English, the first paragraph of docstrings from a fixed list of Python
  standard library modules, read from their source files with `ast` (nothing imported,
  no network). The list holds modules whose docstrings are identical on Python 3.11,
  3.12 and 3.13 (checked when the list was made); an interpreter with a different
  standard library, or one shipped without .py sources, gives a different prose set.

Same seed -> identical records (random.Random seeded with strings is stable across
versions); a different seed gives different records. Pure standard library on purpose.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import random

DOMAINS = ("arithmetic", "strings", "brackets", "prose")

# Standard library modules whose docstrings (as read here) are identical on CPython
# 3.11.2, 3.11.7, 3.12.1 and 3.13.0.
PROSE_MODULES = (
    "argparse", "bisect", "cmd", "code", "codeop", "colorsys", "contextlib", "dataclasses",
    "difflib", "filecmp", "fileinput", "fnmatch", "getopt", "gettext", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.cookies", "imaplib", "json", "json.decoder",
    "json.encoder", "linecache", "netrc", "numbers", "operator", "optparse", "pprint",
    "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil",
    "smtplib", "socketserver", "string", "tabnanny", "tempfile", "textwrap", "timeit",
    "trace", "urllib.parse", "uuid", "weakref",
)


def _record(domain: str, prompt: str, answer: str) -> dict:
    return {"domain": domain, "messages": [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": answer}]}


def _arithmetic(rng: random.Random) -> dict:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
    else:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    template = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} ="))
    return _record("arithmetic", template.format(a=a, op=op, b=b), str(value))


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))


def _strings(rng: random.Random) -> dict:
    w = _word(rng)
    task = rng.choice(("reverse", "upper", "sort", "length"))
    prompt, answer = {
        "reverse": (f"Reverse the word: {w}", w[::-1]),
        "upper": (f"Write in upper case: {w}", w.upper()),
        "sort": (f"Sort the letters of: {w}", "".join(sorted(w))),
        "length": (f"How many letters are in '{w}'?", str(len(w))),
    }[task]
    return _record("strings", prompt, answer)


_PAIRS = {"(": ")", "[": "]", "{": "}"}


def _balanced(rng: random.Random, n_pairs: int) -> str:
    """A random balanced string of n_pairs bracket pairs."""
    out, stack, opened = [], [], 0
    while opened < n_pairs or stack:
        if opened < n_pairs and (not stack or rng.random() < 0.5):
            c = rng.choice("([{")
            out.append(c)
            stack.append(c)
            opened += 1
        else:
            out.append(_PAIRS[stack.pop()])
    return "".join(out)


def is_balanced(s: str) -> bool:
    stack = []
    for c in s:
        if c in _PAIRS:
            stack.append(c)
        elif not stack or _PAIRS[stack.pop()] != c:
            return False
    return not stack


def depth(s: str) -> int:
    """Maximum nesting depth of a balanced bracket string."""
    d = best = 0
    for c in s:
        d += 1 if c in _PAIRS else -1
        best = max(best, d)
    return best


def _brackets(rng: random.Random) -> dict:
    s = _balanced(rng, rng.randint(1, 6))
    task = rng.choice(("balanced", "depth", "close"))
    if task == "balanced":
        if rng.random() < 0.5:  # corrupt: swap two characters or change one closer
            i = rng.randrange(len(s))
            s = s[:i] + rng.choice("()[]{}") + s[i + 1:]
        return _record("brackets", f"Is this balanced? {s}", "yes" if is_balanced(s) else "no")
    if task == "depth":
        return _record("brackets", f"What is the nesting depth of {s}?", str(depth(s)))
    cut = rng.randint(1, len(s) - 1)
    prefix, stack = s[:cut], []
    for c in prefix:
        if c in _PAIRS:
            stack.append(c)
        else:
            stack.pop()
    closing = "".join(_PAIRS[c] for c in reversed(stack))
    return _record("brackets", f"Close the open brackets: {prefix}", closing or "(nothing to close)")


def _first_paragraph(doc: str, max_chars: int) -> str | None:
    """The first paragraph as one line, clipped at a word boundary; None if unusable."""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(para.split())
    if len(text) < 40 or ">>>" in text:
        return None
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0] + " ..."
    return text


@functools.lru_cache(maxsize=None)
def stdlib_docstrings(modules: tuple[str, ...] = PROSE_MODULES,
                      max_chars: int = 240) -> tuple[tuple[str, str], ...]:
    """(dotted name, first docstring paragraph) of public modules, classes, functions and
    methods of `modules`, in source order; modules without a .py source are skipped."""
    out = []
    for mod in modules:
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        items = [(mod, tree)]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                items.append((f"{mod}.{node.name}", node))
                if isinstance(node, ast.ClassDef):
                    items += [(f"{mod}.{node.name}.{m.name}", m) for m in node.body
                              if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")]
        for name, node in items:
            doc = ast.get_docstring(node, clean=False)
            text = _first_paragraph(doc, max_chars) if doc else None
            if text is not None:
                out.append((name, text))
    return tuple(out)


def _prose(rng: random.Random, name: str, text: str) -> dict:
    template = rng.choice(("What does `{n}` do?", "Describe `{n}`.", "Explain {n} briefly."))
    return _record("prose", template.format(n=name), text)


_GENERATORS = {"arithmetic": _arithmetic, "strings": _strings, "brackets": _brackets}


def build_corpus(seed: int = 0, records_per_domain: int = 1000,
                 domains: tuple[str, ...] = DOMAINS, max_prose_chars: int = 240) -> list[dict]:
    """Distinct records, `records_per_domain` per domain (prose: at most the number of
    docstrings available, 404 on CPython 3.11-3.13), grouped by domain in the order of `domains`."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown corpus domains {unknown}; expected a subset of {list(DOMAINS)}")
    if records_per_domain < 1:
        raise ValueError(f"records_per_domain must be >= 1, got {records_per_domain}")
    records = []
    for domain in domains:
        rng = random.Random(f"onn-corpus:{seed}:{domain}")
        if domain == "prose":
            docs = list(stdlib_docstrings(PROSE_MODULES, max_prose_chars))
            rng.shuffle(docs)
            records += [_prose(rng, n, t) for n, t in docs[:records_per_domain]]
            continue
        seen, attempts = set(), 0
        while len(seen) < records_per_domain and attempts < 20 * records_per_domain:
            attempts += 1
            r = _GENERATORS[domain](rng)
            key = r["messages"][0]["content"]
            if key not in seen:
                seen.add(key)
                records.append(r)
    return records
