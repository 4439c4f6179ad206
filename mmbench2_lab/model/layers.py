"""Building blocks shared by the tokenizer and the dynamics, in reading order.

RMSNorm -> gated MLP -> RoPE -> attention (QK-norm + learned temperature, optional KV cache) -> space and
time attention -> block-causal layer -> transformer stack; then the tensor plumbing (patchify, latent
packing). Module names match the reference checkpoints (``norm1``, ``space.attn.qkv``, ``mlp.fc_in`` ...),
so official state dicts load with strict key matching.

Shape letters: B batch, T time (frames), S tokens per frame, D width, H heads, hd head width,
L sequence length inside one attention call, N independent sequences inside one attention call.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (N, H, T_cached, hd), after RoPE and L2 norm


class RMSNorm(nn.Module):
    """x * scale / sqrt(mean(x^2) + eps): no mean subtraction, no bias."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(dim=-1, keepdim=True)
        return x * (self.scale / torch.sqrt(var + self.eps))


class MLP(nn.Module):
    """Gated SiLU MLP: fc_in -> (u, v) halves -> u * silu(v) -> fc_out; hidden = int(d * ratio * 2/3)."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(d_model * mlp_ratio * 2 / 3)
        self.fc_in = nn.Linear(d_model, 2 * hidden)
        self.fc_out = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.fc_in(x).chunk(2, dim=-1)  # the second half is the gate
        return self.drop(self.fc_out(self.drop(u * F.silu(v))))


# -- rotary position embedding ------------------------------------------------------------------
class Rotary(nn.Module):
    """cos/sin tables for the reference's RoPE, built in fp32 and cached per device.

    Angles use the half-split layout: ``emb = concat(pos * inv_freq, pos * inv_freq)`` with
    ``inv_freq[j] = 10000^(-2j/hd)``, so element k rotates by ``pos * inv_freq[k mod hd/2]``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head width, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self._cos: Optional[torch.Tensor] = None
        self._sin: Optional[torch.Tensor] = None

    def cos_sin(self, length: int, offset: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for positions offset .. offset+length-1, each (length, hd), cast to ``dtype``."""
        needed = offset + length
        if self._cos is None or self._cos.shape[0] < needed or self._cos.device != torch.device(device):
            n = max(needed, 32)
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32,
                                                         device=device) / self.head_dim))
            pos = torch.arange(n, dtype=torch.float32, device=device)
            freqs = pos[:, None] * inv_freq[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return (self._cos[offset:needed].to(dtype), self._sin[offset:needed].to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with the reference's quirk: half-split angles, interleaved partners.

    ``rot(x)[2i] = -x[2i+1]`` and ``rot(x)[2i+1] = x[2i]``; out = x*cos + rot(x)*sin. Not a true rotation
    (angle and partner layouts disagree), but the released checkpoints were trained with it.
    x: (N, H, L, hd); cos, sin: (L, hd).
    """
    rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + rot * sin


# -- attention ----------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with RoPE, QK L2-norm and a learned per-head temperature.

    Logits are ``g * cos(q, k)`` with ``g = clamp(exp(log_qk_scale), 0, 100)`` (init sqrt(hd)). With a KV
    cache the new positions continue the cached ones (RoPE offset = cached length) and attend to all
    cached keys; ``return_kv_cache`` hands back the (k, v) after RoPE and normalisation.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.log_qk_scale = nn.Parameter(torch.full((n_heads,), math.log(math.sqrt(self.head_dim))))
        self.rope = Rotary(self.head_dim)

    def forward(self, x: torch.Tensor, *, mask: Optional[torch.Tensor] = None, causal: bool = False,
                kv_cache: Optional[KVCache] = None, return_kv_cache: bool = False):
        """x: (N, L, D); mask: bool (L, L), True = may attend. Returns (N, L, D) [, (k, v) cache]."""
        N, L, D = x.shape
        q, k, v = (t.view(N, L, self.n_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        past = 0 if kv_cache is None else kv_cache[0].shape[2]
        cos, sin = self.rope.cos_sin(L, past, x.device, q.dtype)
        q = F.normalize(apply_rope(q, cos, sin), p=2, dim=-1, eps=1e-6)
        k = F.normalize(apply_rope(k, cos, sin), p=2, dim=-1, eps=1e-6)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
            if causal and L > 1:  # new position i sees every cached key and new keys <= i
                mask = torch.arange(past + L, device=x.device)[None, :] <= past + torch.arange(
                    L, device=x.device)[:, None]
            causal = False
        # SDPA divides by sqrt(hd); fold g * sqrt(hd) into q so the logits are g * cos(q, k).
        g = self.log_qk_scale.exp().to(q.dtype).clamp(0.0, 100.0)
        q = q * (g.view(1, -1, 1, 1) * math.sqrt(self.head_dim))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(N, L, D))
        return (y, (k, v)) if return_kv_cache else y


class SpaceAttention(nn.Module):
    """Attention among the S tokens of each frame, restricted by a fixed (S, S) allow-matrix.

    RoPE positions are the token indices 0..S-1 within the frame.
    """

    def __init__(self, d_model: int, n_heads: int, allow: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("allow", allow.to(torch.bool), persistent=False)  # (S, S) True = may attend
        self.attn = Attention(d_model, n_heads, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, S, D) -> (B, T, S, D)."""
        B, T, S, D = x.shape
        if S != self.allow.shape[0]:
            raise ValueError(f"space attention built for {self.allow.shape[0]} tokens per frame, got {S}")
        return self.attn(x.reshape(B * T, S, D), mask=self.allow).reshape(B, T, S, D)


class TimeAttention(nn.Module):
    """Causal attention over T for each token position separately, as (B*S', T, D) sequences.

    ``n_time_tokens`` restricts it to the first S' tokens (the tokenizer's latents); the rest pass
    through unchanged. RoPE positions are the time indices. A KV cache holds (B*S', H, T_cached, hd),
    row b*S' + s.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0,
                 n_time_tokens: Optional[int] = None):
        super().__init__()
        self.n_time_tokens = n_time_tokens
        self.attn = Attention(d_model, n_heads, dropout)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None, return_kv_cache: bool = False):
        """x: (B, T, S, D) -> (B, T, S, D) [, cache]."""
        B, T, S, D = x.shape
        P = S if self.n_time_tokens is None else self.n_time_tokens
        seq = x[:, :, :P].permute(0, 2, 1, 3).reshape(B * P, T, D)
        out = self.attn(seq, causal=True, kv_cache=kv_cache, return_kv_cache=return_kv_cache)
        out, cache = out if return_kv_cache else (out, None)
        out = out.view(B, P, T, D).permute(0, 2, 1, 3)
        if P < S:
            out = torch.cat([out, x[:, :, P:]], dim=2)
        return (out, cache) if return_kv_cache else out


class BlockCausalLayer(nn.Module):
    """Pre-norm residual layer: space attention, optional causal time attention, gated MLP."""

    def __init__(self, d_model: int, n_heads: int, allow: torch.Tensor, *, do_time: bool,
                 n_time_tokens: Optional[int] = None, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.do_time = do_time
        self.norm1 = RMSNorm(d_model)
        self.space = SpaceAttention(d_model, n_heads, allow, dropout)
        if do_time:
            self.norm2 = RMSNorm(d_model)
            self.time = TimeAttention(d_model, n_heads, dropout, n_time_tokens)
        self.norm3 = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv_cache: Optional[KVCache] = None, return_kv_cache: bool = False):
        """x: (B, T, S, D) -> (B, T, S, D) [, this layer's time-attention cache or None]."""
        x = x + self.drop(self.space(self.norm1(x)))
        cache = None
        if self.do_time:
            y = self.time(self.norm2(x), kv_cache=kv_cache, return_kv_cache=return_kv_cache)
            y, cache = y if return_kv_cache else (y, None)
            x = x + self.drop(y)
        x = x + self.mlp(self.norm3(x))
        return (x, cache) if return_kv_cache else x


class BlockCausalTransformer(nn.Module):
    """A stack of block-causal layers; layer i has time attention iff (i + 1) % time_every == 0.

    There is no final norm. The KV cache is a list with one entry per layer, None for layers without
    time attention.
    """

    def __init__(self, d_model: int, n_heads: int, depth: int, allow: torch.Tensor, *, time_every: int,
                 n_time_tokens: Optional[int] = None, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([
            BlockCausalLayer(d_model, n_heads, allow, do_time=(i + 1) % time_every == 0,
                             n_time_tokens=n_time_tokens, mlp_ratio=mlp_ratio, dropout=dropout)
            for i in range(depth)])

    def forward(self, x: torch.Tensor, kv_cache: Optional[list] = None, return_kv_cache: bool = False):
        """x: (B, T, S, D) -> (B, T, S, D) [, list of per-layer caches].

        With ``kv_cache`` the T frames of x follow the cached ones; with both arguments the returned
        caches cover cached + new frames.
        """
        if kv_cache is not None and len(kv_cache) != len(self.layers):
            raise ValueError(f"KV cache has {len(kv_cache)} entries, the transformer has {len(self.layers)} "
                             "layers: pass the cache this model returned")
        caches = []
        for i, layer in enumerate(self.layers):
            past = None if kv_cache is None else kv_cache[i]
            if return_kv_cache:
                x, cache = layer(x, kv_cache=past, return_kv_cache=True)
                caches.append(cache)
            else:
                x = layer(x, kv_cache=past)
        return (x, caches) if return_kv_cache else x


# -- tensor plumbing ----------------------------------------------------------------------------
def patchify(frames: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, Np, C*p*p): patches row-major, each laid out channel-major [c][ky][kx]."""
    if frames.dim() != 5:
        raise ValueError(f"patchify expects frames (B, T, C, H, W), got shape {tuple(frames.shape)}")
    B, T, C, H, W = frames.shape
    if H % patch or W % patch:
        raise ValueError(f"frame size {H}x{W} is not a multiple of patch {patch}")
    cols = F.unfold(frames.reshape(B * T, C, H, W), kernel_size=patch, stride=patch)  # (BT, Dp, Np)
    return cols.transpose(1, 2).reshape(B, T, -1, C * patch * patch)


def unpatchify(patches: torch.Tensor, height: int, width: int, channels: int, patch: int) -> torch.Tensor:
    """(B, T, Np, C*p*p) -> (B, T, C, H, W), the inverse of :func:`patchify`."""
    if patches.dim() != 4 or patches.shape[-1] != channels * patch * patch:
        raise ValueError(f"unpatchify expects (B, T, Np, {channels * patch * patch}), "
                         f"got {tuple(patches.shape)}")
    B, T, Np, Dp = patches.shape
    cols = patches.reshape(B * T, Np, Dp).transpose(1, 2)
    out = F.fold(cols, output_size=(height, width), kernel_size=patch, stride=patch)
    return out.reshape(B, T, channels, height, width)


def pack_latents(z: torch.Tensor, packing_factor: int = 2) -> torch.Tensor:
    """(B, T, n_latents, d_b) -> (B, T, n_latents/pf, d_b*pf): latents (pf*i .. pf*i+pf-1) concatenated
    on channels, giving the dynamics' spatial tokens."""
    B, T, L, D = z.shape
    if L % packing_factor:
        raise ValueError(f"{L} latents cannot be packed in groups of {packing_factor}")
    return z.reshape(B, T, L // packing_factor, D * packing_factor)


def unpack_latents(z: torch.Tensor, packing_factor: int = 2) -> torch.Tensor:
    """(B, T, n_spatial, d_spatial) -> (B, T, n_spatial*pf, d_spatial/pf), the inverse of pack_latents."""
    B, T, S, D = z.shape
    if D % packing_factor:
        raise ValueError(f"spatial width {D} is not divisible by packing factor {packing_factor}")
    return z.reshape(B, T, S * packing_factor, D // packing_factor)
