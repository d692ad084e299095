"""The embedded default: SimPO teaches a tiny instruction-tuned Llama to copy a word, on CPU.

The recipe a practitioner follows, in miniature: start from an instruction-tuned (SFT) model, not
from random weights; align it on pairs of its own answers, the right one chosen and its own wrong
one rejected (on-policy data, as in the SimPO paper's Instruct recipes); keep an NLL term on the
chosen answers (sft_weight, as CPO-SimPO does) so the greedy answers improve with the margins.

- assets/tiny_sft (scripts/make_tiny_sft_model.py): a 2-layer, 64-wide Llama fine-tuned to copy
  words and phrasings that appear nowhere in the preference data. It copies the requested word for
  about a third of the test prompts: the samples at step 0 show what it gets wrong.
- assets/tiny_prefs_onpolicy (scripts/make_tiny_onpolicy_prefs.py): the prompts and chosen words of
  assets/tiny_prefs; each rejected answer is the base's own mistake ("bctor" for "doctor").
  With tiny_prefs' random-word rejections the base already ranks 99% of the test pairs right and
  the SimPO loss starts at 0.02: there would be nothing to learn.
- sft_weight=0.2 (the guide's top value): without it eval reward accuracy still rises to 0.97-0.99
  but the greedy copy rate of 64 test prompts falls (0.30 -> 0.11-0.19), the known failure of a
  margin loss alone (both log-probabilities fall; greedy decoding drifts to answers that are
  neither). Copy rate after 300 steps at beta 2.0: 0.81 at sft_weight 0.1, 0.88 at 0.2, 0.97 at
  1.0 (which the doctor flags as weakening the preference term).
- beta=1.0 (the guide's lower bound; 2.0 is standard): the base's mistakes are improbable
  answers, so at beta 2.0 the train reward margins pass 5 by step 200 and the doctor advises
  lowering beta; at 1.0 they stay below 5, with the same accuracy and copy rate.
- learning_rate=3e-4: below the 1e-3 a random init needed, as a base that already follows the
  instruction wants a gentler step (at 1e-4 the copy rate reaches only 0.66). --mode=lr_find,
  swept far enough to diverge, suggests 3.0e-4.
Measured with these settings: eval reward accuracy 0.40 -> 0.99 (step 100) -> 0.997, copy rate of
64 test prompts 0.30 -> 0.69 -> 0.88; about 20 s on 2 idle CPU cores, as the random-init default.
Copy rate of the samples at every eval: `python scripts/copy_rate.py outputs/tiny`.

Run: python run.py --config=configs/tiny.py
Source: the measurements above (CPU, 300 steps of 16 pairs, eval on all 300 test pairs).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()

    # --- Model: the tiny SFT base (its folder holds the shipped tokenizer and chat template) -----
    c.model_name_or_path = "assets/tiny_sft"

    # --- Data: tiny_prefs prompts, chosen = the requested word, rejected = the base's mistake ----
    c.dataset_mixer = ml_collections.ConfigDict({"assets/tiny_prefs_onpolicy": 1.0},
                                                allow_dotted_keys=True)
    c.max_length = 64
    c.max_prompt_length = 48
    # The default batch_layout, shared_prompt: rows of 2 x max_length tokens holding [prompt |
    # chosen | rejected] of about 5 pairs each (the tiny pairs are 17-29 tokens); eval is padded.

    # --- SimPO and optimizer ---------------------------------------------------------------------
    c.beta = 1.0  # the guide's lower bound: keeps reward margins under 5 (see docstring)
    c.gamma_beta_ratio = 0.5
    c.sft_weight = 0.2  # NLL of the chosen answer: the greedy answers improve too (see docstring)
    c.learning_rate = 3e-4
    c.warmup_ratio = 0.1
    c.max_steps = 300
    c.per_device_train_batch_size = 16
    c.per_device_eval_batch_size = 64
    c.gradient_accumulation_steps = 1

    # --- Output ----------------------------------------------------------------------------------
    c.output_dir = "outputs/tiny"
    c.logging_steps = 10
    c.eval_steps = 100
    c.save_steps = 100
    c.num_samples = 16  # greedy answers to the first 16 test prompts at every eval
    c.sample_max_new_tokens = 8  # answers are one word
    c.export_dtype = "float32"
    return c
