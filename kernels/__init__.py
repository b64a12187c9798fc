"""Triton kernels of unlearn_fast (installed as ``unlearn_fast.kernels``).

Pure kernel code and launch helpers: no autograd, no policy. Importing a
submodule needs the ``triton`` package.
"""
