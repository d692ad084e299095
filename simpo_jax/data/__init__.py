"""Preference data, in the order it flows: rows (where rows come from) and formats (what a row
means) -> tokenize (chat template) -> pairs (tokenised pairs, cached; DataConfig) and report ->
batch (typed batches) -> padded / packed (rows built by packed_rows) behind one Batcher
(batcher.make_batcher) -> feed (the device feed). Mistakes in the data or its settings raise
errors.UserError.

The layouts' names come from the config schema (config.choices.BatchLayout).
"""

from simpo_jax.config.choices import BatchLayout

LAYOUTS = BatchLayout.values()  # config.batch_layout
PACKED_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "padded")  # pairs packed into rows
