"""python -m simpo_jax.config: every config field by section, with default, allowed values and doc."""

from simpo_jax.config.schema import FIELDS, SECTIONS, Spec


def describe(spec: Spec) -> str:
    """`name: type = default  [allowed values or bounds]  doc`, one line."""
    allowed = (" | ".join(spec.choices.values()) if spec.choices else
               spec.valid or ", ".join(bound.valid for bound in spec.bounds))
    kind = "str" if spec.choices else str(spec.type).removeprefix("<class '").removesuffix("'>")
    return (f"  {spec.name}: {kind} = {spec.default!r}" + (f"  [{allowed}]" if allowed else "")
            + f"  {spec.doc}")


def listing() -> str:
    """The fields by section, as configs/base.py's get_config() holds them."""
    lines = []
    for cls in SECTIONS:
        lines.append(f"--- {cls.title}")
        lines += [describe(spec) for spec in FIELDS.values() if spec.section == cls.title]
    return "\n".join(lines)


if __name__ == "__main__":
    print(listing())
