"""Preference data, in the order it flows: rows (where rows come from) and formats (what a row
means) -> tokenize (chat template) -> pairs (tokenised pairs, cached; DataConfig) and report ->
batch (typed batches) -> padded / packed (rows built by packed_rows) behind one Batcher
(batcher.make_batcher) -> feed (the device feed). Mistakes in the data or its settings raise
errors.UserError.

This file holds only the batch layouts, so the config schema can name them without importing jax.
"""

PACKED_LAYOUTS = ("packed", "shared_prompt")  # pairs packed into fixed-length rows
LAYOUTS = ("padded",) + PACKED_LAYOUTS  # config.batch_layout
