"""Hand-written kernels, installed as ``fastlm.kernels``.

Triton kernels live here; importing this package does not import triton, so a machine without it can
still use every other backend.
"""
