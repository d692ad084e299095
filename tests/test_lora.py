"""LoRA against references no one here wrote: PEFT loads our adapter (and transformers our merged
export) with the same logits; step 0 is the base; the base never changes; sharded gradients equal
one device's; a tiny LoRA run learns and resumes exactly."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from simpo_jax import config as config_lib
from simpo_jax import lora
from simpo_jax import models
from simpo_jax.models import hf
from simpo_jax import sharding as sharding_lib
from simpo_jax import step as step_lib
from simpo_jax.data.batch import batch_shardings
from simpo_jax.errors import UserError

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
             tie_word_embeddings=False)
FAMILIES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=lora.TARGET_MODULES)


def hf_folder(tmp_path, family="llama"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](**SMALL),
                                                          dtype=torch.float32)
    path = str(tmp_path / f"{family}_base")
    model.save_pretrained(path)
    return path


def random_b(model, seed=1):
    """Nonzero B everywhere, so the adapters change the logits (B = 0 would test nothing)."""
    rng = np.random.default_rng(seed)
    for _, linear in lora.targets(model, lora.TARGET_MODULES):
        if linear.lora_B is None:
            continue
        shape = linear.lora_B.shape
        linear.lora_B = nnx.LoRAParam(jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32))


def ids_and_mask():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, SMALL["vocab_size"], size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    return ids, mask


def torch_logits(model, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.float().numpy()


def max_error(a, b, mask):
    """Largest |a - b| over real (unpadded) positions: padding rows follow no convention."""
    return float(np.abs(a - b)[mask == 1].max())


@pytest.mark.slow
def test_step0_lora_model_equals_base_exactly(tmp_path):
    path = hf_folder(tmp_path)
    ids, mask = ids_and_mask()
    model = models.from_pretrained(path)
    base = np.asarray(model(ids, mask))
    lora.add_adapters(model, CFG, seed=0)
    assert len(lora.targets(model, lora.TARGET_MODULES)) == 7
    a = model.model.layers.self_attn.q_proj.lora_A
    assert a.shape == (2, 4, 32) and float(jnp.abs(a[...]).max()) > 0  # A random, B zero
    assert np.array_equal(np.asarray(model(ids, mask)), base)


@pytest.mark.parametrize("family,targets", [("llama", lora.TARGET_MODULES),
                                             ("qwen2", lora.TARGET_MODULES),
                                             ("llama", ("v_proj", "q_proj", "down_proj"))],
                         ids=["llama", "qwen2_qkv_bias", "llama_q_v_down"])
def test_peft_adapter_and_merged_export_match_transformers_logits(tmp_path, family, targets):
    peft = pytest.importorskip("peft")
    path = hf_folder(tmp_path, family)
    ids, mask = ids_and_mask()
    model = models.from_pretrained(path)
    cfg = dataclasses.replace(CFG, target_modules=targets)
    lora.add_adapters(model, cfg, seed=0)
    random_b(model)
    ours = np.asarray(model(ids, mask))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert max_error(torch_logits(base, ids, mask), ours, mask) > 1e-2  # the adapters matter

    adapter = str(tmp_path / "adapter")
    lora.save_adapter(model, adapter, cfg, base_model_name_or_path=path)
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["peft_type"], config["task_type"],
            config["target_modules"]) == (4, 8, "LORA", "CAUSAL_LM", sorted(targets))
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    layer = "base_model.model.model.layers.1"
    assert tensors[f"{layer}.self_attn.q_proj.lora_A.weight"].shape == (4, 32)  # [r, in]
    assert tensors[f"{layer}.mlp.down_proj.lora_B.weight"].shape == (32, 4)  # [out, r]
    assert len(tensors) == 2 * len(targets) * 2
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert max_error(torch_logits(peft_model, ids, mask), ours, mask) < 1e-4

    merged_dir = str(tmp_path / "merged")
    models.save_pretrained(lora.merge_adapters(model), merged_dir, dtype="float32")
    assert not nnx.state(model, nnx.LoRAParam)
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert max_error(torch_logits(merged, ids, mask), ours, mask) < 1e-4


def keep_gradients():
    """A stand-in optimizer: adapters stay, the step's raw gradients become the optimizer state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def lora_gradients(mesh, path):
    from tests.test_step import LOSS, make_batch

    model = models.from_pretrained(path, mesh=mesh)
    lora.add_adapters(model, CFG, mesh=mesh, seed=0)
    random_b(model)
    graphdef, params, frozen = lora.split(model)
    frozen_sh = sharding_lib.param_shardings(mesh, frozen)
    tx = keep_gradients()
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    fn, state_sh = step_lib.jit_train_step(
        mesh, abstract, graphdef=graphdef, tx=tx, schedule=optax.constant_schedule(0.0),
        cfg=LOSS, accumulation_steps=2, frozen_shardings=frozen_sh)
    params = jax.device_put(params, state_sh.params)
    frozen = jax.device_put(frozen, frozen_sh)
    before = jax.tree.map(np.asarray, frozen)
    state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
    batch = jax.device_put(make_batch(), batch_shardings(mesh))
    state, _ = step_lib.BoundFrozen(fn, frozen)(state, batch)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, frozen)))
    return state.opt_state


@pytest.mark.slow
def test_lora_gradients_on_2x2x2_mesh_equal_one_device(tmp_path):
    path = hf_folder(tmp_path)
    one = lora_gradients(sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1),
                                                jax.devices()[:1]), path)
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(2, 2, 2))
    eight = lora_gradients(mesh, path)
    # Only adapters are differentiated: the gradient tree is the adapters' tree.
    paths = [p for p, _ in hf.param_leaves(eight)]
    assert len(paths) == 2 * 7 and all(p.endswith(("lora_A", "lora_B")) for p in paths), paths
    # A and B are sharded as their base weight: q_proj's A along `in` (fsdp), B along `out`.
    a = eight["model"]["layers"]["self_attn"]["q_proj"]["lora_A"]
    b = eight["model"]["layers"]["self_attn"]["o_proj"]["lora_B"]
    assert a.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    for (p, x), (_, y) in zip(hf.param_leaves(one), hf.param_leaves(eight)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x).max() > 0, p
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=0, err_msg=p)


def test_config_validation_names_the_field():
    from configs import tiny

    c = tiny.get_config()
    c.lora_rank = 8
    config_lib.validate(c)
    for field, value, words in (("lora_dropout", 0.1, "only 0.0"),
                                ("lora_target_modules", ("q_proj", "embed_tokens"), "distinct"),
                                ("lora_alpha", 0.0, "2 x lora_rank")):
        bad = tiny.get_config()
        bad.lora_rank = 8
        setattr(bad, field, value)
        with pytest.raises(UserError, match=words):
            config_lib.validate(bad)


# --- Training runs of the tiny default ---------------------------------------------------------

LORA_RUN = dict(max_steps=40, eval_steps=20, save_steps=20, logging_steps=10,
                per_device_train_batch_size=2, per_device_eval_batch_size=8, num_samples=2,
                lora_rank=8, lora_alpha=16.0, learning_rate=3e-3, export_dtype="float32",
                report_to=())


def tiny_config(output_dir, **overrides):
    from tests.test_e2e import tiny_config as make

    return make(output_dir, **{**LORA_RUN, **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from simpo_jax import train

    out = tmp_path_factory.mktemp("lora") / "run"
    final = train.train(tiny_config(out))
    return out, final


@pytest.mark.slow
def test_tiny_lora_run_learns_and_exports_both_ways(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    from tests.test_e2e import read_rows

    out, final = lora_run
    eval_rows = [r for r in read_rows(out) if "eval_loss" in r]
    accuracy = [r["eval_rewards/accuracies"] for r in eval_rows]
    # The SFT base ranks 40% of the held-out pairs right; 40 LoRA steps at 10x the full rate.
    assert accuracy[0] <= 0.6 and accuracy[-1] >= 0.8, accuracy

    # The merged export changed exactly the adapted projections; every other tensor is the base's.
    base_dir = os.path.join(ROOT, "assets/tiny_sft")
    base, merged = (load_file(os.path.join(d, "model.safetensors")) for d in (base_dir, out))
    assert base.keys() == merged.keys()
    for key in base:
        adapted = any(f".{m}." in key for m in lora.TARGET_MODULES)
        same = np.array_equal(base[key].astype(np.float32), merged[key])
        assert same != adapted, key
    # ... by B A alpha/r of the exported adapter alone: the frozen base weights did not move.
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for key in [k for k in base if any(f".{m}." in k for m in lora.TARGET_MODULES)]:
        stem = "base_model.model." + key[:-len("weight")]
        delta = adapter[stem + "lora_B.weight"] @ adapter[stem + "lora_A.weight"] * (16.0 / 8)
        np.testing.assert_allclose(merged[key], base[key] + delta, atol=1e-6, rtol=0,
                                   err_msg=key)

    # PEFT's adapter on the transformers base, and transformers on the merged folder: same logits.
    ids, mask = ids_and_mask()
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, str(out / "adapter")).eval()
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert max_error(torch_logits(with_adapter, ids, mask), torch_logits(hf_merged, ids, mask),
                     mask) < 1e-4

    # --mode=export of the last checkpoint (the base re-read from assets/tiny_sft) writes the same.
    from simpo_jax import train

    again = train.export_checkpoint(tiny_config(out, export_dir=str(tmp_path / "export")))
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(out / name)), load_file(os.path.join(again, name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name

    # Checkpoints hold the adapters and their optimizer state only (orbax's tree metadata).
    state_dir = out / "checkpoints" / "40" / "state"
    tree = json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]
    arrays = [k for k in tree if "model" in k]
    assert len(arrays) == 3 * 2 * 7, arrays  # A and B of 7 projections: value, mu, nu
    assert all("'lora_A'" in k or "'lora_B'" in k for k in arrays), arrays
    # A full run's checkpoint holds 3 float32 copies of the base (params, mu, nu); rank 8 of
    # this 64-wide model is 12% of its parameters (on Mistral-7B rank 16 is 0.6%). The bytes of
    # the arrays orbax saved (their global shapes and dtypes, from its metadata: 0.27 MB) stay
    # under one copy of the base (0.76 MB), so a checkpoint that kept even one copy beside the
    # adapters fails here. The files' sizes are no measure: OCDBT's data files vary from save
    # to save (0.58 MB and 1.28 MB at step 40 of two runs of this config).
    import orbax.checkpoint as ocp

    saved = ocp.PyTreeCheckpointer().metadata(str(state_dir)).item_metadata.tree
    saved = jax.tree.leaves(saved, is_leaf=lambda x: hasattr(x, "shape"))
    saved_bytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in saved)
    base_bytes = os.path.getsize(os.path.join(base_dir, "model.safetensors"))
    assert saved_bytes < base_bytes, (saved_bytes, base_bytes)


@pytest.mark.slow
def test_lora_resume_is_exact_and_refuses_other_lora_settings(lora_run, tmp_path):
    from simpo_jax import build as build_lib
    from simpo_jax import train

    out, _ = lora_run
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "40")
    # Same shapes, another scale: only the checkpoint's meta can tell.
    with pytest.raises(UserError, match="different lora"):
        build_lib.build(tiny_config(resumed, lora_alpha=32.0), with_data=False)
    # Same config.json, other weights: the base's fingerprint tells.
    other_base = tmp_path / "other_base"
    shutil.copytree(os.path.join(ROOT, "assets/tiny_sft"), other_base)
    tensors = load_file(str(other_base / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key] + np.float32(1e-3)
    save_file(tensors, str(other_base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="different lora"):
        build_lib.build(tiny_config(resumed, model_name_or_path=str(other_base)), with_data=False)
    train.train(tiny_config(resumed))
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_doctor_knows_lora_rates_and_alpha():
    from simpo_jax import doctor
    from tests.test_doctor import base_config

    def warnings(**overrides):
        return " | ".join(doctor.config_warnings(base_config(**overrides), num_params=7.24e9,
                                                 effective_batch=128))

    recipe = __import__("configs.mistral7b_lora", fromlist=["get_config"]).get_config()
    config_lib.validate(recipe)
    assert doctor.config_warnings(recipe, num_params=7.24e9, effective_batch=128) == []
    # A full-fine-tuning rate with LoRA, and a LoRA rate without it.
    assert "full-fine-tuning rate" in warnings(lora_rank=16, lora_alpha=32.0, learning_rate=5e-7)
    assert "is a LoRA rate" in warnings(learning_rate=5e-6)
    assert "above 10x" in warnings(lora_rank=16, lora_alpha=32.0, learning_rate=1e-4)
    assert "alpha = 2 x rank = 32" in warnings(lora_rank=16, lora_alpha=16.0, learning_rate=5e-6)
    assert warnings(learning_rate=5e-7) == ""


@pytest.mark.slow
def test_int8_base_matches_transformers_on_the_dequantised_weights(tmp_path):
    # Reference: numpy's absmax int8 of each projection row, put into the transformers model.
    path = hf_folder(tmp_path)
    ids, mask = ids_and_mask()
    model = models.from_pretrained(path)
    lora.add_adapters(model, CFG, seed=0)
    random_b(model)
    before = np.asarray(model(ids, mask))
    lora.quantize_base(model, lora.TARGET_MODULES)
    q = model.model.layers.mlp.down_proj
    assert q.weight[...].dtype == jnp.int8 and q.weight_scale.shape == (2, 32, 1)
    ours = np.asarray(model(ids, mask))
    assert 1e-5 < max_error(before, ours, mask) < 0.05  # int8 error: small, not zero

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = hf_model.state_dict()
    for key in [k for k in state if any(f".{m}." in k for m in lora.TARGET_MODULES)]:
        w = state[key].numpy()
        scale = np.abs(w).max(-1, keepdims=True) / 127.0
        state[key].copy_(torch.from_numpy(np.round(w / scale).clip(-127, 127) * scale))
    adapter = str(tmp_path / "adapter")
    lora.save_adapter(model, adapter, CFG, base_model_name_or_path=path)
    peft = pytest.importorskip("peft")
    with_adapter = peft.PeftModel.from_pretrained(hf_model, adapter).eval()
    assert max_error(torch_logits(with_adapter, ids, mask), ours, mask) < 1e-4
    # The merged export is the int8 base + the adapters, as trained.
    merged_dir = str(tmp_path / "merged")
    models.save_pretrained(lora.merge_adapters(model), merged_dir, dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert max_error(torch_logits(merged, ids, mask), ours, mask) < 1e-4


@pytest.mark.slow
def test_tiny_lora_run_on_an_int8_base_learns(tmp_path):
    from simpo_jax import train
    from tests.test_e2e import read_rows

    train.train(tiny_config(tmp_path / "int8", lora_base_quantization="int8"))
    accuracy = [r["eval_rewards/accuracies"] for r in read_rows(tmp_path / "int8")
                if "eval_loss" in r]
    assert accuracy[0] <= 0.6 and accuracy[-1] >= 0.8, accuracy
    with pytest.raises(UserError, match="lora_base_quantization.*lora_rank > 0"):
        config_lib.validate(tiny_config(tmp_path / "x", lora_rank=0,
                                        lora_base_quantization="int8"))


@pytest.mark.slow
def test_hub_push_adapter_only_uploads_the_peft_adapter(lora_run, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    from simpo_jax import train
    from simpo_jax.hub import publish
    from tests.hub_stand_in import HubStandIn

    out, _ = lora_run
    stand_in = HubStandIn()
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(publish, "hub_api", lambda: HfApi(endpoint=stand_in.url, token="hf_test"))
    try:
        train.export_checkpoint(tiny_config(out, export_dir=str(tmp_path / "pushed"),
                                            push_to_hub=True, hub_model_id="someone/tiny-lora",
                                            hub_push_adapter_only=True))
    finally:
        stand_in.close()
    pushed = set(stand_in.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md",
            "tokenizer.json"} <= pushed
    assert not {"model.safetensors", "config.json"} & pushed  # not the merged model
    adapter = tmp_path / "pushed" / "adapter" / "adapter_model.safetensors"
    assert stand_in.files["adapter_model.safetensors"] == adapter.read_bytes()
