"""A real full filesystem (a tiny tmpfs in a private mount namespace, `unshare -rm`): onn-export
in every format and a new onn-train workdir end with one line, a non-zero exit code and nothing
half written (issue 26.3, 26.4). tests/test_bad_input.py simulates the same failures in-process;
these run the programs as a user does, with the libraries' own errors (tensorstore's, safetensors')
and their logging. Skipped where user namespaces or tmpfs mounts are not allowed."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("orbax.checkpoint")

from train.main import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config", str(ROOT / "configs" / "tiny.py"), "--config.train.steps=2", "--config.checkpoint.every=2",
        "--config.train.eval_every=0", "--config.train.sample_tokens=2", "--config.train.plots=false"]


def tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not tmpfs_available(), reason="needs unshare -rm and tmpfs "
                                                                                 "mounts (user namespaces)")]


def on_full_disk(tmp_path: Path, size: str, script: str) -> str:
    """Runs `script` (sh) with a `size` tmpfs mounted at tmp_path/full; returns its output."""
    mnt = tmp_path / "full"
    mnt.mkdir(exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PY=sys.executable, FULL=str(mnt))
    out = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$FULL" && {script}'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("trained")
    assert main(["--workdir", str(workdir), *FAST]) == 0
    return workdir


def test_onn_export_to_a_full_filesystem_in_every_format(trained, tmp_path):
    """The params do not fit (120k); an earlier folder beside OUT is untouched; the output of each
    onn-export is its one error line (no orbax/absl log, no traceback), exit code 4."""
    script = 'mkdir "$FULL/earlier" && echo keep > "$FULL/earlier/x"; '
    for fmt in ("orbax", "safetensors", "npz"):
        script += (f'echo "== {fmt}"; "$PY" -m train.export {trained} "$FULL/sub/out" --format {fmt} 2>&1; '
                   f'echo "rc=$?"; ls -A "$FULL"; ')
    out = on_full_disk(tmp_path, "120k", script)
    for fmt, part in zip(("orbax", "safetensors", "npz"), out.split("== ")[1:]):
        lines = part.strip().splitlines()
        assert lines == [fmt, f"onn-export: error: cannot write the export to {tmp_path}/full/sub/out: No space "
                              "left on device (errno 28); nothing was written there", "rc=4", "earlier"], part


def test_a_new_workdir_on_a_full_filesystem_is_removed(tmp_path):
    """Full from the start (the lock file cannot be written), and with room for the lock file
    only (config.json, metrics.jsonl and tb/ after the first step cannot be written): exit 2,
    one line, no workdir (nor its parent folder a/) left behind; what was there is untouched."""
    script = ('echo keep > "$FULL/x"; dd if=/dev/zero of="$FULL/fill" bs=1k count=8 2>/dev/null; '
              f'"$PY" -m train.main --workdir "$FULL/run" {" ".join(FAST)} 2>&1; echo "rc=$?"; '
              'rm "$FULL/fill"; dd if=/dev/zero of="$FULL/fill" bs=1k count=4 2>/dev/null; '
              f'"$PY" -m train.main --workdir "$FULL/a/run" {" ".join(FAST)} 2>/dev/stdout >/dev/null; echo "rc=$?"; '
              'ls -A "$FULL"')
    out = on_full_disk(tmp_path, "12k", script).strip().splitlines()
    assert out[:2] == [f"onn-train: error: --workdir {tmp_path}/full/run: not writable (No space left on device)",
                       "rc=2"], out
    assert out[2].startswith(f"onn-train: error: --workdir {tmp_path}/full/a/run: cannot write it: No space left "
                             "on device (errno 28)") and out[3:] == ["rc=2", "fill", "x"], out
