"""Triton field_attention: softmax(q k^T / sqrt(dh)) v over the F feature fields of a sample.

    q, k, v, out      [B, H, F, dh]
    key_padding_mask  [B, F] bool, True = padded key (optional)
    lse               [B, H, F] row log-sum-exp of the scaled scores, fp32 (fp64 for fp64 inputs)

A program takes BLOCK_B samples of one head (batch tiles on grid axis 0, which has room for
B in the millions; heads on axis 1) and keeps each sample's whole [F, F] score tile in
registers. F is padded to F_PAD = max(16, next_pow2(F)) and dh to DH_PAD = max(16,
next_pow2(dh)) so every tl.dot has M, N, K >= 16; the padding is masked. Forward saves the
row log-sum-exp (max + log of sum) of the scores; backward recomputes the scores and the
probabilities P = exp(q k^T * scale - lse) from it, with no max or sum. One program owns every
gradient of its samples, so no atomics. A query whose keys are all padded gets lse = +inf, so
P = 0 there: zero output and gradients. Accumulation is fp32 (fp64 for fp64 inputs).
Tiles too large for a block's shared memory (fp32 backward at F_PAD = DH_PAD = 128) run the
reference instead (`fits`). Reference: ref_field_attention.py.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .ref_field_attention import field_attention_backward_ref, field_attention_forward_ref
from .ref_gate_combine import acc_dtype
from .tuning import tuned

# Autotuned over samples per program, warps and pipeline stages, keyed on (F, DH), never on B;
# one config when interpreting (tuning.py).
# The first config (the interpreter's) takes 2 samples, so tests see a partial last tile.
# Stages: the compiler pipelines the loop over a program's samples, buffering the next samples'
# tiles in shared memory. With 3 stages, fp32 at F_PAD = DH_PAD = 128 asks for 512 KB (forward)
# and 900 KB (backward) of the 227 KB an H100/H200 block can have (measured from triton.compile
# for sm_90), and every such launch failed on an H200; 1 stage needs 128 KB. _keep_stages drops
# the multi-stage configs where a tile passes 16 KB; the first config has 1 stage, so the
# single-config modes fit too.
CONFIGS = [triton.Config({"BLOCK_B": bb}, num_warps=w, num_stages=st)
           for st in (1, 3) for bb in (2, 1, 4, 8) for w in (4, 8)]


def _keep_stages(configs, named_args, **kwargs):
    """1-stage configs always; 3-stage ones where an [F_PAD, DH_PAD] tile is at most 16 KB."""
    args = {**named_args, **kwargs}
    tile_bytes = args["F_PAD"] * args["DH_PAD"] * args["Q"].element_size()
    return [c for c in configs if c.num_stages == 1 or tile_bytes <= 16384]




@triton.jit
def _scores(q, k, mask_row, f_ok, scale, ACC: tl.constexpr, PREC: tl.constexpr):
    """S [F_PAD, F_PAD] = q k^T * scale, -inf at padded keys."""
    s = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC) * scale
    key_ok = f_ok & (mask_row == 0)                                             # [F_PAD]
    return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _row_lse(s):
    """[F_PAD] log-sum-exp of each row of S; +inf where every key is padded (exp(s - lse) = 0)."""
    m = tl.max(s, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)                                    # all-padded rows
    total = tl.sum(tl.exp(s - m[:, None]), axis=1)
    lse = m + tl.log(tl.where(total == 0.0, 1.0, total))
    return tl.where(total == 0.0, float("inf"), lse)


@triton.jit
def _tile_offsets(F, DH, F_PAD: tl.constexpr, DH_PAD: tl.constexpr):
    """Field offsets [F_PAD], head-dim offsets [DH_PAD], real fields [F_PAD] and the offsets of
    an [F_PAD, DH_PAD] tile within one (sample, head)'s [F, DH] block."""
    offs_f = tl.arange(0, F_PAD)
    offs_d = tl.arange(0, DH_PAD)
    return offs_f, offs_d, offs_f < F, offs_f[:, None] * DH + offs_d[None, :]


@triton.jit
def _load_sample(Q, K, V, MASK, b, h, B, H, F, DH, offs_f, offs_d, tile, HAS_MASK: tl.constexpr,
                 F_PAD: tl.constexpr):
    """Sample b, head h: (base offset, row_ok [F_PAD], tile_ok [F_PAD, DH_PAD], q, k, v
    [F_PAD, DH_PAD] with zeros in the padding, key mask [F_PAD] int8); no rows past B."""
    row_ok = offs_f < tl.where(b < B, F, 0)
    tile_ok = row_ok[:, None] & (offs_d[None, :] < DH)
    base = (b * H + h) * F * DH
    q = tl.load(Q + base + tile, mask=tile_ok, other=0.0)
    k = tl.load(K + base + tile, mask=tile_ok, other=0.0)
    v = tl.load(V + base + tile, mask=tile_ok, other=0.0)
    mask_row = tl.zeros([F_PAD], dtype=tl.int8)
    if HAS_MASK:
        mask_row = tl.load(MASK + b * F + offs_f, mask=row_ok, other=1).to(tl.int8)
    return base, row_ok, tile_ok, q, k, v, mask_row


@tuned(CONFIGS, key=["F", "DH"], prune=_keep_stages)
@triton.jit
def _field_attention_fwd(Q, K, V, MASK, OUT, LSE, B, H, F, DH, scale, HAS_MASK: tl.constexpr,
                         ACC: tl.constexpr, PREC: tl.constexpr, F_PAD: tl.constexpr,
                         DH_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    # 1. one [F_PAD, DH_PAD] tile of offsets, shared by q, k, v, out of every (sample, head)
    h = tl.program_id(1)
    offs_f, offs_d, f_ok, tile = _tile_offsets(F, DH, F_PAD, DH_PAD)
    for i in range(BLOCK_B):
        # 2. sample b's q, k, v [F_PAD, DH_PAD] (zeros in the padding) and key mask [F_PAD]
        b = tl.program_id(0).to(tl.int64) * BLOCK_B + i
        base, row_ok, tile_ok, q, k, v, mask_row = _load_sample(
            Q, K, V, MASK, b, h, B, H, F, DH, offs_f, offs_d, tile, HAS_MASK, F_PAD)
        # 3. scores [F_PAD, F_PAD], row log-sum-exp [F_PAD] (saved), P = exp(S - lse)
        s = _scores(q, k, mask_row, f_ok, scale, ACC, PREC)
        lse = _row_lse(s)
        p = tl.exp(s - lse[:, None])
        # 4. out = P v with P in v's dtype
        o = tl.dot(p.to(v.dtype), v, out_dtype=ACC, input_precision=PREC)
        tl.store(OUT + base + tile, o.to(OUT.dtype.element_ty), mask=tile_ok)
        tl.store(LSE + (b * H + h) * F + offs_f, lse.to(LSE.dtype.element_ty), mask=row_ok)


@tuned(CONFIGS, key=["F", "DH"], prune=_keep_stages)
@triton.jit
def _field_attention_bwd(DOUT, Q, K, V, MASK, OUT, LSE, DQ, DK, DV, B, H, F, DH, scale,
                         HAS_MASK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                         F_PAD: tl.constexpr, DH_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    # 1. offsets as in forward
    h = tl.program_id(1)
    offs_f, offs_d, f_ok, tile = _tile_offsets(F, DH, F_PAD, DH_PAD)
    for i in range(BLOCK_B):
        # 2. load q, k, v and the key mask as forward, out, dout [F_PAD, DH_PAD] and the saved
        #    lse [F_PAD] (+inf in the padding, so P = 0 there)
        b = tl.program_id(0).to(tl.int64) * BLOCK_B + i
        base, row_ok, tile_ok, q, k, v, mask_row = _load_sample(
            Q, K, V, MASK, b, h, B, H, F, DH, offs_f, offs_d, tile, HAS_MASK, F_PAD)
        o = tl.load(OUT + base + tile, mask=tile_ok, other=0.0).to(ACC)
        do = tl.load(DOUT + base + tile, mask=tile_ok, other=0.0)
        lse = tl.load(LSE + (b * H + h) * F + offs_f, mask=row_ok, other=float("inf")).to(ACC)
        # 3. recompute P [F_PAD, F_PAD] from the saved row log-sum-exp
        p = tl.exp(_scores(q, k, mask_row, f_ok, scale, ACC, PREC) - lse[:, None])
        # 4. dv = P^T dout; dP = dout v^T; dS = P * (dP - rowsum(dout * out))
        dv = tl.dot(tl.trans(p).to(do.dtype), do, out_dtype=ACC, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)
        delta = tl.sum(do.to(ACC) * o, axis=1)                                   # [F_PAD]
        ds = p * (dp - delta[:, None])
        # 5. dq = dS k * scale; dk = dS^T q * scale
        dq = tl.dot(ds.to(k.dtype), k, out_dtype=ACC, input_precision=PREC) * scale
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, out_dtype=ACC, input_precision=PREC) * scale
        tl.store(DQ + base + tile, dq.to(DQ.dtype.element_ty), mask=tile_ok)
        tl.store(DK + base + tile, dk.to(DK.dtype.element_ty), mask=tile_ok)
        tl.store(DV + base + tile, dv.to(DV.dtype.element_ty), mask=tile_ok)


def meta(F: int, DH: int, dtype: torch.dtype, has_mask: bool) -> dict:
    """The constexprs a launch takes besides BLOCK_B (also used by the compile-only tests)."""
    # fp32 dots run as tf32x3 (three tensor-core passes, about fp32 accuracy): "ieee" fp32
    # dots unroll into FMAs that take minutes to compile at F_PAD = DH_PAD = 128.
    return dict(HAS_MASK=has_mask, ACC=tl.float64 if dtype == torch.float64 else tl.float32,
                PREC="tf32x3" if dtype == torch.float32 else "ieee",
                F_PAD=max(16, triton.next_power_of_2(F)), DH_PAD=max(16, triton.next_power_of_2(DH)))


# A block's dot operands live in shared memory (227 KB per block on an H100/H200). Measured from
# triton.compile for sm_90 with 1 stage: forward 2 tiles' worth (fp32 F_PAD = DH_PAD = 128:
# 128 KB), backward 4 (256 KB there: too much). Tiles past these bytes run the PyTorch reference
# instead: fp32 backward at F_PAD = DH_PAD = 128, and fp64 (gradcheck) past 64 x 64.
MAX_TILE_BYTES = {False: 65536, True: 32768}  # backward? -> bytes of one [F_PAD, DH_PAD] tile


def fits(F: int, DH: int, dtype: torch.dtype, backward: bool) -> bool:
    """Whether the Triton kernel's tiles fit a block's shared memory (else the reference runs)."""
    m = meta(F, DH, dtype, False)
    return m["F_PAD"] * m["DH_PAD"] * torch.finfo(dtype).bits // 8 <= MAX_TILE_BYTES[backward]


def _mask_arg(key_padding_mask, q):
    """uint8 view of the [B, F] bool mask (no copy), or q as an unused placeholder pointer."""
    return q if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)


def field_attention_fwd(q, k, v, key_padding_mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, F, dh] -> (out [B, H, F, dh], lse [B, H, F]); shapes already checked by ops.py."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, F, DH = q.shape
    if not fits(F, DH, q.dtype, backward=False):
        out, lse = field_attention_forward_ref(q, k, v, key_padding_mask)
        return out.contiguous(), lse.contiguous()
    out = torch.empty_like(q)
    lse = q.new_empty((B, H, F), dtype=acc_dtype(q.dtype))
    grid = lambda cfg: (triton.cdiv(B, cfg["BLOCK_B"]), H)  # noqa: E731
    _field_attention_fwd[grid](q, k, v, _mask_arg(key_padding_mask, q), out, lse, B, H, F, DH, DH ** -0.5,
                               **meta(F, DH, q.dtype, key_padding_mask is not None))
    return out, lse


def field_attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse):
    """grad_out [B, H, F, dh], lse [B, H, F] saved by forward -> (dq, dk, dv), each [B, H, F, dh]."""
    do, q, k, v, out, lse = (t.contiguous() for t in (grad_out, q, k, v, out, lse))
    B, H, F, DH = q.shape
    if not fits(F, DH, q.dtype, backward=True):
        return tuple(t.contiguous() for t in field_attention_backward_ref(do, q, k, v, key_padding_mask, lse))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid = lambda cfg: (triton.cdiv(B, cfg["BLOCK_B"]), H)  # noqa: E731
    _field_attention_bwd[grid](do, q, k, v, _mask_arg(key_padding_mask, q), out, lse, dq, dk, dv,
                               B, H, F, DH, DH ** -0.5, **meta(F, DH, q.dtype, key_padding_mask is not None))
    return dq, dk, dv
