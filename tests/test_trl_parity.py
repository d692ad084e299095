"""Loss, metrics and gradients against TRL's CPOTrainer in SimPO mode on the same tokenized batch."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from simpo_jax import loss as loss_lib
from simpo_jax import models
from simpo_jax import step as step_lib
from flax import nnx

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
cpo = pytest.importorskip("trl.experimental.cpo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [
    ("Please repeat the word: apple", "apple", "banana"),
    ("Say again: river stone", "river stone", "cloud"),
    ("Repeat: green", "green", "a very long and wrong answer about something else"),
    ("Please repeat the word: table", "table", "chair"),
]


def trl_batch_to_ours(batch):
    """TRL's padded chosen/rejected tensors -> our [B, 2, T] batch (labels -100 mark the prompt)."""
    seqs, starts, lengths = [], [], []
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_input_ids"].numpy()
        labels = batch[f"{side}_labels"].numpy()
        mask = batch[f"{side}_attention_mask"].numpy()
        seqs.append(ids)
        starts.append(np.argmax(labels != -100, axis=1))
        lengths.append(mask.sum(1))
    t = max(s.shape[1] for s in seqs)
    seqs = [np.pad(s, ((0, 0), (0, t - s.shape[1]))) for s in seqs]
    return {
        "input_ids": jnp.asarray(np.stack(seqs, 1), jnp.int32),
        "completion_start": jnp.asarray(np.stack(starts, 1), jnp.int32),
        "lengths": jnp.asarray(np.stack(lengths, 1), jnp.int32),
        "pair_mask": jnp.ones(len(seqs[0]), jnp.float32),
    }


@pytest.mark.parametrize("beta,gbr,eps", [(2.0, 0.5, 0.0), (2.5, 0.3, 0.1)])
def test_matches_trl_cpo_simpo(tmp_path, beta, gbr, eps):
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets/tiny_tokenizer"))
    hf_cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).float()
    hf_model.save_pretrained(tmp_path / "model")
    ds = datasets.Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS],
                                     "chosen": [c for _, c, _ in PAIRS],
                                     "rejected": [r for _, _, r in PAIRS]})
    args = cpo.CPOConfig(output_dir=str(tmp_path / "trl"), loss_type="simpo", cpo_alpha=0.0,
                         beta=beta, simpo_gamma=beta * gbr, label_smoothing=eps, max_length=64,
                         per_device_train_batch_size=len(PAIRS), report_to=[], use_cpu=True,
                         remove_unused_columns=False)
    trainer = cpo.CPOTrainer(model=hf_model, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    hf_model.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(hf_model, batch)
    trl_loss.backward()

    ours = models.from_pretrained(str(tmp_path / "model"))
    graphdef, params = nnx.split(ours, nnx.Param)
    cfg = loss_lib.LossConfig(beta=beta, gamma_beta_ratio=gbr, label_smoothing=eps)
    our_batch = trl_batch_to_ours({k: v.cpu() for k, v in batch.items()
                                   if isinstance(v, torch.Tensor)})

    def objective(p):
        sums, _, _ = step_lib.pair_forward(graphdef, p, our_batch, cfg)
        return sums["simpo_loss"] / sums["pairs"], sums

    (obj, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    metrics = loss_lib.finalize_metrics(sums, cfg)
    assert float(sums["pairs"]) == len(PAIRS)
    assert float(obj) == pytest.approx(trl_loss.item(), abs=1e-5)
    assert float(metrics["loss"]) == pytest.approx(trl_loss.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name], abs=1e-5), name

    # Gradients, tensor by tensor, in Hugging Face names.
    ours_grads = {k: np.asarray(v) for k, v in models.to_hf_tensors(graphdef, grads).items()}
    checked = 0
    for name, p in hf_model.named_parameters():
        g_ref = p.grad.detach().numpy()
        g = ours_grads[name]
        scale = max(np.abs(g_ref).max(), 1e-8)
        # within 1e-5 of the tensor's largest gradient entry
        assert np.abs(g - g_ref).max() / scale < 1e-5, (name, np.abs(g - g_ref).max(), scale)
        checked += 1
    assert checked == len(list(hf_model.parameters()))
