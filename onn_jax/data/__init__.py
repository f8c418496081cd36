"""Tokens in, batches out: tokenizers, the builtin corpus, user records, in-memory datasets and
on-disk shards. Knows nothing of the model or training (an import-linter contract)."""
