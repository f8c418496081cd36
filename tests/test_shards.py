"""Shards (onn-tokenize, onn_jax.data.shards): the same examples as the in-memory pipeline, a
resumable streaming iterator, and an onn-train run killed mid-epoch that resumes bit for bit."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("grain")

from test_faults import assert_bitwise_equal, final_params, reap  # noqa: E402

from onn_jax.data.dataset import Dataset, load_records  # noqa: E402
from onn_jax.data.shards import ShardDataset, write_shards  # noqa: E402
from onn_jax.data.tokenizer import ByteTokenizer, tokenizer_info  # noqa: E402
from train.main import main as train_main  # noqa: E402
from train.tokenize import main as tokenize_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


def corpus(tmp_path):
    """Two chat files (one record naming its own domain) and a text file."""
    chat = tmp_path / "qa.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                           {"role": "assistant", "content": str(2 * i)}]} for i in range(60)]
    lines[5]["domain"] = "other"
    chat.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: " + "words " * (i % 13) for i in range(80)))
    return [str(chat), str(text)]


@pytest.mark.parametrize("pack,eval_fraction", [(True, 0.1), (False, 0.0), (True, 1e-9)])
def test_shards_hold_the_in_memory_examples(tmp_path, pack, eval_fraction):
    paths = corpus(tmp_path)
    ds = Dataset(load_records(paths, chunk_chars=60), TOK, 24, eval_fraction, pack=pack)
    write_shards(paths, TOK, tokenizer_info("byte", TOK), tmp_path / "s", 24, eval_fraction, pack=pack,
                 chunk_chars=60, rows_per_shard=7)
    sh = ShardDataset(tmp_path / "s", TOK)
    assert sh.domains == ds.domains == ("book", "other", "qa")
    for mem, disk in ((ds.train, sh.train), (ds.eval, sh.eval)):
        tokens, loss_mask, domain = disk.take(np.arange(len(disk)))
        assert len(disk) == len(mem)
        np.testing.assert_array_equal(tokens, mem.tokens)
        np.testing.assert_array_equal(loss_mask, mem.loss_mask)
        np.testing.assert_array_equal(domain, mem.domain)
    assert len(ds.eval) > 0 or eval_fraction == 0  # 1e-9: the smallest-hash fallback
    mem_eval = list(ds.eval_batches(8))
    disk_eval = list(sh.eval_batches(8))
    assert len(mem_eval) == len(disk_eval)
    for a, b in zip(mem_eval, disk_eval):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_iterator_covers_each_epoch_once_and_resumes(tmp_path):
    paths = corpus(tmp_path)
    write_shards(paths, TOK, tokenizer_info("byte", TOK), tmp_path / "s", 24, 0.0, chunk_chars=60,
                 rows_per_shard=5)
    sh = ShardDataset(tmp_path / "s", TOK)
    n = len(sh.train)
    it = sh.train_iter(global_batch=n, seed=3)  # one epoch per batch
    first, second = next(it), next(it)
    all_tokens, _, _ = sh.train.take(np.arange(n))
    for b in (first, second):  # a permutation of all rows, a different one per epoch
        assert sorted(map(bytes, b["inputs"])) == sorted(map(bytes, all_tokens[:, :-1]))
    assert not np.array_equal(first["inputs"], second["inputs"])
    it = sh.train_iter(global_batch=4, seed=3)
    stream = [next(it) for _ in range(2 * n // 4 + 3)]
    saved = None
    it = sh.train_iter(global_batch=4, seed=3)
    for _ in range(5):
        next(it)
    saved = it.state()
    resumed = sh.train_iter(global_batch=4, seed=3, state=json.loads(json.dumps(saved)))
    for want in stream[5:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    halves = [sh.train_iter(4, 3, process_index=i, process_count=2) for i in range(2)]
    joined = np.concatenate([next(h)["inputs"] for h in halves])
    np.testing.assert_array_equal(joined, stream[0]["inputs"])
    with pytest.raises(ValueError, match="bad data iterator state"):
        sh.train_iter(4, 3, state={"epoch": 0, "index": 3})


def test_tokenize_cli_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    paths = corpus(tmp_path)
    assert tokenize_main([*paths, "--out", str(tmp_path / "a"), "--seq-len", "0"]) == 2
    assert capsys.readouterr().err.strip() == "onn-tokenize: error: --seq-len: must be >= 1, got 0"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [\n')
    assert tokenize_main([str(bad), "--out", str(tmp_path / "b")]) == 2
    assert f"{bad}:1: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "b" / "meta.json").exists() and not (tmp_path / "a").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep").write_text("x")
    assert tokenize_main([*paths, "--out", str(tmp_path / "c")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert os.listdir(tmp_path / "c") == ["keep"]


def train_cmd(workdir, shards, fault=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("ONN_TRAIN_FAULT", None)
    if fault:
        env["ONN_TRAIN_FAULT"], env["ONN_TRAIN_FAULT_TIMEOUT"] = fault, "300"
    cmd = [sys.executable, "-m", "train.main", "--workdir", str(workdir), "--config", "configs/tiny.py",
           f"--config.data.source=shards:{shards}", "--config.data.seq_len=32", "--config.train.steps=8",
           "--config.checkpoint.every=3", "--config.train.eval_every=0", "--config.train.eval_batches=1",
           "--config.train.sample_tokens=2", "--config.train.plots=false"]
    return cmd, dict(cwd=ROOT, env=env)


def train_in_process(workdir, shards):
    """(exit code, stdout, stderr) of a run to the end in this process (train.main.main, as
    onn-train calls it): the straight run and the resume check files and output, not the process
    boundary; the run killed at a fault point stays a real onn-train process."""
    cmd, _ = train_cmd(workdir, shards)
    assert cmd[1:3] == ["-m", "train.main"] and "ONN_TRAIN_FAULT" not in os.environ
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train_main(cmd[3:])
    return rc, out.getvalue(), err.getvalue()


def kill_at_fault(cmd, kw, fault, log):
    """Runs onn-train until it halts at the fault point, then kills it with SIGKILL."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kw)
    try:
        deadline = time.monotonic() + 180
        while f"fault point {fault} reached" not in Path(log).read_text():
            assert proc.poll() is None and time.monotonic() < deadline, Path(log).read_text()[-2000:]
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        reap(proc)


@pytest.mark.slow
def test_train_on_shards_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    paths = corpus(tmp_path)[:1]  # the chat file: about one record per row
    assert tokenize_main([*paths, "--out", str(tmp_path / "s"), "--seq-len", "32", "--eval-fraction", "0.1"]) == 0
    rows = json.loads((tmp_path / "s" / "meta.json").read_text())["rows"]["train"]
    assert 8 * 8 > rows > 3 * 8  # resumed at step 3 mid-epoch 0; the run ends in epoch 1
    rc, out, err = train_in_process(tmp_path / "straight", tmp_path / "s")
    assert rc == 0, err[-2000:]
    cmd, kw = train_cmd(tmp_path / "killed", tmp_path / "s", fault="after_step:4")
    kill_at_fault(cmd, kw, "after_step:4", tmp_path / "err.txt")
    rc, out, err = train_in_process(tmp_path / "killed", tmp_path / "s")
    assert rc == 0 and "resuming from step 3" in out, err[-2000:]
    assert_bitwise_equal(final_params(tmp_path / "killed", 8), final_params(tmp_path / "straight", 8))
