"""The tokenizer and its chat template -> prompt and completion token ids, with exactly one BOS, a
final EOS, truncation; also the prompt ids of on-policy generation."""

import dataclasses
import json

from simpo_jax import paths
from simpo_jax.config.choices import AssistantHeaderIn, TruncationMode
from simpo_jax.errors import UserError

TRUNCATION_MODES = TruncationMode.values()  # config.truncation_mode: which end of a prompt stays
ASSISTANT_HEADER_IN = AssistantHeaderIn.values()  # config.assistant_header_in


def load_tokenizer(data_config):
    """The tokenizer from a local folder (resolved like dataset paths); never runs remote code."""
    from transformers import AutoTokenizer
    path = paths.resolve_local(data_config.tokenizer_name_or_path) or \
        data_config.tokenizer_name_or_path
    if not path:
        raise UserError("tokenizer_name_or_path and model_name_or_path are both empty; set one "
                        "to a local Hugging Face tokenizer folder.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise UserError(f"tokenizer_name_or_path={data_config.tokenizer_name_or_path!r}: no "
                        f"tokenizer loads from {path} ({type(e).__name__}: {first}). Give a folder "
                        "holding tokenizer.json (or tokenizer.model) and tokenizer_config.json."
                        ) from e
    if data_config.chat_template:
        tokenizer.chat_template = chat_template_text(data_config.chat_template)
    return tokenizer


# alignment-handbook's DEFAULT_CHAT_TEMPLATE (src/alignment/data.py), used by the original SimPO
# scripts when a tokenizer has none.
ALIGNMENT_HANDBOOK_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
    "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' "
    "+ message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ "
    "'<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
    "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def chat_template_text(value: str) -> str:
    """config.chat_template -> Jinja text: a named template, a .jinja file, or the text itself."""
    if value == "alignment_handbook":
        return ALIGNMENT_HANDBOOK_TEMPLATE
    if value.endswith(".jinja"):
        path = paths.resolve_local(value)
        if path is None:
            raise UserError(f"chat_template={value!r}: no such file; give a .jinja file, "
                            "Jinja text, or 'alignment_handbook'.")
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise UserError(f"chat_template={value!r} is neither Jinja text, a .jinja file nor "
                        "'alignment_handbook'.")
    return value


@dataclasses.dataclass(frozen=True)
class TokenizeSettings:
    max_length: int  # prompt + completion tokens
    max_prompt_length: int
    truncation_mode: str  # keep_end | keep_start (of over-long prompts)
    assistant_header_in: str  # prompt | completion


def tokenize_pair(record: dict, tokenizer, settings: TokenizeSettings) -> dict:
    """A normalised record -> prompt_ids, chosen_ids, rejected_ids (completion only) and flags.

    `drop_reason` is "" for a usable pair, else the report's reason.
    """
    if record["chat"]:
        prompt, chosen, rejected, merged = _chat_ids(record, tokenizer, settings)
    else:  # pre-formatted text: the prompt gets the BOS, completions only an EOS
        prompt = one_bos(_encode(tokenizer, record["prompt"]), tokenizer.bos_token_id)
        chosen = _encode(tokenizer, record["chosen"])
        rejected = _encode(tokenizer, record["rejected"])
        merged = False
    chosen, rejected = (_end_with_eos(c, tokenizer) for c in (chosen, rejected))

    prompt_truncated = len(prompt) > settings.max_prompt_length
    if prompt_truncated:
        prompt = truncate_prompt(prompt, settings.max_prompt_length, settings.truncation_mode,
                                 tokenizer.bos_token_id)
    room = max(settings.max_length - len(prompt), 0)
    completion_truncated = max(len(chosen), len(rejected)) > room
    chosen, rejected = chosen[:room], rejected[:room]  # completions keep their start
    return dict(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected,
                drop_reason=_drop_reason(chosen, rejected, completion_truncated),
                prompt_truncated=prompt_truncated, completion_truncated=completion_truncated,
                boundary_merge=merged)


def _drop_reason(chosen: list, rejected: list, truncated: bool) -> str:
    """Why a tokenised pair cannot train ("" when it can): nothing left, or nothing to tell apart
    (a zero margin whatever the model); token-identical without truncation is a data fault."""
    if not chosen or not rejected:
        return "empty_after_truncation"
    if chosen == rejected:
        return "identical_after_truncation" if truncated else "identical_chosen_rejected"
    return ""


def truncate_prompt(ids: list, max_prompt_length: int, mode: str, bos_id) -> list:
    """keep_end: the last tokens, after the BOS when there is one; keep_start: the first tokens."""
    if len(ids) <= max_prompt_length:
        return ids
    if mode == "keep_start":
        return ids[:max_prompt_length]
    if mode != "keep_end":
        raise ValueError(f"truncation_mode={mode!r}; valid: {', '.join(TRUNCATION_MODES)}.")
    if bos_id is not None and ids and ids[0] == bos_id and max_prompt_length > 1:
        return ids[:1] + ids[len(ids) - (max_prompt_length - 1):]
    return ids[len(ids) - max_prompt_length:]


def prompt_token_ids(tokenizer, messages: list, max_prompt_length: int, truncation_mode: str):
    """(ids of the chat template with the generation prompt, one leading BOS; truncated?)."""
    if not tokenizer.chat_template:
        raise UserError("The policy's tokenizer has no chat template: set config.chat_template "
                        "(e.g. 'alignment_handbook' or a .jinja file).")
    text = render_chat(tokenizer, messages, True)
    ids = one_bos(_encode(tokenizer, text), tokenizer.bos_token_id)
    truncated = len(ids) > max_prompt_length
    ids = truncate_prompt(ids, max_prompt_length, truncation_mode, tokenizer.bos_token_id)
    return ids, truncated


def _chat_ids(record: dict, tokenizer, settings: TokenizeSettings):
    """Completion = the tokens of the whole conversation after the tokens of the prompt.

    When tokens merge across the prompt/completion boundary the prompt is cut where the two
    tokenisations diverge (as TRL does), the same cut for chosen and rejected.
    """
    messages = json.loads(record["prompt"])
    bos = tokenizer.bos_token_id
    render = lambda msgs, gen: one_bos(_encode(tokenizer, render_chat(tokenizer, msgs, gen)), bos)
    prompt = render(messages, True)
    full_chosen = render(messages + [{"role": "assistant", "content": record["chosen"]}], False)
    full_rejected = render(messages + [{"role": "assistant", "content": record["rejected"]}], False)
    cut = min(_common_prefix(prompt, full_chosen), _common_prefix(prompt, full_rejected))
    merged = cut < len(prompt)
    if settings.assistant_header_in == "completion":
        # Original SimPO scripts: the assistant header (generation prompt) is scored text.
        cut = min(cut, _common_prefix(render(messages, False), prompt))
    return prompt[:cut], full_chosen[cut:], full_rejected[cut:], merged


SANDBOX_RULES = ("templates run in Jinja's immutable sandbox: no '_' attributes, no list or dict "
                 "changes")


class TemplateRefused(UserError):
    """The chat template fails to render: Jinja's sandbox refused it, or it raised an error.

    `detail` is the one-line cause; pickles across the tokenising worker processes.
    """

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return (f"The chat template cannot be rendered: {self.detail}; fix it or set "
                f"config.chat_template (e.g. 'alignment_handbook' or a .jinja file) "
                f"({SANDBOX_RULES}).")


def template_error(err: TemplateRefused, chat_template: str, tokenizer) -> UserError:
    """The one line for a refused template, naming config.chat_template or the tokenizer's."""
    if chat_template:
        short = chat_template if len(chat_template) <= 100 else chat_template[:97] + "..."
        source, fix = f"config.chat_template={short!r}", "fix it or choose another chat_template"
    else:
        source = f"The chat template of the tokenizer loaded from {tokenizer.name_or_path!r}"
        fix = ("fix chat_template in its tokenizer_config.json or set config.chat_template (e.g. "
               "'alignment_handbook' or a .jinja file)")
    return UserError(f"{source} cannot be rendered: {err.detail}; {fix} ({SANDBOX_RULES}).")


def render_chat(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    """The chat template applied to `messages`, as text; TemplateRefused for Jinja's errors."""
    import jinja2
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as err:
        detail = " ".join(str(err).split())[:300].rstrip(".")
        raise TemplateRefused(f"{type(err).__name__}: {detail}") from None


def _encode(tokenizer, text: str) -> list:
    return list(tokenizer.encode(text, add_special_tokens=False))


def one_bos(ids: list, bos_id) -> list:
    """Exactly one leading BOS, whether the template, the tokenizer, both or neither added it."""
    if bos_id is None:
        return ids
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    return [bos_id] + ids[start:]


def _end_with_eos(ids: list, tokenizer) -> list:
    """The completion ends with EOS: whitespace the template puts after its EOS is cut, a missing EOS added."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        tail = ids[last + 1:]
        if not tail or not tokenizer.decode(tail).strip():
            return ids[:last + 1]
    return ids + [eos]


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
