"""The planner's printed rows, Markdown table (GiB per device) and what to try next."""

from __future__ import annotations

from simpo_jax.plan_targets import GIB, TARGETS


def _gib(b) -> str:
    return f"{b / GIB:.2f}"


def memory_label(r: dict) -> str:
    """Master weights / moments (+ offload) of a result, short."""
    st = r["setting"]
    label = {"float32": "f32", "bfloat16_kahan": "bf16 kahan",
             "bfloat16_stochastic": "bf16 SR"}[st["master_weights"]]
    label += " / " + {"float32": "f32", "bfloat16": "bf16"}[st["optimizer_state_dtype"]]
    return label + (" / host" if st["offload_optimizer_state"] else "")


def _mesh_text(r: dict, sep: str) -> str:
    return sep.join(f"{k} {v}" for k, v in r["mesh"].items() if v != 1) or "single"


def format_row(target: str, r: dict) -> str:
    head = (f"{target} {r['batch_layout']} remat={r['remat_policy']} mesh={_mesh_text(r, 'x')} "
            f"logits_chunk={r['logits_chunk_size']} memory={memory_label(r)} "
            f"batch={r['setting']['per_device_train_batch_size']}x"
            f"{r['setting']['gradient_accumulation_steps']}")
    if "error" in r:
        return f"{head}: failed to compile ({r['error'][:200]})"
    host = f" (+ {_gib(r['host_bytes'])} host)" if r.get("host_bytes") else ""
    frozen = f" + frozen base {_gib(r['frozen_bytes'])}" if r.get("frozen_bytes") else ""
    return (f"{head}: params {_gib(r['params_bytes'])}{frozen} + opt "
            f"{_gib(r['opt_state_bytes'])}{host} "
            f"+ temp {_gib(r['temp_bytes'])} -> {_gib(r['needed_bytes'])} of "
            f"{_gib(r['capacity_bytes'])} GiB/device ({r['kind']}), "
            f"{r['model_flops_per_step'] / 1e12:.0f} model TFLOP/step, "
            f"compile {r['compile_seconds']}s, fits={'yes' if r['fits'] else 'no'}")


def format_table(out: dict) -> str:
    """A Markdown table of every configuration tried (GiB per device)."""
    lines = [f"Plan for {out['model']} on {out['target']} ({out['topology']}), "
             f"{_gib(out['capacity_bytes'])} GiB per device",
             "| layout | remat | mesh | logits chunk | memory (master / moments) | batch x accum "
             "| params | opt state | host | temp | total | kind | model TFLOP/step | compile s "
             "| fits |", "|" + "---|" * 15]
    for r in out["tried"]:
        head = (f"| {r['batch_layout']} | {r['remat_policy']} | {_mesh_text(r, ' x ')} "
                f"| {r['logits_chunk_size']} | {memory_label(r)} "
                f"| {r['setting']['per_device_train_batch_size']} x "
                f"{r['setting']['gradient_accumulation_steps']} ")
        if "error" in r:
            lines.append(head + f"| compile failed: {r['error'][:80]} |||||||| no |")
            continue
        lines.append(
            head + f"| {_gib(r['params_bytes'])} | {_gib(r['opt_state_bytes'])} "
            f"| {_gib(r.get('host_bytes', 0))} | {_gib(r['temp_bytes'])} "
            f"| {_gib(r['needed_bytes'])} | {r['kind']} | {r['model_flops_per_step'] / 1e12:.0f} "
            f"| {r['compile_seconds']} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def next_steps(config, out: dict) -> list[str]:
    """What to try when no configuration tried fits, cheapest first."""
    if not any("needed_bytes" in r for r in out["tried"]):
        return ["no configuration compiled: the compiler's errors are above (and in plan.json); "
                "memory settings cannot help until one compiles."]
    steps = []
    if not config.plan_search:
        steps.append("--config.plan_search=True: also tries, one after another, full remat, "
                     "logits chunks of 256, bfloat16 moments, bfloat16 masters (kahan, then "
                     "stochastic), the optimizer state in host memory, smaller micro-batches with "
                     "more accumulation and a tensor axis of 2 (the effective batch kept), "
                     "stopping at the first that fits and printing its overrides.")
    if not config.gradient_checkpointing:
        steps.append("--config.gradient_checkpointing=True (remat_policy full): keeps one "
                     "activation per layer instead of every intermediate.")
    if not config.logits_chunk_size:
        steps.append("--config.logits_chunk_size=256: the LM head and log-softmax in chunks, never "
                     "the full [tokens, vocab] float32 logits.")
    if config.per_device_train_batch_size > 1 and not config.plan_search:
        smaller = config.per_device_train_batch_size // 2
        steps.append(
            f"--config.per_device_train_batch_size={smaller} "
            f"--config.gradient_accumulation_steps={config.gradient_accumulation_steps * 2}: "
            "half the activations per micro-batch, the same effective batch.")
    current = TARGETS[out["target"]]
    bigger = sorted((t.chip_gib * t.num_chips, name) for name, t in TARGETS.items()
                    if t.chip_gib * t.num_chips > current.chip_gib * current.num_chips)
    if bigger:
        listed = ", ".join(f"{name} ({TARGETS[name].num_chips} x {TARGETS[name].chip_gib:g} GiB)"
                           for _, name in bigger[:3])
        steps.append(f"a bigger target (--config.plan_target=...): {listed}; this one has "
                     f"{current.num_chips} x {current.chip_gib:g} GiB.")
    needed = [r["needed_bytes"] for r in out["tried"] if "needed_bytes" in r]
    if needed:
        steps.append(f"the smallest configuration tried needs {_gib(min(needed))} GiB per device "
                     f"of {_gib(out['capacity_bytes'])}. Float32 masters with AdamW are 12 bytes "
                     "per parameter before gradients; the search also tries "
                     "bfloat16 moments, bfloat16 masters (kahan, stochastic) and the optimizer "
                     "state in host memory (docs/memory_plans.md).")
    return steps
