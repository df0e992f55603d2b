"""Parameter-efficient finetuning: methods transform the parameter tree and
filter what trains; they never fork a model class.

The trainer sees a method only through `jaxft.peft.methods.PeftMethod`, looked
up once by `method_for(peft_cfg, train_cfg)`: full finetuning, LoRA
(`jaxft.peft.lora`) and Lottery-Ticket sparse fine-tuning (`jaxft.peft.sparse`).
`jaxft.peft.compose` adds finished adapters and sparse diffs to a base.
"""

from jaxft.peft.methods import METHODS, PeftMethod, StepContext, method_for, param_filter

__all__ = ["METHODS", "PeftMethod", "StepContext", "method_for", "param_filter"]
