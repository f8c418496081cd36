"""Issue 26.8 on a GPU: a config that passes onn-train's memory pre-check but does not fit the
device ends with one line naming the memory-driving fields, the estimate and the device's
capacity, exit code 2, and no workdir left. In the GPU test subset (run with JAX_PLATFORMS=cuda);
skipped elsewhere. tests/test_bad_input.py::test_out_of_device_memory_is_one_line exercises the
same path on CPU with a simulated RESOURCE_EXHAUSTED."""
import jax
import pytest

pytest.importorskip("orbax.checkpoint")

from test_bad_input import onn_train_fails  # noqa: E402


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: XLA's real out-of-memory error")
def test_out_of_memory_on_a_gpu(capsys, tmp_path):
    """Issue 26.8 on a GPU: a config under the memory pre-check (its estimate counts no attention
    scores) whose float32 attention scores [batch, heads, T, T] do not fit the device."""
    from onn_jax.training.memory import device_memory_bytes
    have = device_memory_bytes(jax.devices()[:1])
    seq = 8192
    batch = max(8, int(4 * have / (4 * 4 * seq * seq)))  # 4x the device in attention scores alone
    msg = onn_train_fails(capsys, tmp_path / "run", "--config.mesh.data=1", f"--config.data.seq_len={seq}",
                          f"--config.model.max_len={seq}", f"--config.data.batch_size={batch}",
                          "--config.model.attention=xla", "--config.model.remat=none")
    assert "does not fit the device memory: XLA: " in msg and "RESOURCE_EXHAUSTED" in msg, msg
    assert "data.batch_size" in msg and "GiB each)" in msg, msg
    assert not (tmp_path / "run").exists()
