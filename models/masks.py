"""Attention masks of the packed teacher-forcing sequence (spec 2.3), from per-token metadata.

One rule function decides whether query token q may attend key token k. The dense boolean mask
(SDPA, CPU) and the FlexAttention BlockMask (CUDA) are both built by calling that same function,
so the two kernels cannot disagree about the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Token roles. A noisy token is denoised and supervised; a clean token is the teacher-forced
# history the KV cache holds at inference. NOISY_FDM is the optional forward-dynamics copy of a
# noisy video chunk that may also see the clean actions of its own chunk (paper Eq. 13).
CLEAN, NOISY, NOISY_FDM = 0, 1, 2
PADDING = -1  # sample id of padding tokens


@dataclass
class TokenLayout:
    """Per-token metadata of one joint sequence (video tokens first, then action tokens).

    All tensors are [B, L] on the device of the model. chunk_id is the reference's `fid`:
    2 * (frame // K) for video tokens and 2 * (frame // K) + 1 for action tokens, so video chunk c
    precedes action chunk c, which precedes video chunk c + 1.
    """

    sample_id: torch.Tensor  # long, PADDING for padding tokens
    chunk_id: torch.Tensor  # long
    role: torch.Tensor  # long: CLEAN, NOISY or NOISY_FDM
    window: int  # attention window W in chunk-id units (a 0-d tensor in the flex mask_mod)

    @property
    def batch_size(self) -> int:
        return self.sample_id.shape[0]

    @property
    def length(self) -> int:
        return self.sample_id.shape[1]


def self_attention_rule(layout: TokenLayout, b, q_idx, kv_idx) -> torch.Tensor:
    """True where query q_idx may attend key kv_idx in batch row b (indices broadcast).

    Rules of spec 2.3: same sample, both real, |fid_q - fid_k| <= W, and one of
    clean -> clean with fid_k <= fid_q; noisy -> clean with fid_k < fid_q; noisy -> noisy of the
    same role with fid_k == fid_q. Clean never sees noisy. The forward-dynamics copy additionally
    sees the clean actions of its own chunk (fid_k == fid_q + 1). Padding queries see only
    themselves, so no softmax row is empty; no real token ever sees padding.
    """
    sid_q, sid_k = layout.sample_id[b, q_idx], layout.sample_id[b, kv_idx]
    fid_q, fid_k = layout.chunk_id[b, q_idx], layout.chunk_id[b, kv_idx]
    role_q, role_k = layout.role[b, q_idx], layout.role[b, kv_idx]

    same_sample = (sid_q == sid_k) & (sid_q != PADDING)
    in_window = (fid_q - fid_k).abs() <= layout.window
    q_clean, k_clean = role_q == CLEAN, role_k == CLEAN
    clean_to_clean = q_clean & k_clean & (fid_k <= fid_q)
    earlier_or_own_actions = (fid_k < fid_q) | ((role_q == NOISY_FDM) & (fid_k == fid_q + 1))
    noisy_to_clean = ~q_clean & k_clean & earlier_or_own_actions
    noisy_to_noisy = ~q_clean & (role_k == role_q) & (fid_k == fid_q)
    real = same_sample & in_window & (clean_to_clean | noisy_to_clean | noisy_to_noisy)
    padding_self = (sid_q == PADDING) & (q_idx == kv_idx)
    return real | padding_self


def cross_attention_rule(token_sample: torch.Tensor, text_sample: torch.Tensor, b, q_idx, kv_idx) -> torch.Tensor:
    """Each token sees only its own sample's text tokens; padding tokens see all text (discarded)."""
    sid_q = token_sample[b, q_idx]
    return (sid_q == text_sample[b, kv_idx]) | (sid_q == PADDING)


def _dense(rule, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    b = torch.arange(batch, device=device)[:, None, None]
    q_idx = torch.arange(q_len, device=device)[None, :, None]
    kv_idx = torch.arange(kv_len, device=device)[None, None, :]
    return rule(b, q_idx, kv_idx).unsqueeze(1)  # [B, 1, Lq, Lk], broadcast over heads


def dense_self_attention_mask(layout: TokenLayout) -> torch.Tensor:
    """[B, 1, L, L] boolean mask for SDPA (True = may attend)."""
    rule = lambda b, q, k: self_attention_rule(layout, b, q, k)  # noqa: E731
    return _dense(rule, layout.batch_size, layout.length, layout.length, layout.sample_id.device)


def dense_cross_attention_mask(token_sample: torch.Tensor, text_sample: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, T] boolean mask for SDPA cross-attention."""
    rule = lambda b, q, k: cross_attention_rule(token_sample, text_sample, b, q, k)  # noqa: E731
    return _dense(rule, token_sample.shape[0], token_sample.shape[1], text_sample.shape[1], token_sample.device)


def flex_self_attention_mask(layout: TokenLayout, compile_mask: bool = False):
    """FlexAttention BlockMask for the same rule (block-sparse: skipped blocks cost nothing)."""
    from torch.nn.attention.flex_attention import create_block_mask

    # The window as a tensor: the mask_mod also runs inside the compiled attention kernel, where a
    # Python int that changes every step would be a constant to recompile for.
    layout = replace(layout, window=torch.tensor(layout.window, device=layout.sample_id.device))

    def mask_mod(b, h, q_idx, kv_idx):
        return self_attention_rule(layout, b, q_idx, kv_idx)

    return create_block_mask(
        mask_mod, layout.batch_size, None, layout.length, layout.length,
        device=layout.sample_id.device, _compile=compile_mask,
    )


def flex_cross_attention_mask(token_sample: torch.Tensor, text_sample: torch.Tensor, compile_mask: bool = False):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return cross_attention_rule(token_sample, text_sample, b, q_idx, kv_idx)

    return create_block_mask(
        mask_mod, token_sample.shape[0], None, token_sample.shape[1], text_sample.shape[1],
        device=token_sample.device, _compile=compile_mask,
    )
