"""Triton gate_combine: per-task softmax over experts and the weighted sum, fused.

    expert_out  Y      [B, E, D]
    gate_logits X      [T, B, E]
    out                [T, B, D]   out[t, b] = sum_e softmax(X[t, b])[e] * act(Y[b, e])
    RELU               act = ReLU (Y holds the experts' pre-activations) applied as Y is loaded, and
                       its gradient mask as dY is stored; else the identity

Forward: a program owns BLOCK_B samples x BLOCK_D columns for all T tasks, so each expert
output is read once for every task. Backward: a program owns whole rows (all of D) and walks
them in column tiles, each tile of Y loaded for all E experts at once ([BLOCK_B, E, BLOCK_DB]),
so every input is read once and
  dY[b, e] = sum_t g[t, b, e] * dout[t, b]          (complete per tile: no atomics)
  dg[t, b, e] = <dout[t, b], Y[b, e]>               (summed over the tiles)
  dX = g * (dg - sum_e g * dg)
(An earlier backward looped over experts one at a time, each step a dependent load and two
cross-lane reductions: 0.4x the eager reference at E=16, T=4, D=256 on an H200.)
Accumulation is fp32 (fp64 for fp64 inputs). Reference: ref_gate_combine.py.
"""
import torch
import triton
import triton.language as tl

from .ref_gate_combine import gate_combine_backward_ref, gate_combine_ref  # noqa: F401
from .tuning import tuned

# Autotuned over BLOCK_B and warps, keyed on (E, T, D), never on B. The interpreter
# takes one config only ("0 active drivers" otherwise; tuning.py).
FWD_CONFIGS = [triton.Config({"BLOCK_B": bb}, num_warps=w) for bb in (4, 8, 16, 32) for w in (4, 8)]
BWD_CONFIGS = [triton.Config({"BLOCK_B": bb}, num_warps=w) for bb in (4, 1, 2, 8, 16) for w in (4, 8)]


def _keep(configs, named_args, budget=16384, **kwargs):
    """Drop configs whose [T_PAD, BLOCK_B, BLOCK_D] accumulator exceeds `budget` elements."""
    args = {**named_args, **kwargs}
    rows = budget // (args["T_PAD"] * args["BLOCK_D"])
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= max(rows, 4)]
    return kept or configs[:1]


def _keep_bwd(configs, named_args, budget=4096, **kwargs):
    """Drop configs whose [BLOCK_B, E_PAD, BLOCK_DB] tile (Y, dY and their products each hold
    one) exceeds `budget` elements; the smallest BLOCK_B always stays."""
    args = {**named_args, **kwargs}
    tile = args["E_PAD"] * args["BLOCK_DB"]
    smallest = min(c.kwargs["BLOCK_B"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_B"] * tile <= budget or c.kwargs["BLOCK_B"] == smallest]


@triton.jit
def _softmax_stats(X, offs_t, offs_b, offs_e, B, E, T, ACC: tl.constexpr):
    """Row max and 1/sum(exp) of the gate logits, [T_PAD, BLOCK_B] each, plus the logit tile."""
    row_ok = (offs_t[:, None] < T) & (offs_b[None, :] < B)                      # [T_PAD, BLOCK_B]
    e_ok = offs_e < E
    ptrs = X + (offs_t[:, None, None] * B + offs_b[None, :, None]) * E + offs_e[None, None, :]
    x = tl.load(ptrs, mask=row_ok[:, :, None] & e_ok[None, None, :], other=0.0).to(ACC)
    x = tl.where(e_ok[None, None, :], x, float("-inf"))                         # [T_PAD, BLOCK_B, E_PAD]
    m = tl.max(x, axis=2)
    inv = 1.0 / tl.sum(tl.exp(x - m[:, :, None]), axis=2)
    return x, m, inv, row_ok


@tuned(FWD_CONFIGS, key=["E", "T", "D"], prune=_keep)
@triton.jit
def _gate_combine_fwd(Y, X, OUT, B, E, T, D, ACC: tl.constexpr, T_PAD: tl.constexpr,
                      E_PAD: tl.constexpr, BLOCK_D: tl.constexpr, RELU: tl.constexpr, BLOCK_B: tl.constexpr):
    # 1. this program's samples, columns, tasks; int64 offsets (B * E * D can pass 2^31)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, T_PAD).to(tl.int64)
    offs_e = tl.arange(0, E_PAD)
    y_ok = (offs_b[:, None] < B) & (offs_d[None, :] < D)                       # [BLOCK_B, BLOCK_D]
    # 2. softmax statistics of every task's gate over the E experts
    _, m, inv, row_ok = _softmax_stats(X, offs_t, offs_b, offs_e, B, E, T, ACC)
    # 3. stream the experts: read Y[:, e, d-tile] once, add it into all T task outputs
    acc = tl.zeros([T_PAD, BLOCK_B, BLOCK_D], dtype=ACC)
    for e in range(0, E):
        x_e = tl.load(X + (offs_t[:, None] * B + offs_b[None, :]) * E + e, mask=row_ok, other=0.0)
        g_e = tl.exp(x_e.to(ACC) - m) * inv                                     # [T_PAD, BLOCK_B]
        y = tl.load(Y + (offs_b[:, None] * E + e) * D + offs_d[None, :], mask=y_ok, other=0.0).to(ACC)
        if RELU:
            y = tl.where(y < 0, 0.0, y)                                         # NaN stays NaN, as torch.relu
        acc += g_e[:, :, None] * y[None, :, :]
    # 4. store out[t, b, d-tile]
    out_ptrs = OUT + (offs_t[:, None, None] * B + offs_b[None, :, None]) * D + offs_d[None, None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_t[:, None, None] < T) & y_ok[None, :, :])


@tuned(BWD_CONFIGS, key=["E", "T", "D"], prune=_keep_bwd)
@triton.jit
def _gate_combine_bwd(DOUT, Y, X, DY, DX, B, E, T, D, ACC: tl.constexpr, T_PAD: tl.constexpr,
                      E_PAD: tl.constexpr, BLOCK_DB: tl.constexpr, RELU: tl.constexpr, BLOCK_B: tl.constexpr):
    # 1. this program owns BLOCK_B whole samples: every task, expert and column
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_t = tl.arange(0, T_PAD).to(tl.int64)
    offs_e = tl.arange(0, E_PAD)
    b_ok, e_ok = offs_b < B, offs_e < E
    x, m, inv, row_ok = _softmax_stats(X, offs_t, offs_b, offs_e, B, E, T, ACC)
    g = tl.exp(x - m[:, :, None]) * inv[:, :, None]                             # [T_PAD, BLOCK_B, E_PAD]
    dg = tl.zeros([T_PAD, BLOCK_B, E_PAD], dtype=ACC)                           # <dout_t, Y_e>
    for d0 in range(0, D, BLOCK_DB):
        # 2. all E experts of this column tile in one load: Y[b, :, d-tile] [BLOCK_B, E_PAD, BLOCK_DB]
        offs_d = d0 + tl.arange(0, BLOCK_DB)
        y_ok = b_ok[:, None, None] & e_ok[None, :, None] & (offs_d < D)[None, None, :]
        y_ptrs = (offs_b[:, None, None] * E + offs_e[None, :, None]) * D + offs_d[None, None, :]
        y_in = tl.load(Y + y_ptrs, mask=y_ok, other=0.0).to(ACC)
        y = tl.where(y_in < 0, 0.0, y_in) if RELU else y_in                    # the activation forward used
        dy = tl.zeros([BLOCK_B, E_PAD, BLOCK_DB], dtype=ACC)
        for t in range(0, T):
            # 3. dout[t, b, d-tile] [BLOCK_B, BLOCK_DB], read once; g[t] picked out of the register tile
            do_ok = b_ok[:, None] & (offs_d < D)[None, :]
            dout_t = tl.load(DOUT + (t * B + offs_b[:, None]) * D + offs_d[None, :], mask=do_ok, other=0.0).to(ACC)
            is_t = (offs_t == t)[:, None, None]                                 # [T_PAD, 1, 1]
            g_t = tl.sum(tl.where(is_t, g, 0.0), axis=0)                        # [BLOCK_B, E_PAD]
            # 4. dY[b, e, d] += g[t, b, e] * dout[t, b, d]  (complete after the t loop: no atomics)
            dy += g_t[:, :, None] * dout_t[:, None, :]
            # 5. dg[t, b, e] += <dout[t, b, d-tile], Y[b, e, d-tile]>
            dg += tl.where(is_t, tl.sum(y * dout_t[:, None, :], axis=2)[None, :, :], 0.0)
        if RELU:
            dy = tl.where(y_in <= 0, 0.0, dy)                                   # ReLU backward, as torch's
        tl.store(DY + y_ptrs, dy.to(DY.dtype.element_ty), mask=y_ok)
    # 6. softmax backward over experts: dX = g * (dg - sum_e g * dg)
    dx = g * (dg - tl.sum(g * dg, axis=2)[:, :, None])
    dx_ptrs = DX + (offs_t[:, None, None] * B + offs_b[None, :, None]) * E + offs_e[None, None, :]
    tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=row_ok[:, :, None] & e_ok[None, None, :])


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def meta(T: int, E: int, D: int, dtype: torch.dtype, backward: bool = False, relu: bool = False) -> dict:
    """The constexprs a launch takes besides BLOCK_B (also used by the compile-only tests):
    the forward's column tile BLOCK_D (with all T_PAD tasks), or the backward's BLOCK_DB (with
    all E_PAD experts), and RELU."""
    t_pad, e_pad = triton.next_power_of_2(T), triton.next_power_of_2(E)
    tile = dict(BLOCK_DB=min(triton.next_power_of_2(D), max(16, 1024 // e_pad))) if backward else \
        dict(BLOCK_D=min(triton.next_power_of_2(D), max(16, 1024 // t_pad)))
    return dict(ACC=_acc(dtype), T_PAD=t_pad, E_PAD=e_pad, RELU=relu, **tile)


def gate_combine_fwd(expert_out: torch.Tensor, gate_logits: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """[B, E, D], [T, B, E] -> [T, B, D]; shapes already checked by ops.py."""
    y, x = expert_out.contiguous(), gate_logits.contiguous()
    (B, E, D), T = y.shape, x.shape[0]
    out = y.new_empty((T, B, D))
    grid = lambda cfg: (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(D, cfg["BLOCK_D"]))  # noqa: E731
    _gate_combine_fwd[grid](y, x, out, B, E, T, D, **meta(T, E, D, y.dtype, relu=relu))
    return out


def gate_combine_bwd(grad_out: torch.Tensor, expert_out: torch.Tensor, gate_logits: torch.Tensor, relu: bool = False):
    """grad_out [T, B, D] -> (d expert_out [B, E, D], d gate_logits [T, B, E])."""
    dout, y, x = grad_out.contiguous(), expert_out.contiguous(), gate_logits.contiguous()
    (B, E, D), T = y.shape, x.shape[0]
    d_y, d_x = torch.empty_like(y), torch.empty_like(x)
    grid = lambda cfg: (triton.cdiv(B, cfg["BLOCK_B"]),)  # noqa: E731
    _gate_combine_bwd[grid](dout, y, x, d_y, d_x, B, E, T, D, **meta(T, E, D, y.dtype, backward=True, relu=relu))
    return d_y, d_x
