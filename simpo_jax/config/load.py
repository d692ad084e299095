"""ConfigDict <-> schema: the defaults as a ConfigDict, and a config checked into a validated run config.

A validated run config is a locked ConfigDict whose choice fields hold schema enums: the strings
of a config file or command line become enum members here, once. ml_collections casts any str
subclass assigned to a str field back to str, so the validated config is a new ConfigDict.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

from simpo_jax.config.rules import check as check_rules
from simpo_jax.config.schema import CHOICE_FIELDS, FIELDS, Spec
from simpo_jax.errors import UserError

# What config.dataset_mixer holds: a plain dict, whose keys (paths, Hub names) may contain dots, or
# a ConfigDict made with allow_dotted_keys=True. run.py parses --config.dataset_mixer for this type.
DATASET_MIXER_TYPES = (dict, ml_collections.ConfigDict)
TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              tuple[str, ...]: "a tuple of strings", tuple[int, ...]: "a tuple of integers",
              dict: "a mapping"}


def defaults() -> ml_collections.ConfigDict:
    """Every field at its schema default: configs/base.py's get_config()."""
    c = ml_collections.ConfigDict()
    for name, spec in FIELDS.items():
        if name == "dataset_mixer":  # a typed reference keeps a recipe's plain dict as it is
            c[name] = ml_collections.FieldReference(
                ml_collections.ConfigDict(allow_dotted_keys=True), field_type=DATASET_MIXER_TYPES)
        elif spec.type is dict:
            c[name] = ml_collections.ConfigDict()
        else:
            c[name] = spec.default
    return c


def check_fields(config: ml_collections.ConfigDict, source: str = "") -> None:
    """Raises UserError when `config` has a field the schema does not define, or lacks one.

    ml_collections lets a config file add fields (`c.learnig_rate = 1e-1` would train at the
    default rate); the lock on the command line comes after that. `model_init` (config.json fields)
    and `dataset_mixer` (data set names) hold free-form keys and are not compared. `source` names
    where the config came from (its file) in the message.
    """
    unknown = sorted(set(config.keys()) - set(FIELDS))
    if unknown:
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(FIELDS), n=1)
            named.append(f"config.{name}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        verb = "is not a config field" if len(named) == 1 else "are not config fields"
        raise UserError((f"{source} sets {' and '.join(named)}, which {verb}" if source else
                         f"{' and '.join(named)} {verb}") + "; configs/base.py lists the fields.")
    missing = sorted(set(FIELDS) - set(config.keys()))
    if missing:
        raise UserError(f"{source or 'the config'} has no field {', '.join(missing)}: start a "
                        "config file from configs/base.py's get_config() (or another file in "
                        "configs/) and change the fields it needs.")


def validate(config: ml_collections.ConfigDict, source: str = "") -> ml_collections.ConfigDict:
    """The validated run config (choice fields as enums); UserError names an unknown field or the
    first invalid value."""
    check_fields(config, source)
    for name, spec in FIELDS.items():
        check_value(spec, config[name])
    check_rules(config)
    return with_enums(config)


def check_value(spec: Spec, value) -> None:
    """The field's type, finiteness, allowed values and bounds."""
    if spec.choices:
        if value not in spec.choices.values():
            raise UserError(f"config.{spec.name}={value!r}: must be one of "
                            f"{spec.choices.values()}.")
        return
    if not has_type(value, spec.type):
        raise UserError(f"config.{spec.name}={value!r}: must be "
                        f"{spec.valid or TYPE_WORDS[spec.type]}.")
    if spec.type is float and not math.isfinite(value):
        raise UserError(f"config.{spec.name}={value!r}: must be a finite number.")
    for bound in spec.bounds:
        if not bound.holds(value):
            raise UserError(f"config.{spec.name}={value!r}: must be {spec.valid or bound.valid}.")


def has_type(value, kind) -> bool:
    """Whether `value` fits the schema type `kind` (bool is not a number; int fits float)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    if kind is dict:
        return isinstance(value, DATASET_MIXER_TYPES)
    if kind in (tuple[str, ...], tuple[int, ...]):
        return isinstance(value, (tuple, list)) and all(has_type(v, kind.__args__[0])
                                                        for v in value)
    return isinstance(value, kind)


def with_enums(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A locked copy of `config` whose choice fields hold their enum members."""
    # convert_dict=False: a recipe's plain-dict dataset_mixer keeps its dotted keys (the fields'
    # own dicts are ConfigDicts already). A new reference, so setting the copy's mixer leaves
    # `config` as it is; copy.deepcopy(config) fails on such a dict.
    out = ml_collections.ConfigDict(convert_dict=False)
    values = dict(config.items(preserve_field_references=True))
    for name in FIELDS:  # configs/base.py's order, so config.to_json() reads the same
        value = values[name]
        if isinstance(value, ml_collections.FieldReference):
            value = ml_collections.FieldReference(value.get(), field_type=value.get_type())
        out[name] = CHOICE_FIELDS[name](value) if name in CHOICE_FIELDS else value
    out.lock()
    return out
