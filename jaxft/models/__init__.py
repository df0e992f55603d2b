"""Model families (decoder-only now; encoder-decoder families register in ``registry``)."""

from jaxft.models.flops import param_count, train_flops_per_token
from jaxft.models.registry import FAMILIES, build_model, register

__all__ = ["FAMILIES", "build_model", "param_count", "register", "train_flops_per_token"]
