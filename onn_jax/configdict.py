"""ConfigDict for the config files: ml_collections' when installed (it is a pinned dependency),
else a minimal attribute dict, so that `onn-train` also runs on bare accelerator images that
only have JAX (onn-train converts either to the frozen dataclasses of onn_jax.config)."""
try:
    from ml_collections import ConfigDict
except ImportError:  # pragma: no cover - exercised by tests with ml_collections hidden
    class ConfigDict(dict):
        """A dict whose keys are also attributes (enough for get_config())."""

        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

        def __setattr__(self, name, value):
            self[name] = value

        def to_dict(self):
            return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self.items()}
