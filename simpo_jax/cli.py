"""The one function run.py calls: dispatch a validated config to a mode."""

from __future__ import annotations

import logging


def main(config, mode: str = "train"):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if mode == "train":
        from simpo_jax import train

        return train.train(config)
    raise ValueError(f"--mode={mode!r}: must be one of ['train'].")
