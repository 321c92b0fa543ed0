"""Kernels without policy (PyTorch3D's ``ops/`` split): :mod:`lib.ops.marching_cubes`."""
