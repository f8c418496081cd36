"""Sharding by logical axes (the rules table), the device mesh, activation constraints that any
layer may call (`constrain`), and jax.distributed for several processes."""
