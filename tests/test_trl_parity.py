"""Loss, metrics and raw gradients against TRL's CPOTrainer in SimPO mode on the same tokenized pairs.

TRL computes its loss on the real pairs as one batch; ours is the jitted train step (its own
denominators, padding pairs, gradient accumulation over a sharded mesh) with a stand-in optimizer
that keeps the raw gradients. The SFT term is TRL's cpo_alpha * token-mean NLL over the chosen
completions (also the original SimPO trainer's), our sft_weight.
"""

import os

import datasets
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from trl.experimental import cpo

from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import sharding as sharding_lib
from simpo_jax.data.batch import PaddedBatch
from test_step import step_gradients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [  # chosen and rejected lengths vary, in both directions
    ("Please repeat the word: apple", "apple", "banana"),
    ("Say again: river stone", "river stone", "cloud"),
    ("Repeat: green", "green", "a very long and wrong answer about something else"),
    ("Please repeat the word: table", "table", "chair"),
    ("Repeat these words, in order: one two three four five six",
     "one two three four five six", "six"),
    ("Say: yes", "yes", "no, I will not say it"),
]
PADDING_AT = (1, 3)  # padding pairs: with 2 micro-batches, one holds 4 real pairs, the other 2


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets/tiny_tokenizer"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("trl") / "model"
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(path)
    return tok, path


def trl_loss_and_grads(tok, path, out_dir, *, beta, gbr, eps, sft_weight):
    """TRL's loss, metrics, gradients (HF names) and padded batch on all of PAIRS at once."""
    hf_model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = datasets.Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS],
                                     "chosen": [c for _, c, _ in PAIRS],
                                     "rejected": [r for _, _, r in PAIRS]})
    args = cpo.CPOConfig(output_dir=str(out_dir), loss_type="simpo", cpo_alpha=sft_weight,
                         beta=beta, simpo_gamma=beta * gbr, label_smoothing=eps, max_length=64,
                         per_device_train_batch_size=len(PAIRS), report_to=[], use_cpu=True,
                         remove_unused_columns=False)
    trainer = cpo.CPOTrainer(model=hf_model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    hf_model.train()
    loss, metrics = trainer.get_batch_loss_metrics(hf_model, batch)
    loss.backward()
    grads = {n: p.grad.detach().numpy() for n, p in hf_model.named_parameters()}
    assert len(grads) == len(list(hf_model.parameters()))
    return loss.item(), metrics, grads, {k: v.cpu().numpy() for k, v in batch.items()
                                         if isinstance(v, torch.Tensor)}


def trl_batch_to_ours(batch, padding_at=()):
    """TRL's padded chosen/rejected tensors -> our [B, 2, T] batch (labels -100 mark the prompt),
    with copies of the first pair masked out (pair_mask 0) inserted at `padding_at`."""
    seqs, starts, lengths = [], [], []
    for side in ("chosen", "rejected"):
        labels = batch[f"{side}_labels"]
        seqs.append(batch[f"{side}_input_ids"])
        starts.append(np.argmax(labels != -100, axis=1))
        lengths.append(batch[f"{side}_attention_mask"].sum(1))
    t = max(s.shape[1] for s in seqs)
    seqs = [np.pad(s, ((0, 0), (0, t - s.shape[1]))) for s in seqs]
    out = PaddedBatch(input_ids=np.stack(seqs, 1).astype(np.int32),
                      completion_start=np.stack(starts, 1).astype(np.int32),
                      lengths=np.stack(lengths, 1).astype(np.int32),
                      pair_mask=np.ones(len(seqs[0]), np.float32))
    for i in padding_at:
        out = jax.tree.map(lambda v: np.insert(v, i, v[0], axis=0), out)
        out.pair_mask[i] = 0.0
    return out


@pytest.mark.parametrize("beta,gbr,eps,sft_weight,mesh_shape,accumulation", [
    pytest.param(2.0, 0.5, 0.0, 0.0, (1, 1, 1), 1, id="simpo-1_device", marks=pytest.mark.slow),
    # label smoothing and the SFT term (TRL's default cpo_alpha), 2 micro-batches on 8 devices
    pytest.param(2.5, 0.3, 0.1, 1.0, (2, 2, 2), 2, id="simpo_sft-8_devices-2_micro_batches"),
])
def test_train_step_matches_trl_cpo_simpo(hf_model_dir, tmp_path, beta, gbr, eps, sft_weight,
                                          mesh_shape, accumulation):
    tok, path = hf_model_dir
    trl_loss, trl_metrics, trl_grads, batch = trl_loss_and_grads(
        tok, path, tmp_path, beta=beta, gbr=gbr, eps=eps, sft_weight=sft_weight)
    ours = trl_batch_to_ours(batch, PADDING_AT)
    assert ours.input_ids.shape[0] == len(PAIRS) + len(PADDING_AT) == 8

    graphdef, params = nnx.split(models.from_pretrained(str(path)), nnx.Param)
    cfg = loss_lib.LossConfig(beta=beta, gamma_beta_ratio=gbr, label_smoothing=eps,
                              sft_weight=sft_weight)
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(*mesh_shape), devices)
    grads, metrics = step_gradients(mesh, graphdef, params, ours, cfg, accumulation)
    metrics = {k: float(v) for k, v in metrics.items()}

    assert metrics["num_pairs"] == len(PAIRS)
    assert metrics["loss"] == pytest.approx(trl_loss, abs=1e-5)
    if sft_weight:  # TRL computes its NLL only when cpo_alpha > 0
        assert metrics["sft_loss"] == pytest.approx(trl_metrics["nll_loss"], abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name

    # Raw gradients, tensor by tensor in Hugging Face names, and their global norm.
    ours_grads = {k: np.asarray(v) for k, v in models.to_hf_tensors(graphdef, grads).items()}
    assert set(ours_grads) == set(trl_grads)
    worst = 0.0
    for name, g_ref in trl_grads.items():
        scale = max(np.abs(g_ref).max(), 1e-8)
        err = np.abs(ours_grads[name] - g_ref).max() / scale
        worst = max(worst, err)
        assert err < 1e-5, (name, err, scale)  # within 1e-5 of the tensor's largest entry
    ref_norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in trl_grads.values())))
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    print(f"max gradient error / tensor max: {worst:.2e}")
