"""Memory planner: per-rank bytes of a training config under the real FSDP2 plan, without weights or GPUs.

    salm-mtp plan --config conf/nemotron3_super.yaml --world_size 8 \\
        --model.llm.path=data/configs/nemotron3_super_120b_a12b --model.encoder.path=data/configs/parakeet_ctc_1.1b
    salm-mtp plan --config conf/nemotron3_nano_30b.yaml --world_size 8 --gpu_memory_gib 80 --out plan.json \\
        --model.llm.path=data/configs/nemotron3_nano_30b_a3b --model.encoder.path=data/configs/parakeet_ctc_1.1b
    salm-mtp plan --config conf/demo.yaml --model.tokenizer_path=tests/tokenizer --world_size 2

It parses the config like ``salm-mtp fit`` (``model:`` / ``data:`` sections, ``--model.*`` overrides), builds
the SALMModule on the meta device (config.json files only: seconds and < 1 GB RSS even for Super), applies
``model.freeze`` and ``model.parallel.frozen_dtype``, then the real FSDP2 plan of ``salm_mtp.parallel.shard_module``
over a fake process group of ``world_size`` ranks (no processes, no memory). It prints rank 0's view, which is
every rank's: FSDP2 shards dim 0 in ``ceil(d0 / N)``-row chunks, rank 0 holds the largest, and every rank's
shard is padded to that size.

Memory model per rank (bytes; N = data-parallel ranks; c = compute dtype = model.parallel.param_dtype, else the
storage dtype; r = reduce dtype):
    parameters    sum of local shards in their storage dtype (trainable fp32 masters, frozen frozen_dtype)
    gradients     trainable local elements x 4 (FSDP2 keeps sharded fp32 gradients of fp32 parameters)
    optimizer     trainable local elements x 8 (AdamW exp_avg + exp_avg_sq, fp32)
    all-gathered  root group (embeddings, norm_f, lm_head: gathered for the whole step, FSDP2 never reshards its
                  root) + ``prefetch_units`` (2: the unit running and the next one FSDP2 prefetches) x the largest
                  other group, each unsharded in c
    grad buffers  the largest group with trainable parameters, unsharded, in c (autograd's gradient) + in r (the
                  reduce-scatter input): the peak of one group's backward
    activations   the analytic estimate below, with or without activation checkpointing as configured
    overhead      ``overhead_gib`` (CUDA context, NCCL buffers, allocator fragmentation)
Parameters, gradients and optimizer state shrink with N; the rest does not (``data.max_duration`` is per rank),
so the smallest N that fits exists only when they fit the GPU on their own.

Activation model (bytes saved for backward; b = compute dtype size, fp32 parts at 4 bytes; an upper bound:
autograd skips some inputs of frozen linears). Checked per block type on CPU against saved-tensor hooks (attention,
MLP, MoE with and without latent within 2 %; Mamba2 from mamba_ssm's fused kernel, which saves its in_proj output
and scan output; the encoder with the GPU's memory-efficient SDPA instead of the CPU's math path).
Audio per rank: D = data.max_duration seconds; F = D / hop mel frames (hop = 10 ms); Fe = F / s encoder frames
(s = encoder subsampling_factor); A = Fe / k LLM audio positions (k = adapter.stack_frames); text tokens
Tt = D x ``text_tokens_per_second`` (transcript and prompt); T = A + Tt LLM positions.
    encoder       subsampling: F x C x M x (1/4 + 2/16 + 2/64 + 1/64 for s = 8) x b (conv stack outputs, C
                  channels, M mel bins); per conformer layer and frame 44 He x b (feed-forwards 12 each: norm in/out,
                  up 4, dropout mask and output; attention 11: norm in/out, relative keys 4, q+v, q+u/k/v/out;
                  conv module 8; final norm 1; He = encoder width) + 2 x heads x Tc x b for the relative-position
                  score bias (Tc = ``cut_seconds`` / (hop x s) frames per cut: the quadratic term); with
                  model.parallel.encoder_activation_checkpointing each layer keeps its input (Fe x He x b) and one
                  layer's tensors exist at a time (the one recomputed in backward)
    adapter       A x (k He + 2 Ha + H) x b
    LLM io        T x 4 H x b (merged and text embeddings, norm_f in and out)
    per block     norm 8 H + b H (RMSNorm works in fp32), plus per token:
                  *  attention  b (2 heads hd + 2 kv_heads hd) + 4 heads (q, output, k, v; fp32 logsumexp; SDPA
                                keeps no T x T matrix)
                  M  Mamba2     b (d_in_proj + d_inner) (the fused kernel's in_proj output and scan output)
                  E  MoE        4 (H + n_experts) (fp32 router input and logits) + top_k x (b (2 Lx + 2 I) + 4 Lx)
                                (dispatched input, up, relu2, expert output; fp32 weighted output; Lx =
                                moe_latent_size or H) + 2 b I_shared (+ 2 b L with a latent)
                  -  MLP        2 b I
    without AC    every block's internals are saved
    with AC       each backbone block keeps its input (T x H x b) and one block's internals exist at a time (the
                  one recomputed in backward): the sum of inputs + the largest block
    MTP head      per depth 8 H b (enorm, hnorm, concat, final norm) + its blocks' internals (never checkpointed)
    loss          per head (main + D depths) the gathered target rows Tt x H x b and their gradient (computed
                  in the forward, salm_mtp/linear_ce.py), one lm_head chunk min(lm_head_chunk_size, Tt) x V x
                  (b + 4) (logits, fp32 copy turned into the softmax gradient in place), and the lm_head's
                  fp32 gradient buffer V x H x 4 when the lm_head trains
    CTC head      Fe x classes x (b + 4 + 4), when model.ctc_weight > 0

Modules: build (parser, meta model), shards (FSDP2 plan, bytes per rank), activations (the estimate),
planner (``make_plan``), report (the table), cli (``salm-mtp plan``).
"""
