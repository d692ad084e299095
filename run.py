"""simpo_jax command line: python run.py --config=configs/tiny.py [--config.field=value ...] [--mode=train]."""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file.",
                                          lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to do with the config.")


def main(argv):
    del argv
    from simpo_jax import cli  # after flag parsing, so --help stays fast

    cli.main(_CONFIG.value, _MODE.value)


if __name__ == "__main__":
    app.run(main)
