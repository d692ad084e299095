"""simpo_jax command line: python run.py --config=configs/tiny.py [--config.field=value ...] [--mode=train]."""

import ast
import os
import re
import sys

# Before transformers is first imported: its "PyTorch was not found" line is advice for PyTorch
# users, noise in a JAX run.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags
from ml_collections import config_flags

from simpo_jax import cli  # light: jax and the model load inside cli.main, so --help is quick
from simpo_jax import config as config_lib
from simpo_jax import paths


class DatasetMixerParser(flags.ArgumentParser):
    """--config.dataset_mixer='{"name or path": amount, ...}' -> a plain dict, keys kept whole."""

    def parse(self, argument):
        if not isinstance(argument, str):  # the config file's own value, given as the default
            return argument
        try:
            value = ast.literal_eval(argument)
        except (SyntaxError, ValueError) as e:
            value = e
        if not isinstance(value, dict):
            got = value.msg if isinstance(value, SyntaxError) else f"{type(value).__name__} {value!r}"
            raise ValueError(f"not a dict literal ({got}); give {{dataset name or path: fraction or "
                             "row count}, e.g. --config.dataset_mixer="
                             f"'{config_lib.DATASET_MIXER_EXAMPLE}'")
        return value


config_flags.register_flag_parser_for_type(config_lib.DATASET_MIXER_TYPES, DatasetMixerParser())

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "Run config file (its fields: python -m simpo_jax.config).",
                                          lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", list(cli.MODES), "What to do with the config.")


def yaml_recipes(argv):
    """`--config=recipe.yaml` (an alignment-handbook / SimPO recipe) -> configs/recipe.py:recipe.yaml."""
    out = []
    for a in argv:
        if a.startswith("--config=") and a.endswith((".yaml", ".yml")):
            a = f"--config={os.path.join(paths.REPO_ROOT, 'configs', 'recipe.py')}:{a[len('--config='):]}"
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
        elif isinstance(e, flags.IllegalFlagValueError):
            print(f"run.py: error: {flag_error(str(e))}", file=sys.stderr)
        else:
            print(f"run.py: error: {type(e).__name__}: {raw}".splitlines()[0], file=sys.stderr)
        sys.exit(2)


def flag_error(message: str) -> str:
    """absl's 'flag --x=v: why' as '--x=v: why'; a config file's traceback as its last line and frame."""
    lines = [line for line in message.removeprefix("flag ").splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Traceback"):
        frames = [line.strip() for line in lines if line.strip().startswith('File "')
                  and "site-packages" not in line]
        return (f"{lines[0].removesuffix(' Error whilst parsing config file:')} {lines[-1].strip()}"
                + (f" ({frames[-1]})" if frames else ""))
    return " ".join(lines)


def main(argv):
    del argv
    cli.main(_CONFIG.value, _MODE.value, argv=sys.argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
