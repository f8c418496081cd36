"""Data: loading errors, prompt masking, packing, eval split, batching, resume, sharding."""
import json

import numpy as np
import pytest

from onn_jax.data.corpus import build_corpus
from onn_jax.data.dataset import Dataset, load_chat_jsonl, load_records, load_text, make_examples, split_eval
from onn_jax.data.records import DataError
from onn_jax.data.tokenizer import ByteTokenizer

B = ByteTokenizer
TOK = ByteTokenizer()


def chat(user, answer, domain="d"):
    return {"domain": domain, "messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def small_ds():
    return Dataset(build_corpus(0, 60), TOK, seq_len=64, eval_fraction=0.1)


# ------------------------------------------------------------------ masking and packing

def test_prompt_masking_hand_example():
    ex = make_examples([chat("ab", "c")], TOK, seq_len=9, domains=["d"], pack=False)
    a, b, c = map(ord, "abc")
    np.testing.assert_array_equal(
        ex.tokens, [[B.BOS, B.USER, a, b, B.EOS, B.ASSISTANT, c, B.EOS, B.PAD, B.PAD]])
    # loss_mask[t] is for target tokens[t + 1]: only "c" (t=5) and its EOS (t=6) count.
    np.testing.assert_array_equal(ex.loss_mask, [[0, 0, 0, 0, 0, 1, 1, 0, 0]])
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == np.float32


def test_packing_by_domain_never_splits_records():
    recs = [chat("a", "x", "p"), chat("b", "y", "q"), chat("c", "z", "p"), chat("dd", "w", "p")]
    # Each record is 8 tokens (the last 9); a row holds 17 tokens: two records, then a new row.
    ex = make_examples(recs, TOK, seq_len=16, domains=["p", "q"])
    assert ex.domain.tolist() == [0, 0, 1]
    row0 = [B.BOS, B.USER, ord("a"), B.EOS, B.ASSISTANT, ord("x"), B.EOS,
            B.BOS, B.USER, ord("c"), B.EOS, B.ASSISTANT, ord("z"), B.EOS]
    assert ex.tokens[0].tolist() == row0 + [B.PAD] * 3
    assert ex.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert ex.tokens[1, :9].tolist() == [B.BOS, B.USER, ord("d"), ord("d"), B.EOS,
                                         B.ASSISTANT, ord("w"), B.EOS, B.PAD]
    assert ex.tokens[2, 2] == ord("b")


def test_truncation_and_strict_mode(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "x" * 50}]}) + "\n")
    recs = load_chat_jsonl(path)
    ex = make_examples(recs, TOK, seq_len=10, domains=["long"])
    assert ex.tokens.shape == (1, 11) and (ex.tokens[0, 5:] == ord("x")).all()
    assert ex.loss_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    with pytest.raises(DataError, match=f"^{path}:1: record has 56 tokens, more than seq_len"):
        make_examples(recs, TOK, seq_len=10, domains=["long"], strict=True)


@pytest.mark.parametrize("pack", [True, False])
def test_long_text_record_is_split_into_rows_each_token_trained_once(pack):
    """A text record longer than a row is not cut: its rows overlap by one token (a row's first
    token is the previous row's last, the context of its first target), and the trained targets,
    read row by row, are the record's tokens after BOS exactly once, in order; strict changes nothing."""
    text = "".join(chr(ord("a") + i % 26) for i in range(30))
    record = {"domain": "book", "text": text}
    want = [ord(c) for c in text] + [B.EOS]  # every token after BOS is a target once
    for strict in (False, True):
        ex = make_examples([record], TOK, seq_len=10, domains=["book"], pack=pack, strict=strict)
        assert ex.tokens.shape == (4, 11)  # 32 tokens, rows start every 10: 0, 10, 20, 30
        targets = [int(ex.tokens[n, t + 1]) for n in range(len(ex.tokens)) for t in range(10) if ex.loss_mask[n, t]]
        assert targets == want
        for n in range(1, 4):
            assert ex.tokens[n, 0] == ex.tokens[n - 1, 10]  # one token of overlap
        assert ex.tokens[0, 0] == B.BOS and ex.tokens[3, 1] == B.EOS and (ex.tokens[3, 2:] == B.PAD).all()


# ------------------------------------------------------------------ eval split

def test_eval_split_disjoint_deterministic_order_free():
    recs = build_corpus(0, 100)
    train, held = split_eval(recs, 0.1)
    key = lambda r: json.dumps(r, sort_keys=True)
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert len(train) + len(held) == len(recs)
    assert 0.05 < len(held) / len(recs) < 0.15
    train2, held2 = split_eval(recs[::-1], 0.1)
    assert sorted(map(key, held2)) == sorted(map(key, held))
    dup_train, dup_held = split_eval(recs[:10] * 2, 0.5)  # duplicates stay together
    assert dup_train and dup_held and not {key(r) for r in dup_train} & {key(r) for r in dup_held}
    assert len(split_eval(recs[:2], 1e-9)[1]) == 1  # tiny fraction still holds one out
    assert split_eval(recs, 0.0)[1] == []


def test_dataset_eval_rows_disjoint_from_train(small_ds):
    as_set = lambda ex: {r.tobytes() for r in ex.tokens}
    assert len(small_ds.eval) > 0 and not as_set(small_ds.train) & as_set(small_ds.eval)
    assert small_ds.domains == ("arithmetic", "brackets", "prose", "strings")


# ------------------------------------------------------------------ batches

def test_batch_shapes_dtypes_and_shift(small_ds):
    batch = next(small_ds.train_iter(global_batch=8, seed=0))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((8, 64), np.int32), "targets": ((8, 64), np.int32),
        "loss_mask": ((8, 64), np.float32), "domain": ((8,), np.int32)}
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert (batch["inputs"][:, 0] == B.BOS).all()
    assert ((batch["inputs"] >= 0) & (batch["inputs"] < TOK.vocab_size)).all()
    assert (batch["loss_mask"][batch["targets"] == B.PAD] == 0).all()
    assert set(batch["domain"].tolist()) <= {0, 1, 2, 3}


def _rows(batch):
    return [r.tobytes() for r in batch["inputs"]]


def test_each_epoch_visits_every_row_once_and_reshuffles(small_ds):
    n = len(small_ds.train)
    it = small_ds.train_iter(global_batch=n, seed=5)
    e0, e1 = next(it), next(it)
    all_rows = sorted(r.tobytes() for r in small_ds.train.tokens[:, :-1])
    assert sorted(_rows(e0)) == sorted(_rows(e1)) == all_rows
    assert _rows(e0) != _rows(e1)
    assert _rows(e0) == _rows(next(small_ds.train_iter(global_batch=n, seed=5)))
    assert _rows(e0) != _rows(next(small_ds.train_iter(global_batch=n, seed=6)))


def test_resume_from_state_gives_identical_next_batches(small_ds):
    n = len(small_ds.train)
    gb = 6 if n % 6 else 7  # a batch size that does not divide N: batches straddle epochs
    it = small_ds.train_iter(global_batch=gb, seed=1)
    for _ in range(n // gb + 2):  # past the first epoch boundary
        next(it)
    saved = json.loads(json.dumps(it.state()))
    assert saved["epoch"] == 1 and set(saved) == {"epoch", "index"}
    want = [next(it) for _ in range(3)]
    resumed = small_ds.train_iter(global_batch=gb, seed=1, state=saved)
    for w in want:
        got = next(resumed)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    as_arrays = {k: np.asarray(v) for k, v in saved.items()}  # as a checkpoint may restore it
    np.testing.assert_array_equal(next(small_ds.train_iter(gb, 1, state=as_arrays))["inputs"],
                                  want[0]["inputs"])
    for bad in ({"epoch": 0, "index": n}, {"epoch": 0}, {"epoch": 0.5, "index": 0}, [0, 0]):
        with pytest.raises(ValueError, match="bad data iterator state"):
            small_ds.train_iter(global_batch=gb, state=bad)


@pytest.mark.parametrize("count", [2, 4])
def test_process_sharding_covers_global_batch_once(small_ds, count):
    whole = small_ds.train_iter(global_batch=8, seed=2)
    parts = [small_ds.train_iter(global_batch=8, seed=2, process_index=p, process_count=count)
             for p in range(count)]
    for _ in range(3):
        g = next(whole)
        local = [next(p) for p in parts]
        assert all(b["inputs"].shape == (8 // count, 64) for b in local)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), g[k])
    with pytest.raises(ValueError, match="global_batch 6 is not divisible by process_count 4"):
        small_ds.train_iter(global_batch=6, process_count=4)


def test_eval_batches_cover_eval_rows_once_with_masked_padding(small_ds):
    n = len(small_ds.eval)
    gb = 4 if n % 4 else 3
    batches = list(small_ds.eval_batches(global_batch=gb))
    assert len(batches) == -(-n // gb)
    real = [r for b in batches for r, d in zip(_rows(b), b["domain"]) if d >= 0]
    assert real == [r.tobytes() for r in small_ds.eval.tokens[:, :-1]]
    last = batches[-1]
    pad = last["domain"] == -1
    assert pad.sum() == gb * len(batches) - n > 0
    assert (last["loss_mask"][pad] == 0).all() and (last["inputs"][pad] == B.PAD).all()
    halves = [list(small_ds.eval_batches(global_batch=gb * 2, process_index=p, process_count=2))
              for p in range(2)]
    for b0, _ in zip(*halves):
        assert b0["inputs"].shape[0] == gb
    joined = [np.concatenate([b0["inputs"], b1["inputs"]]) for b0, b1 in zip(*halves)]
    full = list(small_ds.eval_batches(global_batch=gb * 2))
    for j, f in zip(joined, full):
        np.testing.assert_array_equal(j, f["inputs"])


# ------------------------------------------------------------------ user files and errors

def test_load_chat_jsonl_and_text(tmp_path):
    p = tmp_path / "math.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1"},
                                          {"role": "assistant", "content": "2"}]}) + "\n\n"
                 + json.dumps({"domain": "x", "messages": [{"role": "assistant", "content": "hi"}]}))
    t = tmp_path / "book.txt"
    t.write_text("First para\nline two.\n\n\n  Second para.\n\n" + "z" * 25 + "\n")
    recs = load_records([p, t], chunk_chars=24)
    assert [(r["domain"], r["source"]) for r in recs] == [
        ("math", f"{p}:1"), ("x", f"{p}:3"), ("book", f"{t}:1"), ("book", f"{t}:5"),
        ("book", f"{t}:7"), ("book", f"{t}:7")]
    assert [r["text"] for r in recs[2:]] == [
        "First para\nline two.", "Second para.", "z" * 24, "z"]
    merged = load_text(t, chunk_chars=40)
    assert merged[0]["text"] == "First para\nline two.\n\nSecond para."
    ds = Dataset(recs, TOK, seq_len=32, eval_fraction=0.0)
    assert ds.domains == ("book", "math", "x") and len(ds.eval) == 0


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize("line,message", [
    ('{"messages": [', "malformed JSON"),
    ('["not", "an", "object"]', "expected a JSON object, got list"),
    ('{"domain": "d"}', 'missing or empty "messages" list'),
    ('{"messages": []}', 'missing or empty "messages" list'),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', "messages\\[0\\] has unknown role 'robot'"),
    ('{"messages": ["hi"]}', 'messages\\[0\\] must be an object with a string "content"'),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "messages\\[0\\] must be"),
    ('{"domain": 7, "messages": [{"role": "assistant", "content": "a"}]}', '"domain" must be'),
])
def test_bad_chat_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(GOOD + "\n\n" + line + "\n" + GOOD + "\n")
    with pytest.raises(DataError, match=f"^{p}:3: {message}") as e:
        load_records([p])
    assert (e.value.path, e.value.line) == (str(p), 3)


def test_bad_files_name_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match=f"^{empty}: no records"):
        load_records([empty])
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    with pytest.raises(DataError, match=f"^{blank}: no text"):
        load_records([blank])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\nfine\n\xff\xfe bad\n")
    with pytest.raises(DataError, match=f"^{binary}:3: invalid UTF-8"):
        load_records([binary])
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(GOOD.encode() + b"\n\xff\n")
    with pytest.raises(DataError, match=f"^{bad_utf8}:2: invalid UTF-8"):
        load_records([bad_utf8])
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_records([tmp_path / "nope.jsonl"])
    with pytest.raises(ValueError, match="corpus is empty"):
        Dataset([], TOK, seq_len=8)
