"""The README's Python blocks run as written (one subprocess, each block in a fresh namespace)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_blocks_run():
    blocks = python_blocks()
    assert len(blocks) >= 2  # the surprise-definition example and the library example
    runner = "\n".join(f"exec(compile({b!r}, 'README.md python block {i}', 'exec'), {{}})"
                       for i, b in enumerate(blocks))
    proc = subprocess.run([sys.executable, "-c", runner], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
                                            "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss, acc = map(float, proc.stdout.split()[-2:])
    assert 4.0 < loss < 6.5 and 0.0 <= acc <= 1.0  # about log(262) after 3 steps
