"""The planner's printed rows and Markdown table (GiB per device)."""

from __future__ import annotations

GIB = 2**30


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
