"""Routing health metrics against NumPy, on a collapsed routing where the original's gate
accuracy is perfect while the honest numbers show the collapse (eagerly and under jit, with
chex.variants); the bar's plain log line."""
import chex
import jax.numpy as jnp
import numpy as np

from onn_jax.core.analysis import gate_accuracy
from onn_jax.core.gate import RouterOutput
from onn_jax.core.routing_metrics import dead_experts, routing_metrics
from onn_jax.nn.moe import MoERecord
from train.run.progress import Progress, progress_fields


def record(pre, mask, weights):
    return MoERecord(RouterOutput(jnp.asarray(pre), jnp.asarray(pre), jnp.asarray(mask), jnp.asarray(weights)), None)


def surprise_metrics(records, surprises):
    return routing_metrics(records, surprises, "surprise")


class TestRoutingMetricsAgainstNumPy(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_metrics_match_numpy(self):
        rng = np.random.default_rng(0)
        n, e = 64, 6
        pre = rng.normal(size=(n, e)).astype(np.float32)
        mask = pre > 0.3
        mask[~mask.any(1), 0] = True
        w = np.where(mask, np.exp(np.maximum(pre, 0)), 0)
        w = (w / w.sum(1, keepdims=True)).astype(np.float32)
        s = (w * rng.random((n, 1))).astype(np.float32)
        s[:10] = 0.0  # masked labels: constant S rows
        m = {k: float(v) for k, v in self.variant(surprise_metrics)([record(pre, mask, w)], [jnp.asarray(s)]).items()}
        informative = s.max(1) > s.min(1)
        hit = pre.argmax(1) == s.argmin(1)
        np.testing.assert_allclose(m["moe/gate_acc_informative"], hit[informative].mean(), rtol=1e-6)
        np.testing.assert_allclose(m["moe/informative_share"], informative.mean(), rtol=1e-6)
        load = mask.mean(0)
        np.testing.assert_allclose(m["moe/load_cv"], load.std() / load.mean(), rtol=1e-5)
        np.testing.assert_allclose(m["moe/load_max_mean"], load.max() / load.mean(), rtol=1e-5)
        ent = -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1)), 0), 1).mean()
        np.testing.assert_allclose(m["moe/router_entropy"], ent, rtol=1e-5)
        np.testing.assert_allclose(m["moe/fallback_share"], (pre <= 0).all(1).mean(), rtol=1e-6)
        target_active = mask[np.arange(n), s.argmin(1)]
        np.testing.assert_allclose(m["moe/target_inactive"], (~target_active).mean(), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_collapse_cannot_look_good(self):
        """Every token on expert 0 and S = 0 everywhere (masked labels): the original's accuracy is 1."""
        n, e = 32, 8
        pre = np.full((n, e), -0.5, np.float32)
        pre[:, 0] = 0.2
        mask = np.zeros((n, e), bool)
        mask[:, 0] = True
        w = mask.astype(np.float32)
        s = np.zeros((n, e), np.float32)
        assert float(self.variant(gate_accuracy)(jnp.asarray(pre), jnp.asarray(s))) == 1.0
        m = self.variant(surprise_metrics)([record(pre, mask, w)], [jnp.asarray(s)])
        assert float(m["moe/gate_acc_informative"]) == 0.0 and float(m["moe/informative_share"]) == 0.0
        np.testing.assert_allclose(float(m["moe/load_max_mean"]), e)
        np.testing.assert_allclose(float(m["moe/load_cv"]), np.sqrt(e - 1), rtol=1e-5)
        assert float(m["moe/router_entropy"]) == 0.0
        assert list(dead_experts(np.stack([mask.mean(0), np.full(e, 0.5)]))) == [e - 1, 0]


def test_bar_fields_and_plain_log_line(capsys):
    row = {"step": 20, "train/main_loss": 2.5, "moe/dead_experts": [0, 3], "train/lr": 3e-3,
           "moe/gate_acc_informative": 0.0, "perf/tokens_per_sec": 1234.5, "moe/gate_acc": 0.9}
    post = progress_fields(row, latest_eval=2.75)
    assert post == {"loss": "2.500", "eval": "2.750", "gate_acc_inf": "0.000", "dead": "0/3",
                    "lr": "3.0e-03", "tok/s": "1234"}
    bar = Progress(100, 0, enabled=False)
    bar.show({**row, "eval/main_loss": 2.6})
    bar.show(row)  # the latest eval loss stays on later rows
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 20: loss=2.500 eval=2.600 gate_acc_inf=0.000 dead=0/3 lr=3.0e-03 tok/s=1234"] * 2
    # gated heads and slot embedding: their avg_k and informative gate accuracy, after the MoE's
    unit_row = {**row, "attn/avg_k": 1.5, "attn/gate_acc_informative": 0.25, "embed/avg_k": 6.0,
                "embed/gate_acc_informative": 0.125, "attn/gate_acc": 0.9}
    assert list(progress_fields(unit_row, latest_eval=2.75).items()) == [
        ("loss", "2.500"), ("eval", "2.750"), ("gate_acc_inf", "0.000"), ("dead", "0/3"), ("attn_k", "1.500"),
        ("attn_acc_inf", "0.250"), ("emb_k", "6.000"), ("emb_acc_inf", "0.125"), ("lr", "3.0e-03"),
        ("tok/s", "1234")]
