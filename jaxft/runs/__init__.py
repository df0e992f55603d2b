"""Run directories: their layout, checkpoints, resume checks, the tokenizer a
run uses, and restoring a run's model for inference without an optimizer.

This package sits below `jaxft.train` (which writes run dirs) and `jaxft.eval`
(which only reads them).  Nothing here that opens a run dir read-only ever
moves, renames or deletes a file in it.
"""
