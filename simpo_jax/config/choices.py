"""The allowed values of the run config's choice fields: one StrEnum per choice list.

A member equals its string, formats, JSON-dumps and reprs as it, so code and messages read the
same with members or strings. The modules that act on a choice import their tuple from here
(`MASTER_WEIGHTS = MasterWeights.values()`); load.py turns a config's strings into members.
"""

from __future__ import annotations

import enum


class Choice(enum.StrEnum):
    """An allowed value of a config field; repr as its string, so messages and dumps read the same."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


def choice(name: str, *values: str) -> type[Choice]:
    """A Choice named `name` whose members are `values`, each named as its value in capitals."""
    return Choice(name, [(value.upper(), value) for value in values], module=__name__,
                  qualname=name)


RematPolicy = choice("RematPolicy", "full", "dots", "dots_saveable")
AttentionImplementation = choice("AttentionImplementation", "auto", "xla", "cudnn", "splash",
                                 "flash")
MasterWeights = choice("MasterWeights", "float32", "bfloat16_stochastic", "bfloat16_kahan")
StateDtype = choice("StateDtype", "float32", "bfloat16")
LoraQuantization = choice("LoraQuantization", "none", "int8")
LoraTarget = choice("LoraTarget", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj")
DataFormat = choice("DataFormat", "auto", "ultrafeedback", "messages", "distilabel_math", "plain")
AssistantHeaderIn = choice("AssistantHeaderIn", "prompt", "completion")
TruncationMode = choice("TruncationMode", "keep_end", "keep_start")
LossType = choice("LossType", "sigmoid", "hinge")
LrSchedulerType = choice("LrSchedulerType", "cosine", "linear", "constant_with_warmup")
BatchLayout = choice("BatchLayout", "padded", "packed", "shared_prompt")
ReportSink = choice("ReportSink", "tensorboard", "wandb")
ExportDtype = choice("ExportDtype", "bfloat16", "float32")
PlanGpuCompiler = choice("PlanGpuCompiler", "tpu", "cpu")
RmEvalBaseline = choice("RmEvalBaseline", "model", "chosen")
