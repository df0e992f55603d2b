"""jaxft: JAX/TPU-native multilingual finetuning."""

__version__ = "0.1.0"
