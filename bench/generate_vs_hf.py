"""Our KV-cached sampler (simpo_jax.onpolicy.sampling) against transformers' `generate`, tokens/s.

    python bench/generate_vs_hf.py                     # CPU, ~2-4 min on 2 cores
    python bench/generate_vs_hf.py --batch 64 --new 256 --hidden 1024 --layers 8   # accelerator
    python bench/generate_vs_hf.py --dry-run           # tiny sizes, ~15 s on CPU: tests run it

Both sides load the same locally made Hugging Face Llama (default ~20M parameters, 32k vocabulary,
float32) and sample with temperature 0.8 and top-p 0.95 from the same left-padded random prompts.
Every row makes exactly --new tokens (EOS is an id the model never draws), so both do the same
work. transformers: model.generate(do_sample=True, static cache off, its default dynamic KV cache),
under torch.inference_mode. Ours: sampling.sample (one jitted while-loop over the KV cache), the
compile excluded by a warm-up call. Runs alternate (ours, transformers, ...) so load from other
processes hits both alike; the median of --repeats runs is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads would spin between runs

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from simpo_jax import models  # noqa: E402
from simpo_jax.models import generate  # noqa: E402
from simpo_jax.onpolicy import sampling  # noqa: E402


DRY_RUN = dict(batch=2, prompt=8, new=4, hidden=64, layers=1, vocab=256, repeats=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="rows sampled at once")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (longest)")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 on both sides")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"the same code path at tiny sizes ({DRY_RUN}); figures meaningless")
    args = parser.parse_args(argv)
    if args.dry_run:
        vars(args).update(DRY_RUN)
    return args


def make_models(args):
    """The same random Hugging Face Llama twice: transformers' and ours (loaded from its folder)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=args.vocab + 7)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hf = transformers.LlamaForCausalLM(config).eval().to(device, dtype=dtype)
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    ours = models.from_pretrained(folder, dtype=jax.numpy.bfloat16 if args.bf16 else
                                  jax.numpy.float32)
    return hf, ours


def make_runners(args, hf, ours):
    """Prompt lengths and one sampling call per side, each checking it made args.new tokens."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.prompt // 2, args.prompt + 1, args.batch)
    prompts = [[1] + list(map(int, rng.integers(3, args.vocab, n - 1))) for n in lengths]
    ids, mask = generate.left_pad(prompts, 0, args.prompt)
    keys = sampling.row_keys(np.full(args.batch, 13), np.arange(args.batch))
    eos = args.vocab + 7  # never drawn: every row makes args.new tokens

    def run_ours():
        out = sampling.sample(ours, prompts, keys, max_new_tokens=args.new, eos_token_id=eos,
                              pad_token_id=0, temperature=0.8, top_p=0.95,
                              prompt_length=args.prompt)
        assert all(len(r) == args.new for r in out)

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long, device=device),
                              attention_mask=torch.tensor(mask, dtype=torch.long, device=device),
                              do_sample=True, temperature=0.8, top_p=0.95, top_k=0,
                              max_new_tokens=args.new, pad_token_id=0,
                              eos_token_id=None)
        assert out.shape[1] == args.prompt + args.new

    return lengths, {"simpo_jax": run_ours, "transformers": run_hf}


def time_runs(runners, repeats):
    """Our compile + first run in seconds, and each side's run times, interleaved after warm-up."""
    start = time.perf_counter()
    runners["simpo_jax"]()
    compile_s = time.perf_counter() - start
    runners["transformers"]()  # warm-up
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return compile_s, times


def report(args, params, lengths, compile_s, times):
    tokens = args.batch * args.new
    print(f"device: {jax.devices()[0].platform} (jax) / {device} (torch); threads: torch "
          f"{torch.get_num_threads()}; model: llama {params / 1e6:.1f}M parameters, hidden "
          f"{args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{'bfloat16' if args.bf16 else 'float32'}")
    print(f"batch {args.batch} rows x {args.new} new tokens, prompts {lengths.min()}-"
          f"{lengths.max()} tokens (padded to {args.prompt}); temperature 0.8, top-p 0.95; "
          f"median of {args.repeats}; our first call (compile + run) {compile_s:.1f}s")
    rates = {}
    for name, t in times.items():
        rates[name] = tokens / statistics.median(t)
        print(f"{name:>13}: {statistics.median(t):7.2f}s  {rates[name]:9.1f} new tokens/s  "
              f"(runs: {', '.join(f'{x:.2f}' for x in t)})")
    print(f"ratio simpo_jax / transformers: {rates['simpo_jax'] / rates['transformers']:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print("dry run: sizes shrunk, figures meaningless", flush=True)
    hf, ours = make_models(args)
    params = sum(p.numel() for p in hf.parameters())
    lengths, runners = make_runners(args, hf, ours)
    compile_s, times = time_runs(runners, args.repeats)
    report(args, params, lengths, compile_s, times)


device = "cuda" if torch.cuda.is_available() else "cpu"

if __name__ == "__main__":
    main()
