"""simpo_jax command line: python run.py --config=configs/tiny.py [--config.field=value ...] [--mode=train]."""

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file.",
                                          lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "lr_find", "plot", "plan"], "What to do with the config.")


def yaml_recipes(argv):
    """`--config=recipe.yaml` (an alignment-handbook / SimPO recipe) -> configs/recipe.py:recipe.yaml."""
    out = []
    for a in argv:
        if a.startswith("--config=") and a.endswith((".yaml", ".yml")):
            a = f"--config={os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'recipe.py')}:{a[len('--config='):]}"
        out.append(a)
    return out


def parse_flags(argv):
    """absl parsing, but a bad override is one line naming the field, not a traceback."""
    argv = yaml_recipes(argv)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        raw = str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        name = re.search(r"'([^']+)'", raw)
        hint = re.search(r'Did you mean "([^"]+)"', raw)
        flag = [a.split("=")[0] for a in argv[1:]
                if name and a.startswith("--config.") and name.group(1) in a.split("=")[0]]
        if isinstance(e, (AttributeError, KeyError)) and flag:
            print(f"run.py: error: {flag[0]}: {name.group(1)!r} is not a config field"
                  + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
                  + "; configs/base.py lists the fields.", file=sys.stderr)
        else:
            print(f"run.py: error: {type(e).__name__}: {raw}".splitlines()[0], file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    from simpo_jax import cli  # after flag parsing, so --help stays fast

    cli.main(_CONFIG.value, _MODE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
