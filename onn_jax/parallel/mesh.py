"""The device mesh (data, expert, fsdp) from mesh.* of the config."""
from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from onn_jax.config import ConfigError, MeshConfig
from onn_jax.parallel.rules import MESH_AXES


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, expert, fsdp) mesh over `devices` (default: all); one -1 axis takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": cfg.data, "expert": cfg.expert, "fsdp": cfg.fsdp}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if len(devices) % fixed:
                raise ConfigError(f"mesh.{name}", f"-1 needs the device count ({len(devices)}) "
                                  f"to be divisible by the other axes' product ({fixed})")
            sizes[name] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError("mesh", f"data*expert*fsdp = {sizes['data']}*{sizes['expert']}*"
                          f"{sizes['fsdp']} must equal the device count ({len(devices)})")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
