"""Parameter initialisers shared by the Flax modules (PyTorch nn.Linear's defaults)."""
from __future__ import annotations

import flax.linen as nn

# PyTorch nn.Linear's default init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def stacked_linear_init(in_axis: int, out_axis: int):
    """PyTorch-Linear init for weights stacked over a leading expert axis."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                            in_axis=in_axis, out_axis=out_axis, batch_axis=(0,))
