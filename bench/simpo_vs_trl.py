"""Our SimPO train step (padded / packed / shared_prompt rows) against TRL's CPOTrainer, one run.

    python bench/simpo_vs_trl.py            # both models, ~10-15 min on 2 cores
    python bench/simpo_vs_trl.py --layout packed --steps 3 --representative-steps 0
    python bench/simpo_vs_trl.py --dry-run  # tiny models, one step each: the test suite runs it

Two locally made Hugging Face Llamas, float32, both sides loading the same weights and training on
the same pairs (random words, ids below 8192, from a 32k word-level tokenizer; prompt, chosen and
rejected 50-150 tokens each), tokenized once by TRL:
  head-heavy (the default table and the last line): 4 layers, 256 wide, 32k vocabulary: the LM
    head is 72% of the matmul parameters, so the head's cost dominates;
  representative: 8 layers, 1024 wide, 8k vocabulary: the head is 7.5% of the matmul parameters,
    close to Llama-3-8B's 7% (Mistral-7B 2%, Gemma-2-9B 10%), so the decoder dominates as in a
    7B model; fewer pairs and steps (--representative-*), shared_prompt rows against TRL.
TRL: CPOTrainer(loss_type="simpo", cpo_alpha=0, simpo_gamma=beta*gamma_beta_ratio), timed over
compute_loss + backward + AdamW step on its own collated batches. Ours: the jitted train step
(block_until_ready), compile and warm-up of every batch shape excluded. Steps are interleaved
(TRL, then each layout) so load from other processes hits all alike; rates are medians over the
timed steps. The throughput ratio counts pair tokens (prompt + chosen + prompt + rejected of the
step's pairs, none of them padding): TRL's real tokens, and for our layouts the same work whether
or not the prompt is computed once, so the ratio is that of pairs per second. "real tok/s" counts
the non-padding tokens each side actually computed (the shared prompt once). MFU = model FLOPs per
token (simpo_jax.flops: 6 x non-embedding parameters including the LM head, plus attention at the
mean sequence length) x real tokens/s / the FLOP/s of a 2048x2048 float32 matmul measured in the
same run (the largest of the measurements before and between the timed rounds).
Printed first: the CPU model and the float32 rates of XLA's and torch's matmuls on the
representative model's MLP shape (bench/peak_check.dot_report). The last two lines are the
representative model's ratio and the head-heavy one's (best layout), in the same format.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# glibc hands large freed buffers back to the OS and maps fresh zeroed pages for the next step's
# tensors: page faults then cost TRL a quarter of its step (measured: 8.97 s -> 6.91 s median per
# head-heavy step alone), and how much depends on what the process ran before. Both sides run with
# the heap kept (the strongest TRL baseline; our step does not change measurably); the variables
# must be set before the process starts, hence the re-exec.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32),
          "MALLOC_TOP_PAD_": str(2**30)}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in MALLOC.items()):
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC})

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads of torch otherwise spin for a while after each TRL step, taking cores from
# whichever side runs next in the interleaved loop.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from simpo_jax import flops, models, optim  # noqa: E402
from simpo_jax import loss as loss_lib  # noqa: E402
from simpo_jax import sharding as sharding_lib  # noqa: E402
from simpo_jax import step as step_lib  # noqa: E402
from simpo_jax.data import packed, packed_rows  # noqa: E402
from simpo_jax.data.batch import batch_shardings  # noqa: E402
from simpo_jax.data.padded import pair_batches  # noqa: E402
from simpo_jax.data.pairs import TokenizedPairs  # noqa: E402

from bench import peak_check  # noqa: E402

VOCAB = 32000  # the tokenizer's; the data uses ids below DATA_VOCAB, so both models read it
DATA_VOCAB = 8192
MODEL = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
REPRESENTATIVE = dict(vocab_size=DATA_VOCAB, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=1024)
BETA, GAMMA_BETA_RATIO, LEARNING_RATE = 2.0, 0.5, 1e-5
LENGTHS = (50, 150)  # tokens of prompt, chosen and rejected, uniform
LAYOUTS = ("padded", "packed", "shared_prompt")
DRY_RUN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2)  # --dry-run: both models this small


def make_tokenizer(path: str):
    """A 32k word-level tokenizer: words w4..w31999, one token each."""
    import tokenizers
    import transformers
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special)} | {f"w{i}": i for i in range(len(special), VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)
    return fast


def make_model(path: str, tok, model: dict):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**model, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(path)


def make_rows(num_pairs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def text():
        return " ".join(f"w{i}" for i in rng.integers(4, DATA_VOCAB, rng.integers(*LENGTHS) + 1))

    rows = [(text(), text(), text()) for _ in range(num_pairs)]
    return {k: [r[i] for r in rows] for i, k in enumerate(("prompt", "chosen", "rejected"))}


def pairs_from_trl(dataset) -> TokenizedPairs:
    """Our pairs from TRL's tokenized dataset, so both sides train on identical token ids."""
    prompts, chosen, rejected = [], [], []
    for row in dataset:
        n = sum(1 for x in row["chosen_labels"] if x == -100)
        c = np.asarray(row["chosen_input_ids"], np.int32)
        r = np.asarray(row["rejected_input_ids"], np.int32)
        m = sum(1 for x in row["rejected_labels"] if x == -100)
        assert n == m and np.array_equal(c[:n], r[:m])
        prompts.append(c[:n])
        chosen.append(c[n:])
        rejected.append(r[m:])
    return TokenizedPairs(prompts, chosen, rejected, [f"bench:{i}" for i in range(len(prompts))])


class TRLSide:
    def __init__(self, model_path, tok, rows, pairs_per_step, out_dir):
        import datasets
        import transformers
        from trl.experimental import cpo
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32)
        args = cpo.CPOConfig(output_dir=out_dir, loss_type="simpo", cpo_alpha=0.0, beta=BETA,
                             simpo_gamma=BETA * GAMMA_BETA_RATIO, max_length=512,
                             per_device_train_batch_size=pairs_per_step, report_to=[],
                             use_cpu=True, remove_unused_columns=False,
                             learning_rate=LEARNING_RATE)
        self.trainer = cpo.CPOTrainer(model=self.model, args=args,
                                      train_dataset=datasets.Dataset.from_dict(rows),
                                      processing_class=tok)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE,
                                           weight_decay=0.0)
        self.batches = iter(self.trainer.get_train_dataloader())
        self.model.train()

    def step(self) -> tuple[float, int, int]:
        batch = next(self.batches)
        start = time.perf_counter()
        loss = self.trainer.compute_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        return seconds, tokens, tokens


class OurSide:
    def __init__(self, model_path, pairs, layout, pairs_per_step, rows_per_step, chunk, steps):
        model = models.from_pretrained(model_path)
        self.graphdef, params = nnx.split(model, nnx.Param)
        tx, schedule = optim.make_optimizer(optim.OptimConfig(
            learning_rate=LEARNING_RATE, lr_scheduler_type="constant_with_warmup",
            warmup_ratio=0.0, warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
            adam_epsilon=1e-8, max_grad_norm=1e9, master_weights="float32",
            optimizer_state_dtype="float32", seed=0), total_steps=1000)
        mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
        abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
        cfg = loss_lib.LossConfig(beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO)
        self.fn, state_sh = step_lib.jit_train_step(
            mesh, abstract, batch_layout=layout, graphdef=self.graphdef, tx=tx,
            schedule=schedule, cfg=cfg, accumulation_steps=1, logits_chunk_size=chunk)
        self.state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=state_sh)(params)
        self.shardings = batch_shardings(mesh, layout)
        self.layout, self.row_length = layout, 0
        if layout == "padded":
            it = pair_batches(pairs, batch_size=pairs_per_step, seed=0, pad_id=0, max_length=512)
        else:
            items = packed.item_lengths(pairs, layout)
            # Rows of the length that holds pairs_per_step pairs on average (at ~96% filled).
            self.row_length = max(int(items.max()), 128 * -(-int(
                pairs_per_step * items.mean() / (rows_per_step * 0.96)) // 128))
            it = packed.row_batches(pairs, layout=layout, rows_per_process=rows_per_step,
                                    seed=0, pad_id=0, row_length=self.row_length,
                                    max_pairs_per_row=32, score_group_rows=rows_per_step)
        self.batches = [next(it) for _ in range(steps)]
        self.next = 0

    def _put(self, batch):
        return jax.device_put(batch, self.shardings)

    def warm_up(self):
        """Compiles (and runs once) every batch shape the timed steps will see."""
        seen = set()
        for batch in self.batches:
            shape = tuple(v.shape for v in jax.tree.leaves(batch))
            if shape not in seen:
                seen.add(shape)
                self.state, metrics = self.fn(self.state, self._put(batch))
                jax.block_until_ready(metrics)

    def step(self) -> tuple[float, int, int]:
        """(seconds, pair tokens, real tokens computed) of one timed step."""
        batch = self.batches[self.next % len(self.batches)]
        self.next += 1
        device_batch = self._put(batch)
        jax.block_until_ready(device_batch)
        start = time.perf_counter()
        self.state, metrics = self.fn(self.state, device_batch)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
        if self.layout == "padded":
            return seconds, int(batch.lengths.sum()), int(batch.lengths.sum())
        return seconds, packed_rows.pair_tokens(batch), int((batch.segment_ids > 0).sum())

    def pairs_per_step(self) -> float:
        return float(np.mean([b.pair_mask.sum() for b in self.batches]))

    def fill(self) -> float:
        """Real tokens / computed slots of the timed batches."""
        if self.layout == "padded":
            return float(np.mean([b.lengths.sum() / b.input_ids.size for b in self.batches]))
        return float(np.mean([packed_rows.packing_efficiency(b) for b in self.batches]))


def timed_rounds(trl_side, ours: dict, steps: int):
    """Per side, each timed step's (seconds, pair tokens, real tokens); the matmul peaks."""
    times = {name: [] for name in ["trl", *ours]}
    tokens = {name: [] for name in times}
    real = {name: [] for name in times}
    # The matmul rate is measured between the rounds too, and the largest taken: one measurement
    # right after a torch step read anywhere from 98 to 207 GFLOP/s on this machine.
    peaks = [flops.measured_matmul_flops(2048)]
    for _ in range(steps):  # interleaved: TRL, then each of our layouts
        for name in times:
            s, n, r = (trl_side if name == "trl" else ours[name]).step()
            times[name].append(s)
            tokens[name].append(n)
            real[name].append(r)
        peaks.append(flops.measured_matmul_flops(2048))
    return times, tokens, real, peaks


def compare(label: str, model: dict, work: str, tok, rows: dict, layouts, pairs_per_step: int,
            rows_per_step: int, steps: int, chunk: int) -> dict:
    """Times TRL and our layouts on one model, prints the table; pair tokens/s by side."""
    path = os.path.join(work, label)
    tok.save_pretrained(path)
    make_model(path, tok, model)
    trl_side = TRLSide(path, tok, rows, pairs_per_step, os.path.join(work, f"trl-{label}"))
    pairs = pairs_from_trl(trl_side.trainer.train_dataset)
    ours = {layout: OurSide(path, pairs, layout, pairs_per_step, rows_per_step, chunk, steps)
            for layout in layouts}
    arch, _ = models.arch_from_hf_config(model | {"model_type": "llama"})
    head = arch.vocab_size * arch.hidden_size
    print(f"\nallocator: " + " ".join(f"{k}={os.environ.get(k)}" for k in MALLOC))
    print(f"== {label} model: llama {arch.num_layers} layers x {arch.hidden_size} wide, "
          f"vocabulary {arch.vocab_size}: {flops.non_embedding_params(arch) / 1e6:.1f}M matmul "
          f"parameters (LM head {head / flops.non_embedding_params(arch):.1%}) + "
          f"{head / 1e6:.1f}M embedding, float32; {pairs.num_pairs} pairs, {pairs_per_step} per "
          f"step; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)

    t0 = time.perf_counter()
    for side in ours.values():
        side.warm_up()
    trl_side.step()  # warm-up
    print(f"compile + warm-up: {time.perf_counter() - t0:.0f} s", flush=True)

    times, tokens, real, peaks = timed_rounds(trl_side, ours, steps)
    for name in times:
        print(f"{name} step seconds: " + ", ".join(f"{t:.2f}" for t in times[name]))
    peak = max(peaks)
    seq_len = int(np.mean([len(p) + len(c) for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)]))
    per_token = flops.model_flops_per_token(arch, seq_len=seq_len)
    print(f"peak (2048x2048 float32 matmul, the largest of {len(peaks)} measured between the "
          f"rounds; smallest {min(peaks) / 1e9:.1f}): {peak / 1e9:.1f} GFLOP/s; model FLOPs per "
          f"token {per_token / 1e6:.1f}M (seq_len {seq_len})")
    print(f"{'side':<22}{'pairs/step':>11}{'fill':>7}{'median s':>10}{'pair tok/s':>12}"
          f"{'real tok/s':>12}{'pairs/s':>9}{'MFU':>8}")
    rate = {}
    for name in times:
        # Medians over the timed steps of each step's rates.
        tok_s = statistics.median(n / t for n, t in zip(tokens[name], times[name]))
        real_s = statistics.median(n / t for n, t in zip(real[name], times[name]))
        pps = (pairs_per_step if name == "trl" else ours[name].pairs_per_step())
        rate[name] = tok_s
        fill = "-" if name == "trl" else f"{ours[name].fill():.0%}"
        side = name if name in ("trl", "padded") else f"{name} (T={ours[name].row_length})"
        print(f"{side:<22}{pps:>11.1f}{fill:>7}{statistics.median(times[name]):>10.3f}"
              f"{tok_s:>12.0f}{real_s:>12.0f}{pps / statistics.median(times[name]):>9.2f}"
              f"{per_token * real_s / peak:>8.1%}")
    for name in ours:
        print(f"{label} {name}: throughput ratio vs TRL: {rate[name] / rate['trl']:.2f}x")
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=LAYOUTS, nargs="+", default=list(LAYOUTS))
    parser.add_argument("--pairs-per-step", type=int, default=16)
    parser.add_argument("--rows-per-step", type=int, default=8, help="packed layouts")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--logits-chunk-size", type=int, default=0)
    parser.add_argument("--representative-layout", choices=LAYOUTS, nargs="+",
                        default=["shared_prompt"])
    parser.add_argument("--representative-pairs-per-step", type=int, default=8)
    parser.add_argument("--representative-rows-per-step", type=int, default=4)
    parser.add_argument("--representative-steps", type=int, default=2,
                        help="timed steps per side on the representative model; 0 skips it")
    parser.add_argument("--dry-run", action="store_true",
                        help="2-layer 64-wide models, 4 pairs, one timed step: seconds")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    models_, num_pairs = (REPRESENTATIVE, MODEL), max(args.pairs_per_step * (args.steps + 4) * 2, 384)
    if args.dry_run:  # enough pairs to pack tightly otherwise
        models_ = tuple(m | DRY_RUN for m in models_)
        args.pairs_per_step = args.representative_pairs_per_step = 4
        args.rows_per_step = args.representative_rows_per_step = 2
        args.steps = args.representative_steps = 1
        num_pairs = 16
    print(peak_check.dot_report(64 if args.dry_run else 2048, repeats=1 if args.dry_run else 5),
          flush=True)

    work = tempfile.mkdtemp(prefix="simpo_bench_")
    tok = make_tokenizer(os.path.join(work, "tokenizer"))
    rows = make_rows(num_pairs)
    representative = None
    if args.representative_steps:
        rate = compare("representative", models_[0], work, tok, rows, args.representative_layout,
                       args.representative_pairs_per_step, args.representative_rows_per_step,
                       args.representative_steps, args.logits_chunk_size)
        representative = max((name for name in rate if name != "trl"), key=rate.get), rate
    rate = compare("head-heavy", models_[1], work, tok, rows, args.layout, args.pairs_per_step,
                   args.rows_per_step, args.steps, args.logits_chunk_size)
    best = max((name for name in rate if name != "trl"), key=rate.get)
    print(f"best layout: {best} (head-heavy)")
    if representative:  # the second-to-last line; the last stays the head-heavy ratio
        name, r = representative
        print(f"representative {name}: throughput ratio vs TRL: {r[name] / r['trl']:.2f}x")
    print(f"throughput ratio vs TRL: {rate[best] / rate['trl']:.2f}x")


if __name__ == "__main__":
    main()
