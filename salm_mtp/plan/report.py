"""The plan as a table for a terminal (``format_plan``)."""

from __future__ import annotations
from salm_mtp.plan.build import GIB


def gib_text(b: float) -> str:
    return f"{b / GIB:9.2f}"


def count_text(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_plan(plan: dict) -> str:
    """The plan as a readable table (GiB = 2**30 bytes)."""
    r, a, pr = plan["per_rank"], plan["activations"], plan["precision"]
    ac = pr["activation_checkpointing"]
    lu = r["largest_unit"]
    k = plan["assumptions"]["prefetch_units"]
    compute = pr["param_dtype"] or "float32"
    reduce = pr["reduce_dtype"] or compute
    other_ac = a["without_ac_bytes"] if ac else a["with_ac_bytes"]
    budget = plan["gpu_memory_gib"]
    rows = [(f"parameters  {kind.replace('/', ' ')}", b, "") for kind, b in r["params_by_kind"].items()]
    rows += [
        ("gradients   trainable, sharded", r["grads_bytes"], ""),
        ("optimizer   AdamW exp_avg + exp_avg_sq", r["optimizer_bytes"], ""),
        (f"all-gather  root + {k} x largest unit ({compute})", r["gathered_bytes"],
         f"root {gib_text(r['root_gathered_bytes']).strip()}; largest {lu['name']} ({count_text(lu['params'])} params)"),
        ("grad peak   one trainable unit, unsharded", r["grad_buffer_bytes"],
         f"{r['grad_buffer_unit']}: {compute} grads + {reduce} reduce-scatter input"),
        (f"activations AC {'on' if ac else 'off'}", r["activation_bytes"],
         f"AC {'off' if ac else 'on'}: {gib_text(other_ac).strip()}"),
        ("overhead    CUDA context, NCCL, fragmentation", r["overhead_bytes"], ""),
        ("total", r["total_bytes"], f"of {budget:g} GiB: {'fits' if plan['fits'] else 'does NOT fit'}"),
    ]
    parts = " | ".join(f"{name} {count_text(v)}" for name, v in plan["params_by_part"].items())
    lines = [
        f"salm-mtp plan: {' '.join(plan['config']) or '(no config file)'}",
        f"  {plan['world_size']} data-parallel ranks, FSDP2 ({plan['num_fsdp_groups']} groups); rank 0 shown: the "
        "largest shard, every rank's is padded to it",
        f"  parameters {plan['total_params']:,} = trainable {plan['trainable_params']:,} + frozen "
        f"{plan['frozen_params']:,}",
        f"    {parts}",
        f"  model.parallel: param_dtype {pr['param_dtype']}, reduce_dtype {pr['reduce_dtype']}, frozen_dtype "
        f"{pr['frozen_dtype']}, activation_checkpointing {ac}, encoder_activation_checkpointing "
        f"{pr.get('encoder_activation_checkpointing')}; trainer.precision {pr['trainer.precision']}",
        "",
        f"  {'per rank':<46}{'GiB':>9}",
    ]
    lines += [f"  {label:<46}{gib_text(b)}   {detail}".rstrip() for label, b, detail in rows]
    lines += [
        "",
        f"  activations: {a['assumptions']['max_duration_s']:g} s of audio per rank = {a['mel_frames']:,} mel frames "
        f"-> {a['encoder_frames']:,} encoder frames -> {a['audio_positions']:,} audio + {a['text_tokens']:,} text "
        f"({a['assumptions']['text_tokens_per_second']:g}/s) = {a['llm_positions']:,} LLM positions",
        "    " + ", ".join(f"{name} {gib_text(v).strip()}" for name, v in a["parts_bytes"].items()) + " GiB",
    ]
    m = plan["min_world_size"]
    if m is None:
        floor = r["gathered_bytes"] + r["grad_buffer_bytes"] + r["activation_bytes"] + r["overhead_bytes"]
        lines.append(f"  no world size up to {plan['search'][-1]['world_size']} fits {budget:g} GiB: what does not "
                     f"shrink with N (all-gather, grad peak, activations, overhead) is {gib_text(floor).strip()} GiB; lower "
                     "data.max_duration or train fewer parameters")
    else:
        lines.append(f"  smallest world size that fits {budget:g} GiB: {m} "
                     f"({gib_text(plan['min_world_size_per_rank']['total_bytes']).strip()} GiB per rank)")
    layouts = plan.get("hsdp_layouts") or []
    if layouts:
        lines.append(f"  HSDP layouts (shard within a replica, replicate across; {budget:g} GiB per GPU):")
        for lay in layouts:
            where = f"{lay['nodes']} node{'s' if lay['nodes'] > 1 else ''} x {lay['gpus_per_node']} GPUs"
            if lay["shard"] is None:
                lines.append(f"    {lay['gpus']:>5} GPUs ({where}): no shard size fits")
            else:
                lines.append(f"    {lay['gpus']:>5} GPUs ({where}): replicate {lay['replicate']} x shard {lay['shard']}, "
                             f"{gib_text(lay['total_bytes']).strip()} GiB per rank")
    lines += [f"  note: {n}" for n in plan["notes"]]
    return "\n".join(lines)
