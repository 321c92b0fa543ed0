"""Analytic fields shared by the tests: one definition of each, built on ``lib.datasets.shapes``.

Fields map points (P, 3) -> values (P,).  ``torus`` is the ring the tests use, in the x-y plane
around the z axis; lib's own torus lies in the x-z plane, so this one reads it with y and z
swapped (a permutation of coordinates: the same values, bit for bit, on any device).  The latent
decoders take DeepSDF rows ``[latent, x, y, z]`` (P, L + 3) and return (P, 1).
"""
import numpy as np
import torch
from torch import nn

from lib.datasets.shapes import Shape, sphere, union
from lib.datasets.shapes import torus as _torus_around_y

__all__ = ["sphere", "torus", "union", "on_numpy", "LatentSphere", "LatentTorus"]


def torus(major=0.5, minor=0.2) -> Shape:
    """Exact torus SDF around the z axis: tube radius ``minor`` at distance ``major``.

    Args:
        major, minor: floats, 0-d tensors (learnable radii) or (P,) tensors (one per point).
    Returns:
        a Shape: points (P, 3) -> (P,).
    """
    around_y = _torus_around_y(major, minor)
    return Shape(lambda p: around_y(p[:, [0, 2, 1]]), "torus_z")


def on_numpy(field):
    """``field`` for float64 numpy points (P, 3) -> (P,) numpy values (evaluated in torch float64)."""
    return lambda p: field(torch.from_numpy(np.asarray(p, dtype=np.float64))).numpy()


class LatentSphere(nn.Module):
    """Latent (r,): k (|x| - r), a sphere of radius r whose SDF is scaled by ``k``."""

    def __init__(self, k=1.0):
        super().__init__()
        self.k = k

    def forward(self, inp):
        return self.k * sphere(inp[:, 0])(inp[:, 1:])[:, None]


class LatentTorus(nn.Module):
    """Latent (R, r): the exact torus SDF around the z axis (``torus(R, r)``)."""

    def forward(self, inp):
        return torus(inp[:, 0], inp[:, 1])(inp[:, 2:])[:, None]
