"""Bad input to onn-train: each case exits with code 2 and one `onn-train: ...` line on stderr
naming the field, file and line; no traceback; nothing in the existing workdir (a trained run
of configs/tiny.py) is overwritten, deleted or added (sha256 of every file, before and after)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

pytest.importorskip("orbax.checkpoint")

from train.main import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
FAST = ["--config.train.steps=4", "--config.checkpoint.every=2", "--config.train.eval_every=0",
        "--config.train.sample_tokens=2", "--config.train.log_every=2"]


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An existing workdir: 4 steps of configs/tiny.py, checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    assert main(["--config", TINY, "--workdir", str(workdir), *FAST]) == 0
    return workdir


def onn_train_fails(capsys, workdir: Path, *args: str, config: str = TINY) -> str:
    """Runs onn-train on `workdir`; asserts exit 2, one message line, no traceback and an
    unchanged workdir; returns the message."""
    before = tree_hash(workdir) if workdir.is_dir() else None
    capsys.readouterr()
    argv = (["--config", config] if config else []) + ["--workdir", str(workdir), *FAST, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("onn-train:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if before is not None:
        assert tree_hash(workdir) == before
    return lines[0]


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


# ---------------------------------------------------------------- the config (file and overrides)

@pytest.mark.parametrize("override, expected", [
    ("--config.model.moe.num_expert=3", "--config.model.moe.num_expert: unknown key 'model.moe.num_expert'"),
    ("--config.train.steps=ten", "--config.train.steps=ten: expected an integer"),
    ("--config.train.steps=2.5", "--config.train.steps=2.5: must be an integer, got float 2.5"),
    ("--config.model.num_heads=3", "--config.model.num_heads=3: must divide hidden (32), got 3"),
    ("--config.model.moe.fallback_k=5", "--config.model.moe.fallback_k=5: must be <= num_experts (4), got 5"),
    ("--config.model.moe.w_kl=-1", "--config.model.moe.w_kl=-1: must be >= 0, got -1"),
    ("--config.optim.lr=0", "--config.optim.lr=0: must be > 0"),
    ("--config.data.seq_len=128", "--config.data.seq_len=128: must be <= model.max_len (64)"),
    ("--config.model.moe.router=topany",
     "--config.model.moe.router=topany: must be one of ['surprise', 'topk', 'dense']"),
    ("--config.data.pack=maybe", "--config.data.pack=maybe: expected a bool"),
    ("--config.data.eval_fraction=1.5", "--config.data.eval_fraction=1.5: must be < 1, got 1.5"),
    ("--config.train.max_skipped_in_a_row=0", "--config.train.max_skipped_in_a_row=0: must be > 0"),
    ("--config.model.attention=flash", "--config.model.attention=flash: must be one of ['xla', 'cudnn', 'auto']"),
    ("--config.model.attention=cudnn", "--config.model.attention=cudnn: 'cudnn' (fused flash attention) needs "
                                       "dtype='bfloat16', got dtype='float32'"),
    ("--config.model", "--config.model: override needs a value"),
    ("--config.model.moe.surprise=bogus", "--config.model.moe.surprise=bogus: must be one of ['advantage', "),
    ("--config.optim.idle_experts=none", "--config.optim.idle_experts=none: must be one of ['skip', 'zero_grad']"),
    ("--config.model=3", "'model' is a section of"),
])
def test_bad_override(capsys, trained, override, expected):
    msg = onn_train_fails(capsys, trained, override)
    assert msg.startswith("onn-train: config error:") and expected in msg, msg


def test_cudnn_attention_without_a_cuda_gpu(capsys, trained):
    if jax.default_backend() == "gpu":
        pytest.skip("this backend has cuDNN")
    msg = onn_train_fails(capsys, trained, "--config.model.dtype=bfloat16", "--config.model.attention=cudnn")
    assert "onn-train: error: model.attention: 'cudnn' needs a CUDA GPU; jax's backend here is 'cpu'" in msg


@pytest.mark.parametrize("body, expected", [
    ("c.model.moe.num_expert = 3", "model.moe.num_expert: unknown key"),
    ("c.train.steps = 'ten'", "get_config() failed: TypeError: Could not override field 'steps'"),
    ("c = dict(c.to_dict(), train=dict(c.train.to_dict(), eval_batches='two'))",
     "train.eval_batches: must be an integer, got str 'two'"),
    ("c.model.moe.w_ce = -0.5", "model.moe.w_ce: must be >= 0, got -0.5"),
])
def test_bad_value_in_config_file_names_file_and_line(capsys, trained, tmp_path, body, expected):
    text = ("from configs.tiny import get_config as tiny\n\n\ndef get_config():\n    c = tiny()\n"
            f"    {body}\n    return c\n")
    cfg = write(tmp_path / "bad.py", text)
    msg = onn_train_fails(capsys, trained, config=cfg)
    assert f"{cfg}:6: {expected}" in msg, msg


def test_config_file_missing_or_broken(capsys, trained, tmp_path):
    assert f"{tmp_path / 'none.py'}: config file not found" in onn_train_fails(
        capsys, trained, config=str(tmp_path / "none.py"))
    cfg = write(tmp_path / "broken.py", "def get_config():\n    return {'model': {\n")
    assert f"{cfg}:2: cannot load config file: SyntaxError" in onn_train_fails(capsys, trained, config=cfg)


@pytest.mark.parametrize("text, line, expected", [
    ("import sys\n\nsys.exit(0)\n", 3, "cannot load config file: it calls sys.exit(0) (SystemExit)"),
    ("def get_config():\n    raise SystemExit('bye')\n", 2, "get_config() failed: it calls sys.exit('bye')"),
    ("def get_config():\n    exit(3)\n", 2, "get_config() failed: it calls sys.exit(3)"),
    ("class Stop(BaseException):\n    pass\n\n\nraise Stop('odd')\n", 5, "cannot load config file: Stop: odd"),
])
def test_config_file_that_exits_is_a_config_error(capsys, tmp_path, text, line, expected):
    """Issue 26.1: a config file that exits (even with 0) or raises any BaseException is a config
    error: one line naming the file and line, exit 2, nothing written."""
    cfg = write(tmp_path / "exits.py", text)
    msg = onn_train_fails(capsys, tmp_path / "run", config=cfg)
    assert msg.startswith(f"onn-train: config error: {cfg}:{line}: {expected}"), msg
    assert not (tmp_path / "run").exists()


def test_missing_config_flag_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # a workdir without a saved config.json
        main(["--workdir", str(tmp_path)])
    assert e.value.code == 2 and "--config" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, fields", [
    (["--config.model.moe.surprise=advantage"], "model.moe.surprise"),
    (["--config.model.moe.w_kl=0.0", "--config.optim.weight_decay=0.1"], "model.moe.w_kl, optim.weight_decay"),
    (["--config.optim.idle_experts=zero_grad"], "optim.idle_experts"),
])
def test_resume_that_changes_semantics_is_refused(capsys, trained, overrides, fields):
    msg = onn_train_fails(capsys, trained, *overrides)
    assert msg.startswith(f"onn-train: error: {fields}: resuming") and "--allow-config-change" in msg, msg


def test_resume_with_the_saved_config_and_a_recorded_change(capsys, trained, tmp_path):
    """Without --config the saved config is used (its overrides need not be repeated); an
    allowed change of semantics is recorded in metrics.jsonl and the checkpoint metadata."""
    workdir = copy_of(trained, tmp_path)
    assert main(["--workdir", str(workdir), "--config.train.steps=6"]) == 0  # FAST's values are kept
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["checkpoint"]["every"] == 2
    assert main(["--workdir", str(workdir), "--config.train.steps=8", "--config.model.moe.w_kl=0.5"]) == 2
    assert main(["--workdir", str(workdir), "--config.train.steps=8", "--config.model.moe.w_kl=0.5",
                 "--allow-config-change"]) == 0
    assert "config changed on resume at step 6" in capsys.readouterr().out
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    changed = [r for r in rows if "config/changed_on_resume" in r]
    assert [r["step"] for r in changed] == [8] and changed[0]["config/changed_on_resume"] == "model.moe.w_kl 1.0 -> 0.5"
    meta = json.loads((workdir / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["config_changes"] == [{"step": 6, "changes": ["model.moe.w_kl 1.0 -> 0.5"]}]


# ---------------------------------------------------------------- data and tokenizer

def test_missing_data_file(capsys, trained, tmp_path):
    msg = onn_train_fails(capsys, trained, f"--config.data.source={tmp_path / 'none.jsonl'}")
    assert f"data.source: {tmp_path / 'none.jsonl'}: file not found" in msg


def test_data_source_is_a_directory(capsys, trained, tmp_path):
    msg = onn_train_fails(capsys, trained, f"--config.data.source={tmp_path}")
    assert f"data.source: {tmp_path}: is a directory" in msg


@pytest.mark.parametrize("lines, line_no, expected", [
    ([CHAT, '{"messages": [\n'], 2, "malformed JSON"),
    ([CHAT, CHAT, '{"messages": [{"role": "user", "content": "only a question"}]}\n'], 3,
     "no assistant message: nothing to train on"),
    (['{"messages": [{"role": "bot", "content": "x"}]}\n'], 1, "messages[0] has unknown role 'bot'"),
    ([CHAT, '["not", "an", "object"]\n'], 2, "expected a JSON object, got list"),
    ([CHAT, '{"messages": [{"role": "assistant", "content": 3}]}\n'], 2,
     'messages[0] must be an object with a string "content"'),
])
def test_bad_jsonl_line(capsys, trained, tmp_path, lines, line_no, expected):
    data = write(tmp_path / "chat.jsonl", "".join(lines))
    msg = onn_train_fails(capsys, trained, f"--config.data.source={data}")
    assert f"data.source: {data}:{line_no}: {expected}" in msg, msg


DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize("line, expected", [
    (DEEP, "JSON nested too deeply for the JSON reader"),
    ('{"n": ' + "9" * 5000 + "}", "JSON the reader cannot take: Exceeds the limit (4300 digits)"),
    ('{"messages": [{"role": "assistant", "content": "a\\ud800b"}]}', "messages[0].content is not valid text: "
     "'\\ud800' at character 1 is a lone surrogate"),
    ('{"messages": [{"role": "assistant", "content": "ok"}], "domain": "\\udc00"}',
     '"domain" is not valid text'),
    ('{"messages": [{"role": "assistant", "content": "' + "x" * 300 + '"}]}', "line longer than 256 bytes"),
])
def test_json_record_the_reader_cannot_take(capsys, trained, tmp_path, monkeypatch, line, expected):
    """Issue 26.2: any record the JSON reader cannot take (depth, size, encoding) is a data error
    naming file:line (no RecursionError traceback)."""
    from onn_jax.data import records
    if "longer than" in expected:  # the size limit (256 MiB) scaled down
        monkeypatch.setattr(records, "MAX_LINE_BYTES", 256)
    data = write(tmp_path / "chat.jsonl", CHAT + line + "\n" + CHAT)
    msg = onn_train_fails(capsys, trained, f"--config.data.source={data}")
    assert f"data.source: {data}:2: {expected}" in msg, msg


def test_empty_corpus(capsys, trained, tmp_path):
    data = write(tmp_path / "empty.jsonl", "\n\n")
    assert f"data.source: {data}: no records (the file is empty)" in onn_train_fails(
        capsys, trained, f"--config.data.source={data}")


def test_invalid_utf8_text(capsys, trained, tmp_path):
    data = write(tmp_path / "book.txt", b"fine line\n\xff\xfe broken\n")
    assert f"data.source: {data}:2: invalid UTF-8" in onn_train_fails(capsys, trained, f"--config.data.source={data}")


def test_sequence_longer_than_the_maximum_in_strict_mode(capsys, trained, tmp_path):
    long = '{"messages": [{"role": "assistant", "content": "' + "x" * 40 + '"}]}\n'
    data = write(tmp_path / "chat.jsonl", CHAT + long + CHAT)
    msg = onn_train_fails(capsys, trained, f"--config.data.source={data}", "--config.data.strict=true",
                          "--config.data.seq_len=16", "--config.data.eval_fraction=0")
    assert f"data.source: {data}:2: record has 43 tokens, more than seq_len + 1 = 17" in msg, msg


def test_tokenizer_file_not_found(capsys, trained, tmp_path):
    msg = onn_train_fails(capsys, trained, f"--config.data.tokenizer={tmp_path / 'tok.json'}")
    assert f"data.tokenizer: {tmp_path / 'tok.json'}: tokenizer file not found" in msg


def test_vocab_size_smaller_than_the_tokenizer(capsys, trained):
    msg = onn_train_fails(capsys, trained, "--config.model.vocab_size=100")
    assert "model.vocab_size: must be >= the tokenizer's vocab size 262 (byte), got 100" in msg


# ---------------------------------------------------------------- the workdir and its checkpoints

def copy_of(trained: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "copy"
    shutil.copytree(trained, workdir)
    return workdir


def test_tokenizer_not_matching_the_checkpoint(capsys, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    meta_file = workdir / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["tokenizer"] = {"name": "other/tokenizer.json", "vocab_size": 300, "fingerprint": "0123abcd"}
    meta_file.write_text(json.dumps(meta))
    msg = onn_train_fails(capsys, workdir)
    assert (f"data.tokenizer: checkpoint {workdir / 'checkpoints' / '4'} was trained with tokenizer "
            "'other/tokenizer.json' (vocab 300), but this run uses 'byte' (vocab 262") in msg, msg


def test_checkpoint_shapes_not_matching_the_config(capsys, trained):
    msg = onn_train_fails(capsys, trained, "--config.model.hidden=64")
    assert msg.startswith("onn-train: error: model.hidden: resuming") and "model.hidden 32 -> 64" in msg, msg
    msg = onn_train_fails(capsys, trained, "--config.model.hidden=64", "--allow-config-change")
    assert "onn-train: error: model.hidden: the model config differs" in msg and "model.hidden 32 -> 64" in msg
    assert "has shape" in msg and "(32," in msg and "(64," in msg, msg


def test_damaged_checkpoint(capsys, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for p in (workdir / "checkpoints" / "4" / "state").rglob("manifest.ocdbt"):
        p.write_bytes(b"garbage")
    msg = onn_train_fails(capsys, workdir)
    assert f"cannot read checkpoint {workdir / 'checkpoints'}/4" in msg and "damaged" in msg, msg


def test_resume_with_changed_data_settings(capsys, trained):
    msg = onn_train_fails(capsys, trained, "--config.data.records_per_domain=2")
    assert msg.startswith("onn-train: error: data.records_per_domain: the data settings differ"), msg
    assert "data.records_per_domain 100 -> 2" in msg and "new --workdir" in msg, msg
    msg = onn_train_fails(capsys, trained, "--config.data.seed=7", "--config.data.batch_size=4")
    assert "data.batch_size 8 -> 4; data.seed 0 -> 7" in msg, msg


def test_data_position_beyond_the_changed_data(capsys, trained, tmp_path):
    """Same settings, but the user's data file shrank under the run."""
    data = tmp_path / "chat.jsonl"
    records = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": "a" * 40}]}) for i in range(60)]
    data.write_text("\n".join(records) + "\n")
    workdir = tmp_path / "run"
    args = ["--config.data.source=" + str(data), "--config.data.batch_size=2"]
    assert main(["--config", TINY, "--workdir", str(workdir), *FAST, "--config.train.steps=40",
                 "--config.checkpoint.every=40", *args]) == 0
    data.write_text("\n".join(records[:4]) + "\n")
    msg = onn_train_fails(capsys, workdir, "--config.train.steps=41", *args)
    assert "data: cannot continue from the data position of checkpoint step 40" in msg, msg


def test_malformed_metrics_file(capsys, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    msg = onn_train_fails(capsys, workdir)
    assert f"{workdir / 'metrics.jsonl'}:2: malformed JSON line" in msg, msg


def test_workdir_is_a_file(capsys, tmp_path):
    path = Path(write(tmp_path / "file", "x"))
    assert f"--workdir {path}: exists and is not a directory" in onn_train_fails(capsys, path)
    assert path.read_text() == "x"


def test_workdir_cannot_be_created(capsys, tmp_path):
    write(tmp_path / "file", "x")
    assert f"--workdir {tmp_path / 'file' / 'run'}: cannot create it (Not a directory)" in onn_train_fails(
        capsys, tmp_path / "file" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_workdir(capsys, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    workdir.chmod(0o555)
    try:
        assert f"--workdir {workdir}: not writable" in onn_train_fails(capsys, workdir)
    finally:
        workdir.chmod(0o755)


def test_batch_not_divisible_by_the_mesh(capsys, trained):
    msg = onn_train_fails(capsys, trained, "--config.mesh.data=8", "--config.data.batch_size=4")
    assert msg.startswith("onn-train: error: data.batch_size:"), msg


def test_mesh_larger_than_the_devices(capsys, trained):
    msg = onn_train_fails(capsys, trained, "--config.mesh.data=16")
    assert "mesh: data*expert*fsdp = 16*1*1 must equal the device count" in msg, msg


def test_a_new_workdir_is_not_left_behind(capsys, tmp_path):
    onn_train_fails(capsys, tmp_path / "new", "--config.data.source=/nonexistent.jsonl")
    onn_train_fails(capsys, tmp_path / "new2", "--config.model.hidden=33")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists()


@pytest.mark.slow
def test_the_cli_prints_one_line_and_no_traceback(tmp_path):
    """The real entry point, in a fresh interpreter: exit code 2 and exactly one stderr line."""
    data = write(tmp_path / "chat.jsonl", CHAT + "{oops\n")
    out = subprocess.run([sys.executable, "-m", "train.main", "--config", TINY, "--workdir", str(tmp_path / "w"),
                          f"--config.data.source={data}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"onn-train: error: data.source: {data}:2: malformed JSON: "
                                               "Expecting property name enclosed in double quotes (column 2)"]


# ---------------------------------------------------------------- a damaged or odd workdir: nothing lost

def make_dir(path: Path) -> None:
    path.mkdir()


def make_file(path: Path) -> None:
    path.write_text("x")


@pytest.mark.parametrize("entry, make, what", [
    ("checkpoints", make_file, "is not a directory"),
    ("tb", make_file, "is not a directory"),
    ("plots", make_file, "is not a directory"),
    ("metrics.jsonl", make_dir, "is not a regular file"),
    ("config.json", make_dir, "is not a regular file"),
    ("plots/loss.png", make_dir, "is not a regular file"),
    ("config.json.tmp", make_dir, "is not a regular file"),
])
def test_workdir_entry_of_the_wrong_kind(capsys, trained, tmp_path, entry, make, what):
    workdir = copy_of(trained, tmp_path)
    target = workdir / entry
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    make(target)
    msg = onn_train_fails(capsys, workdir)
    assert msg == f"onn-train: error: {target}: exists and {what}; move it away (onn-train writes a " + (
        "folder there)" if make is make_file else "file there)"), msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only files")
@pytest.mark.parametrize("entry", ["metrics.jsonl", "plots", "checkpoints"])
def test_workdir_entry_not_writable(capsys, trained, tmp_path, entry):
    workdir = copy_of(trained, tmp_path)
    (workdir / entry).chmod(0o555 if (workdir / entry).is_dir() else 0o444)
    try:
        msg = onn_train_fails(capsys, workdir)
    finally:
        (workdir / entry).chmod(0o755 if (workdir / entry).is_dir() else 0o644)
    assert msg == f"onn-train: error: {workdir / entry}: not writable; fix its permissions, or use a new --workdir"


def test_checkpoints_disabled_on_a_workdir_with_checkpoints(capsys, trained):
    msg = onn_train_fails(capsys, trained, "--config.checkpoint.enabled=false")
    assert msg.startswith(f"onn-train: error: checkpoint.enabled: false, but {trained / 'checkpoints'} holds the "
                          "checkpoints of a previous run (steps [2, 4])"), msg


def test_previous_run_without_checkpoints_is_not_replaced(capsys, trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints")  # e.g. a run with checkpoints off, or killed before its first
    msg = onn_train_fails(capsys, workdir, "--config.train.steps=6")
    assert msg.startswith(f"onn-train: error: {workdir}: holds a previous run (config.json, metrics.jsonl, "), msg
    assert "with another config and no checkpoint to resume from" in msg, msg


# ---------------------------------------------------------------- values that pass a type check but not the machine

@pytest.mark.parametrize("override, expected", [
    ("--config.optim.lr=inf", "--config.optim.lr=inf: must be a finite number, got inf"),
    ("--config.model.moe.w_kl=1e400", "--config.model.moe.w_kl=1e400: must be a finite number, got inf"),
    ("--config.train.steps=4294967296", "--config.train.steps=4294967296: must be in [-2147483648, 2147483647]"),
    ("--config.data.seed=-1", "--config.data.seed=-1: must be in [0, 4294967295], got -1"),
    ("--config.data.records_per_domain=100000000", "must be <= 1000000, got 100000000"),
    ("--config.checkpoint.stop_timeout_s=0", "--config.checkpoint.stop_timeout_s=0: must be > 0"),
    ("--config.train.sample_prompt=caf\udce9", "train.sample_prompt=caf\\udce9: is not valid text (cannot be "
                                               "encoded as UTF-8 at character 3"),
    ("--config.data.source=a\x00b", "--config.data.source=a\x00b: must not contain a NUL character"),
])
def test_out_of_range_value(capsys, trained, override, expected):
    msg = onn_train_fails(capsys, trained, override)
    assert msg.startswith("onn-train: config error:") and expected in msg, msg


def test_model_too_large_for_the_machine(capsys, trained):
    msg = onn_train_fails(capsys, trained, "--config.model.vocab_size=2000000000")
    assert msg.startswith("onn-train: error: model.vocab_size: one training step needs at least "), msg
    assert "GiB of memory of 1 device(s)" in msg, msg


# ---------------------------------------------------------------- onn-generate, onn-export, onn-plot

def one_error_line(capsys, prog: str, code: int, fn, *argv) -> str:
    """Runs `fn(argv)`; asserts exit `code`, one `prog: error:` line and nothing else on stderr."""
    capsys.readouterr()
    assert fn(list(argv)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: "), err
    return err.strip()


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "inf"], "--temperature inf: temperature must be a finite number >= 0"),
    (["--top-p", "nan"], "--top-p nan: top_p must be in (0, 1]"),
    (["--seed", str(2 ** 70)], f"--seed {2 ** 70}: must be in [0, 4294967295]"),
    (["--max-new-tokens", str(2 ** 40)], f"--max-new-tokens {2 ** 40}: max_new_tokens must be in [1, 2147483647]"),
    (["--prompt", "caf\udce9"], "--prompt: is not valid text (cannot be encoded as UTF-8 at character 3)"),
])
def test_onn_generate_flag_out_of_range(capsys, trained, flags, expected):
    from train.generate import main as generate_main
    argv = ["--workdir", str(trained), "--prompt", "hi", *flags]
    assert expected in one_error_line(capsys, "onn-generate", 2, generate_main, *argv)


def test_onn_export_to_an_unusable_place(capsys, trained, tmp_path):
    from train.export import main as export_main
    write(tmp_path / "file", "x")
    msg = one_error_line(capsys, "onn-export", 2, export_main, str(trained), str(tmp_path / "file" / "out"))
    assert f"{tmp_path / 'file' / 'out'}: cannot be created ({tmp_path / 'file'} is not a directory)" in msg
    msg = one_error_line(capsys, "onn-export", 2, export_main, str(trained), str(tmp_path / "o"), "--step", "-1")
    assert "--step -1: must be in [0, 2147483647]" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _full_disk(fmt: str, monkeypatch) -> None:
    """Each format's writer fails part-way as on a full disk, the way its library reports it:
    tensorstore's ValueError naming the OS error (orbax), safetensors' own error, an OSError (npz)."""
    import errno

    import numpy as np
    import orbax.checkpoint as ocp
    import safetensors.numpy

    def orbax_full(self, directory, *args, **kwargs):
        os.makedirs(directory, exist_ok=True)  # a partial write, then the disk is full
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write 237 bytes to file 11: "
                         "No space left on device [os_error_code='28'] [tensorstore_spec='...']")

    def safetensors_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    def npz_full(file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fmt == "orbax":
        monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", orbax_full)
    elif fmt == "safetensors":
        monkeypatch.setattr(safetensors.numpy, "save_file", safetensors_full)
    else:
        monkeypatch.setattr(np, "savez", npz_full)


@pytest.mark.parametrize("fmt", ["orbax", "safetensors", "npz"])
def test_onn_export_to_a_full_disk(capsys, trained, tmp_path, monkeypatch, fmt):
    """Issue 26.3: one line, exit 4, no OUT (the export is written beside it and renamed at the
    end), no folder left beside it, an earlier export in the same parent untouched."""
    from train.export import main as export_main
    parent = tmp_path / "exports"
    assert export_main([str(trained), str(parent / "earlier"), "--format", fmt]) == 0
    before = tree_hash(parent)
    _full_disk(fmt, monkeypatch)
    out = parent / "new" / "export"  # its parent folder "new" is created by the export, then removed
    msg = one_error_line(capsys, "onn-export", 4, export_main, str(trained), str(out), "--format", fmt)
    assert msg == (f"onn-export: error: cannot write the export to {out}: No space left on device (errno 28); "
                   "nothing was written there"), msg
    assert sorted(p.name for p in parent.iterdir()) == ["earlier"] and tree_hash(parent) == before


@pytest.mark.parametrize("failing", ["metrics", "lock"])
def test_a_start_on_a_full_disk_removes_what_it_created(capsys, trained, tmp_path, monkeypatch, failing):
    """Issue 26.4: exit 2 and one line; a new workdir is removed, an existing one keeps exactly
    what it had (the resume's first step ran, then its logs could not be opened)."""
    import errno

    from onn_jax.io import workdir as workdir_lib
    from train.run import setup

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "metrics.jsonl")

    if failing == "metrics":
        monkeypatch.setattr(setup, "MetricsWriter", full)
    else:
        monkeypatch.setattr(workdir_lib.os, "fsync", full)  # the lock file's write
    new = tmp_path / "a" / "b" / "run"
    msg = onn_train_fails(capsys, new)
    what = "cannot write it: No space left on device" if failing == "metrics" else "not writable (No space"
    assert msg.startswith(f"onn-train: error: --workdir {new}: {what}"), msg
    assert sorted(tmp_path.iterdir()) == []  # a/b/run: every folder it made is gone
    existing = copy_of(trained, tmp_path)
    msg = onn_train_fails(capsys, existing, "--config.train.steps=6")  # the workdir is unchanged
    assert f"--workdir {existing}: " in msg, msg


def _oom_step(monkeypatch, where: str):
    """make_guarded_step whose step fails as XLA does when the step does not fit the device."""
    import jax

    from train.run import setup
    real = setup.make_guarded_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)

        def oom(state, batch):
            raise jax.errors.JaxRuntimeError(
                f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.25GiB.\n{where}\nBufferAssignment OOM "
                "Debugging.\n" + "\n".join(f"  buffer {i}: 1.0GiB" for i in range(300)))
        return oom if where else step
    monkeypatch.setattr(setup, "make_guarded_step", make)


def test_out_of_device_memory_is_one_line(capsys, trained, tmp_path, monkeypatch):
    """Issue 26.8 (simulated on CPU): XLA's RESOURCE_EXHAUSTED at the first step becomes one line
    naming the memory-driving fields, the estimate and the devices' capacity; exit 2; a new
    workdir is removed, an existing one unchanged."""
    _oom_step(monkeypatch, "compiling the train step")
    msg = onn_train_fails(capsys, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert msg.startswith("onn-train: error: model.vocab_size, data.batch_size, model.moe.num_experts, "
                          "model.hidden: the first step does not fit the device memory: XLA: RESOURCE_EXHAUSTED: "
                          "Out of memory while trying to allocate 81.25GiB."), msg
    assert "The estimate (a lower bound" in msg and "GiB of 1 device(s) (" in msg and "GiB each)" in msg, msg
    assert "Lower data.batch_size" in msg and "buffer 1" not in msg, msg
    assert "does not fit" in onn_train_fails(capsys, copy_of(trained, tmp_path), "--config.train.steps=6")


def metrics_dir(tmp_path: Path, *rows) -> Path:
    w = tmp_path / "run"
    w.mkdir()
    (w / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return w


GOOD_ROW = {"step": 1, "train/main_loss": 2.0, "moe/gate_acc": 0.5}


@pytest.mark.parametrize("bad, expected", [
    ('["not", "a", "row"]', 'metrics.jsonl:2: not a metrics row (a JSON object with an integer "step")'),
    ({"train/main_loss": 1.0}, 'metrics.jsonl:2: not a metrics row'),
    ({"step": 2, "moe/expert_load": [[0.5, 0.5], [1.0]]}, "metrics.jsonl: cannot draw expert_load.png: "
                                                          "malformed metric values (ValueError"),
])
def test_onn_plot_malformed_rows_write_nothing(capsys, tmp_path, bad, expected):
    from train.plots.cli import main as plot_main
    w = metrics_dir(tmp_path, GOOD_ROW, bad)
    assert expected in one_error_line(capsys, "onn-plot", 2, plot_main, str(w))
    assert not (w / "plots").exists()


@pytest.mark.parametrize("entry, make", [("plots", make_file), ("plots/loss.png", make_dir)])
def test_onn_plot_unusable_output(capsys, tmp_path, entry, make):
    from train.plots.cli import main as plot_main
    w = metrics_dir(tmp_path, GOOD_ROW)
    if "/" in entry:
        (w / "plots").mkdir()
    make(w / entry)
    assert f"{w / entry}: exists and is not a" in one_error_line(capsys, "onn-plot", 2, plot_main, str(w))


def test_onn_plot_to_a_full_disk(capsys, tmp_path, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    from train.plots.cli import main as plot_main

    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Figure, "savefig", full)
    w = metrics_dir(tmp_path, GOOD_ROW)
    msg = one_error_line(capsys, "onn-plot", 4, plot_main, str(w))
    assert msg == f"onn-plot: error: cannot write {w / 'plots' / 'loss.png'}: No space left on device", msg


@pytest.mark.slow
def test_damaged_checkpoint_one_line_at_exit_of_every_program(trained, tmp_path):
    """Real processes: after the error line, nothing (no asyncio 'Event loop is closed' noise)."""
    workdir = copy_of(trained, tmp_path)
    for p in (workdir / "checkpoints" / "4" / "state").rglob("manifest.ocdbt"):
        p.write_bytes(b"garbage")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for module, args in [("train.main", ["--config", TINY, "--workdir", str(workdir), *FAST]),
                         ("train.generate", ["--workdir", str(workdir), "--prompt", "hi"]),
                         ("train.export", [str(workdir), str(tmp_path / "out")])]:
        out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=180, env=env)
        assert out.returncode == 2, (module, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"cannot read checkpoint {workdir / 'checkpoints'}/4" in lines[0], (module, lines)


# ---------------------------------------------------------------- files that are not what they claim

def test_malformed_tokenizer_file(capsys, trained, tmp_path):
    pytest.importorskip("tokenizers")
    tok = write(tmp_path / "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE"}}')
    msg = onn_train_fails(capsys, trained, f"--config.data.tokenizer={tok}")
    assert msg.startswith(f"onn-train: error: data.tokenizer: {tok}: not a valid tokenizer.json ("), msg


@pytest.mark.parametrize("edit, expected", [
    ({"guard": "none"}, '"guard" must be a JSON object, got str'),
    ({"guard": {"skipped_steps": "many"}}, '"guard.skipped_steps" must be an integer >= 0, got \'many\''),
    ({"config": ["model"]}, '"config" must be a JSON object, got list'),
    ({"data": 7}, '"data" must be a JSON object, got int'),
])
def test_hand_edited_checkpoint_metadata(capsys, trained, tmp_path, edit, expected):
    workdir = copy_of(trained, tmp_path)
    meta_file = workdir / "checkpoints" / "4" / "meta" / "metadata"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), **edit}))
    msg = onn_train_fails(capsys, workdir)
    assert msg.startswith(f"onn-train: error: cannot resume: {workdir / 'checkpoints' / '4'}/meta: {expected}"), msg
    assert "move" in msg and "away to resume from the previous one" in msg, msg
