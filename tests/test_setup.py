"""The planner compiles what a run compiles: the train step lowered both ways is the same program."""

import jax
import jax.numpy as jnp
import pytest

from simpo_jax import build as build_lib
from simpo_jax import plan as plan_lib
from simpo_jax import setup
from simpo_jax.data.batcher import make_batcher
from simpo_jax import sharding as sharding_lib
from test_resume import tiny_config  # configs/tiny.py, 20 steps: the schedule's length


def planned_and_run(c) -> tuple[str, str]:
    """HLO text of the train step as the planner lowers it and as build() lowers it, both on the
    planner's abstract batch."""
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(c), jax.devices())
    _, steps, state = plan_lib.abstract_step(c, plan_lib.hf_config_of(c), mesh)
    batch, _, _ = make_batcher(c, mesh).abstract_batch()
    planned = steps.train_step.lower(state, batch).as_text()
    run = build_lib.build(c)
    run.checkpointer.close()
    return planned, run.train_step.lower(run.state, batch).as_text()


# Packed rows: rows per device and row length fixed, as the planner cannot measure the data.
LAYOUTS = {
    "padded": {},
    "packed": dict(batch_layout="packed", pack_row_length=96, pack_rows_per_device=2),
    "lora": dict(lora_rank=4, lora_alpha=8.0, lora_base_quantization="int8"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "lora" else n
                                  for n in sorted(LAYOUTS)])  # LoRA's build: about 25 s
def test_planner_lowers_the_train_step_a_run_lowers(tmp_path, name):
    c = tiny_config(tmp_path, gradient_accumulation_steps=2, gradient_checkpointing=True,
                    remat_policy="dots", **LAYOUTS[name])
    planned, ran = planned_and_run(c)
    assert "stablehlo" in planned and len(planned) > 10_000
    assert planned == ran


def test_the_comparison_sees_a_planner_that_plans_something_else(tmp_path):
    # The negative control: one remat policy apart, the programs differ.
    c = tiny_config(tmp_path, gradient_accumulation_steps=2, gradient_checkpointing=True,
                    remat_policy="dots")
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(c), jax.devices())
    batch, _, _ = make_batcher(c, mesh).abstract_batch()
    texts = []
    for policy in ("dots", "full"):
        c.remat_policy = policy
        _, steps, state = plan_lib.abstract_step(c, plan_lib.hf_config_of(c), mesh)
        texts.append(steps.train_step.lower(state, batch).as_text())
    assert texts[0] != texts[1]


def test_model_spec_holds_the_dtype_and_remat_rule(tmp_path):
    c = tiny_config(tmp_path, bf16=True, master_weights="bfloat16_kahan")
    c.gradient_checkpointing = False
    names = lambda s: (jnp.dtype(s.dtype).name, jnp.dtype(s.param_dtype).name,
                       jnp.dtype(s.master_dtype).name, s.remat_policy)
    assert names(setup.ModelSpec.from_config(c)) == ("bfloat16", "bfloat16", "bfloat16", "none")
    c.bf16, c.master_weights, c.lora_rank = False, "float32", 4
    c.gradient_checkpointing, c.remat_policy = True, "dots"
    assert names(setup.ModelSpec.from_config(c)) == ("float32", "float32", "float32", "dots")
    # A LoRA base is frozen in the compute dtype; the adapters train in the master dtype.
    c.bf16 = True
    assert names(setup.ModelSpec.from_config(c)) == ("bfloat16", "bfloat16", "float32", "dots")


@pytest.mark.slow  # splash in Pallas interpret mode: about a minute on 2 cores
def test_a_run_with_splash_traces_under_its_mesh_and_equals_xla(tmp_path):
    # The kernels run per device (shard_map) and need the mesh while tracing: setup binds it.
    # One train step of the shared-prompt layout, splash (interpreted on CPU) against XLA.
    first = {}
    for impl in ("xla", "splash"):
        c = tiny_config(tmp_path / impl, batch_layout="shared_prompt", pack_row_length=256,
                        pack_rows_per_device=1, attention_implementation=impl, max_steps=1)
        run = build_lib.build(c)
        run.checkpointer.close()
        assert isinstance(run.train_step, setup.UnderMesh) == (impl == "splash")
        batch = next(iter(run.batcher.batches(0)))
        _, metrics = run.train_step(run.state, batch)
        first[impl] = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert first["splash"][k] == pytest.approx(first["xla"][k], rel=1e-5, abs=1e-6), k
