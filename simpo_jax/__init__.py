"""simpo_jax: SimPO (Simple Preference Optimization) for JAX/Flax NNX on TPUs, GPUs and CPUs."""

__version__ = "0.1.0"
