"""Config validation: every error names its field."""
import pytest

from onn_jax.config import ConfigError, FilterConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig, from_dict


@pytest.mark.parametrize("build,field", [
    (lambda: ModelConfig(hidden=30, num_heads=4), "model.num_heads"),
    (lambda: ModelConfig(hidden=12, num_heads=4), "model.num_heads"),  # head dim 3: odd for RoPE
    (lambda: ModelConfig(num_layers=0), "model.num_layers"),
    (lambda: ModelConfig(vocab_size=2.5), "model.vocab_size"),
    (lambda: ModelConfig(dtype="float16"), "model.dtype"),
    (lambda: MoEConfig(num_experts=4, fallback_k=5), "model.moe.fallback_k"),
    (lambda: MoEConfig(w_kl=-1.0), "model.moe.w_kl"),
    (lambda: MoEConfig(router="hash"), "model.moe.router"),
    (lambda: MoEConfig(top_k=40), "model.moe.top_k"),
    (lambda: OptimConfig(lr=0.0), "optim.lr"),
    (lambda: OptimConfig(b2=1.0), "optim.b2"),
    (lambda: FilterConfig(mode="three_sided"), "optim.grad_filter.mode"),
    (lambda: TrainConfig(sample_format="raw"), "train.sample_format"),
    (lambda: TrainConfig(plots="no"), "train.plots"),
])
def test_invalid_values_name_the_field(build, field):
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_from_dict_builds_nested_and_rejects_unknown_keys():
    cfg = from_dict(ModelConfig, {"hidden": 64, "moe": {"num_experts": 4, "fallback_k": 2}})
    assert cfg.hidden == 64 and cfg.moe.effective_fallback_k == 2
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, {"moe": {"num_expert": 4}}, "model.")
    assert err.value.field == "model.moe.num_expert"


def test_faithful_defaults():
    m = MoEConfig()
    assert (m.num_experts, m.intermediate, m.effective_fallback_k) == (32, 128, 16)
    assert ((m.w_ce, m.w_kl, m.w_aux, m.router, m.surprise, m.dispatch)
            == (1.0, 1.0, 1.0, "surprise", "output_grad", "dense"))
    o = OptimConfig()
    assert (o.lr, o.weight_decay, o.b1, o.b2, o.eps, o.clip_norm) == (1e-3, 0.01, 0.9, 0.999, 1e-8, None)
    assert (o.grad_filter.mode, o.grad_filter.scope, o.grad_filter.sigma) == ("one_sided", "pooled", 2.0)
    c = ModelConfig()
    assert (c.hidden, c.norm, c.norm_eps, c.final_norm) == (32, "layernorm", 1e-5, False)


@pytest.mark.parametrize("lr", [0.0, -1.0, -1])
def test_nonpositive_lr_says_must_be_positive(lr):
    with pytest.raises(ConfigError, match=r"^optim.lr: must be > 0, got") as err:
        OptimConfig(lr=lr)
    assert err.value.field == "optim.lr"
    with pytest.raises(ConfigError, match="optim.lr: must be a number"):
        OptimConfig(lr="1e-3")


def test_sample_format_auto_follows_the_corpus():
    """auto: a text prompt (BOS + prompt) only when every source file is plain text."""
    from onn_jax.config import Config, DataConfig
    from train.run.sample import sample_as_text
    as_text = lambda source, fmt="auto": sample_as_text(Config(data=DataConfig(source=source),
                                                               train=TrainConfig(sample_format=fmt)))
    assert as_text("book.txt") and as_text("a.txt, b.md")
    assert not as_text("builtin") and not as_text("a.txt,chat.jsonl") and not as_text("shards:DIR")
    assert as_text("builtin", "text") and not as_text("book.txt", "chat")
