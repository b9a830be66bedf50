"""Kernels: each a pure-jnp reference (the CPU path and the oracle) plus Pallas versions per backend."""
