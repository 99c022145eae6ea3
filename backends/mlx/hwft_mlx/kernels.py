"""The MLX engine's kernels (hwft.kernels), registered through ``hwft_register_kernels``.

==============================  =============  =========================================
id                              slot           what it does
==============================  =============  =========================================
hwft_mlx_label_cross_entropy    cross_entropy  the output layer on the label positions'
                                               hidden states only (recommended)
==============================  =============  =========================================
"""

from __future__ import annotations

from hwft.kernels import Kernel

KERNELS = (
    Kernel(
        "hwft_mlx_label_cross_entropy",
        "cross_entropy",
        "mlx",
        "the output layer on the label positions' hidden states only: no logits for prompts or padding",
        "hwft_mlx.objective:LabelPositionsCrossEntropy",
        recommended=True,
    ),
)
