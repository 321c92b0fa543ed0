"""Hand-written kernels of the DeepSDF decoder, each computing what its autograd path computes.

- :mod:`.fused`: the fused forward + backward of the clamped-L1 training loss;
- :mod:`.inference`: values, and values with input gradients, of a frozen decoder;
- :mod:`.gemm`: which library runs their CPU GEMMs (torch.mm's BLAS or oneDNN), chosen once
  from what the CPU reports;
- :mod:`.elementwise`: positional encoding and the counter-based dropout masks both share
  with :mod:`lib.models.decoder`.
"""
