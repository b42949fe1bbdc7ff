"""The inverse product of a cached curvature over the whole of θ: one block per θ tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmeraser.adapter import AdapterParameters
from llmeraser.curvature.registry import Layers


@dataclass
class CachedInverse:
    """v ↦ (K + shift·I)⁻¹ v for a flat θ-shaped vector, K the block-diagonal cached curvature of any
    registered method (one ``CurvatureLayer`` per θ tensor)."""

    layers: Layers
    params: AdapterParameters
    shift: float

    def __call__(self, vector: Tensor) -> Tensor:
        pieces = self.params.split(vector)
        solved = []
        for name, piece in zip(self.params.names, pieces):
            result = self.layers[name].inverse_product(piece.to(torch.float64), self.shift)
            solved.append(result.to(vector.dtype))
        return self.params.flatten(solved)
