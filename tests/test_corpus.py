"""The embedded corpus: determinism, domains, and answers checked by independent code."""
import hashlib
import json
import re

import pytest

from onn_jax.data.corpus import DOMAINS, PROSE_MODULES, build_corpus, stdlib_docstrings


def _digest(records):
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def test_same_seed_same_records_different_seed_different():
    a, b, c = build_corpus(3, 40), build_corpus(3, 40), build_corpus(4, 40)
    assert a == b
    for d in DOMAINS:
        assert [r for r in a if r["domain"] == d] != [r for r in c if r["domain"] == d], d


def test_synthetic_domains_golden():
    # random.Random seeded by a string is stable across versions (same digest on CPython
    # 3.10.13, 3.11.2, 3.12.1, 3.13.0): pin the records.
    records = build_corpus(0, 5, domains=("arithmetic", "strings", "brackets"))
    assert records[0]["messages"][0]["content"] == "Compute 881 + 29."
    assert records[0]["messages"][1]["content"] == "910"
    assert _digest(records) == "cff911c71d1c77c3"


def test_every_domain_present_with_requested_counts():
    records = build_corpus(0, 50)
    counts = {d: sum(r["domain"] == d for r in records) for d in DOMAINS}
    assert counts == {d: 50 for d in DOMAINS}
    for r in records:
        assert set(r) == {"domain", "messages"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    for d in DOMAINS:  # distinct prompts within a domain
        prompts = [r["messages"][0]["content"] for r in records if r["domain"] == d]
        assert len(set(prompts)) == len(prompts)


def _balanced_by_reduction(s):
    while any(p in s for p in ("()", "[]", "{}")):
        s = s.replace("()", "").replace("[]", "").replace("{}", "")
    return s == ""


def test_answers_are_correct():
    records = build_corpus(1, 300, domains=("arithmetic", "strings", "brackets"))
    for r in records:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        if r["domain"] == "arithmetic":
            x, op, y = re.search(r"(\d+) ([-+*]) (\d+)", q).groups()
            assert int(a) == {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(x), int(y))
        elif r["domain"] == "strings":
            w = re.search(r"([a-z]+)'?\??$", q).group(1)
            want = {"Reverse": w[::-1], "Write": w.upper(), "Sort": "".join(sorted(w)),
                    "How": str(len(w))}[q.split()[0]]
            assert a == want, q
        else:
            s = q.split()[-1]
            if q.startswith("Is this balanced?"):
                assert a == ("yes" if _balanced_by_reduction(s) else "no"), q
            elif q.startswith("What is the nesting depth"):
                s = s[:-1]  # trailing "?"
                assert _balanced_by_reduction(s)
                depths = [s[:i].count("(") + s[:i].count("[") + s[:i].count("{")
                          - s[:i].count(")") - s[:i].count("]") - s[:i].count("}")
                          for i in range(len(s) + 1)]
                assert int(a) == max(depths), q
            else:
                closing = "" if a == "(nothing to close)" else a
                assert _balanced_by_reduction(s + closing), q
    answers = {r["messages"][1]["content"] for r in records if r["domain"] == "brackets"}
    assert {"yes", "no"} <= answers


def test_prose_is_stdlib_docstrings():
    docs = stdlib_docstrings()
    assert len(docs) >= 300
    modules = {name.split(".")[0] for name, _ in docs}
    assert modules <= {m.split(".")[0] for m in PROSE_MODULES}
    assert len(modules) >= 40
    text_by_name = dict(docs)
    assert text_by_name["bisect.insort_right"].startswith("Insert item x in list a")
    prose = [r for r in build_corpus(0, 10_000, domains=("prose",))]
    assert len(prose) == len(docs)  # bounded by what the stdlib holds
    for r in prose:
        name = re.search(r"`?([\w.]+?)`?(?: do\?|\.| briefly\.)$", r["messages"][0]["content"]).group(1)
        assert r["messages"][1]["content"] == text_by_name[name]
        assert len(r["messages"][1]["content"]) <= 244


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown corpus domains \\['poetry'\\]"):
        build_corpus(0, 10, domains=("poetry",))
    with pytest.raises(ValueError, match="records_per_domain"):
        build_corpus(0, 0)
