"""The tile of block-sparse attention: the model computes it, packed rows list which tiles to compute.

Its own module so the data pipeline reads the size without importing the model.
"""

SPARSE_BLOCK = 64  # tokens per query / key block of block_sparse_attention
