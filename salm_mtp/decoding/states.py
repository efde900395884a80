"""Keep a per-row prefix of a multi-token cached forward in a Nemotron-H cache (docs/design.md §7, §9).

A speculative step feeds n tokens to every row at once and keeps only the first ``keep[b]`` of them in
row b. transformers' ``DynamicCache`` holds three kinds of layer, treated three ways:

- attention (``DynamicLayer``, keys/values (b, heads, S, d)): cut back to ``S_before + max_b keep[b]``
  columns (:func:`crop_attention`). The columns a row did not keep stay in the cache as holes that the
  caller's 2-D attention mask hides: Nemotron-H attention has no positional encoding, so a hole changes
  nothing but the number of columns.
- Mamba (``LinearAttentionLayer``: ``conv_states`` (b, C, K), the last K conv inputs; ``recurrent_states``
  (b, heads, head_dim, N), the SSM state): the SSM state cannot be run backwards, and transformers'
  multi-token path (the chunked scan) returns only the final one. While a :class:`MambaRecorder` is installed, each
  Mamba mixer instead runs the n tokens with the single-token recurrence that greedy decoding uses, leaves
  the cache untouched and records the conv window and SSM state after every position (vLLM keeps a state
  per draft position the same way; SGLang copies the accepted step back). :func:`commit` then copies
  row b's state after position ``keep[b] - 1`` into the cache: no snapshot, no re-advance.
- MoE / MLP (``DummyLayer``): no state.

    recorder = MambaRecorder(llm.model)
    with recorder.installed():                     # a prefill into an empty cache runs as usual
        ...
        out = llm.model(input_ids=chunk, past_key_values=cache, attention_mask=mask, use_cache=True)
        commit(cache, recorder.take(), keep)       # keep: (b,) long in 1..n
        crop_attention(cache, n - int(keep.max()))

Memory of a record: per Mamba layer and row, n x (C x K + heads x head_dim x N) floats (n = drafts + 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.models.nemotron_h import modeling_nemotron_h as nh

from salm_mtp.generate import mamba_mixers


@dataclass
class MambaRecord:
    """States of one Mamba layer after each of the n positions of a recorded forward."""

    conv: torch.Tensor
    """(b, n, C, K) the conv input window (what ``conv_states`` holds) after each position."""
    ssm: torch.Tensor
    """(b, n, heads, head_dim, N) the SSM state after each position."""


def _recording_forward(mixer, recorder: MambaRecorder, hidden_states: torch.Tensor, cache_params=None,
                       attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``NemotronHMamba2Mixer.forward`` while a recorder is installed: a call that continues a cached state
    runs its n tokens with the single-token recurrence of the torch path (5.23), token by token,
    records every position's states in ``recorder.record`` and changes no cache; any other call (a prefill
    into an empty cache) is the mixer's own forward."""
    idx = mixer.layer_idx
    conv_state = cache_params.get_conv_state(idx) if cache_params is not None else None
    ssm_state = cache_params.get_recurrent_state(idx) if cache_params is not None else None
    if conv_state is None or ssm_state is None:
        return type(mixer).forward(mixer, hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                   **kwargs)
    b, n, _ = hidden_states.shape
    dtype = hidden_states.dtype
    hidden_states = nh.apply_mask_to_padding_states(hidden_states, attention_mask)
    gate, xbc, dt = mixer.in_proj(hidden_states).split(
        [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)

    # Conv: the cached last K inputs, then the n new ones; output j sees window[j+1 : j+1+K].
    K = conv_state.shape[-1]
    window = torch.cat([conv_state, xbc.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # (b, C, K + n)
    windows = window.unfold(-1, K, 1)[:, :, 1:]  # (b, C, n, K): the conv state after each position
    w = mixer.conv1d.weight[:, 0]  # (C, K)
    # the single-token update's sum(state * weight) per position (cheaper than a grouped F.conv1d on CPU at these
    # sizes)
    conv = (windows.to(w.dtype) * w[None, :, None, :]).sum(-1)  # (b, C, n)
    if mixer.conv1d.bias is not None:
        conv = conv + mixer.conv1d.bias[None, :, None]
    xbc = nh.apply_mask_to_padding_states(mixer.act(conv).to(dtype).transpose(1, 2), attention_mask)  # (b, n, C)
    x, B, C = torch.split(xbc, [mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size,
                                mixer.n_groups * mixer.ssm_state_size], dim=-1)

    # SSM: the math of the mixer's single-token update (mamba2_selective_state_update), its discretisation
    # done for the n positions at once; only the recurrence itself steps through them.
    H, P, N, G = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
    A = -torch.exp(mixer.A_log.float())  # (H,)
    dt = F.softplus(dt + mixer.dt_bias.to(dt.dtype))[..., None, None]  # (b, n, H, 1, 1)
    dA = torch.exp(dt.float() * A[:, None, None])  # (b, n, H, 1, 1): a decay per head, as the kernel's
    x = x.reshape(b, n, H, P)
    B = B.reshape(b, n, G, 1, N).repeat_interleave(H // G, dim=2)  # (b, n, H, 1, N)
    C = C.reshape(b, n, G, N).repeat_interleave(H // G, dim=2)  # (b, n, H, N)
    dBx = (dt * B) * x[..., None]  # (b, n, H, P, N)
    state, states = ssm_state, []
    for j in range(n):
        state = state * dA[:, j] + dBx[:, j].to(state.dtype)  # (b, H, P, N)
        states.append(state)
    ssm = torch.stack(states, 1)  # (b, n, H, P, N)
    y = torch.einsum("bnhpk,bnhk->bnhp", ssm.to(C.dtype), C) + x * mixer.D[:, None]
    recorder.record[idx] = MambaRecord(conv=windows.transpose(1, 2), ssm=ssm)
    y = y.to(dtype).reshape(b, n, -1)  # (b, n, heads * head_dim)
    return mixer.out_proj(mixer.norm(y, gate).to(dtype))


class MambaRecorder:
    """While installed (``with recorder.installed():``), the Mamba mixers of the given modules record the
    per-position states of every forward that continues a cached state into ``recorder.record``
    ({layer_idx: MambaRecord}) instead of advancing the cache; ``recorder.take()`` returns and clears them.

    Installed once per decode, not per forward: swapping a module attribute per mixer and forward adds up on CPU.
    """

    def __init__(self, *modules: torch.nn.Module):
        self.mixers = list({id(m): m for mod in modules for m in mamba_mixers(mod)}.values())
        self.record: dict[int, MambaRecord] = {}

    @contextmanager
    def installed(self) -> Iterator[MambaRecorder]:
        for m in self.mixers:
            m.forward = partial(_recording_forward, m, self)  # instance attribute shadows the class's forward
        try:
            yield self
        finally:
            for m in self.mixers:
                del m.forward
            self.record = {}

    def take(self) -> dict[int, MambaRecord]:
        record, self.record = self.record, {}
        return record


def commit(cache, record: dict[int, MambaRecord], keep: torch.Tensor) -> None:
    """Set each recorded Mamba layer of ``cache`` to row b's state after its first ``keep[b]`` positions
    (``keep``: (b,) long, 1..n)."""
    if not record:
        return
    rows = torch.arange(keep.numel(), device=keep.device)
    last = keep - 1
    for idx, r in record.items():
        layer = cache.layers[idx]
        layer.conv_states[0].copy_(r.conv[rows, last])
        layer.recurrent_states[0].copy_(r.ssm[rows, last])


def crop_attention(cache, remove: int) -> None:
    """Drop the last ``remove`` columns of every attention layer of ``cache`` (Mamba layers: see commit)."""
    if remove <= 0:
        return
    for layer in cache.layers:
        if isinstance(layer, DynamicLayer) and not isinstance(layer, LinearAttentionCacheLayerMixin) \
                and layer.is_initialized:
            layer.crop(-remove)
