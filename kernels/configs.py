"""Autotune config sets of the sphereops kernels (Hopper first, valid on Ampere).

Each family has one named function that builds its configs, with a comment saying why each
config is there, and (where useful) a pruning function that drops configs the shape cannot use.
The backward kernels append their own sets here.

Rules for the implicit-GEMM conv kernels: power-of-two blocks >= 16 (tl.dot), num_warps 4
(one warpgroup: 8 warps spill on non-1x1 convs, whose address arithmetic is register heavy;
8-warp configs are pruned unless the filter is 1x1 or the patch norms come from the pre-pass,
the two cases a GPU run showed right),
num_stages 3-4 so that the global->shared pipeline hides the latency of the gathered input loads.
"""

import torch
import triton

# The autotune key of the implicit-GEMM forward: the GEMM dims (M = pixels, N = C_out/G,
# K = C_in/G * KH * KW), the filter size, which also decides which configs are legal (8-warp
# configs are 1x1 only), and the input's channel stride (1 for channels_last: contiguous K
# loads; NCHW gathers favour other tiles), and where the patch norms come from (the K loop's
# work differs).  The autotuner adds the tensors' dtypes itself.
CONV_FWD_AUTOTUNE_KEY = ["n_pixels", "c_out_per_group", "c_in_per_group", "KH", "KW", "stride_xc",
                         "NORMS_FROM_Q"]


def _cfg(block_m, block_n, block_k, num_stages, group_m=8, num_warps=4):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=num_warps, num_stages=num_stages)


def conv_fwd_configs():
    """Configs for ``_sphere_conv_fwd_kernel`` (M = N*Ho*Wo pixels x C_out/G filters x K)."""
    return [
        # Large square tile: the workhorse for wide layers (C_out/G >= 128), highest MMA reuse;
        # 3 stages keep fp32 (tf32) operands within Hopper's 228 KB of shared memory.
        _cfg(128, 128, 64, num_stages=3),
        # Same tile, shorter K step, one more stage: better when C_in/G is 32 (a 64-wide K
        # step would be half padding in the channel-chunk loop) and for latency hiding.
        _cfg(128, 128, 32, num_stages=4),
        # Tall tile for C_out/G = 64 (common in ResNet stems/stage 1): no wasted N columns.
        _cfg(128, 64, 64, num_stages=4),
        # The same with a 32-wide K step, for C_out/G <= 64 with C_in/G <= 32 (the pruning caps
        # BLOCK_K at the channel count): without it such layers -- edge.odd, 29 -> 61 channels,
        # 3.7x cuDNN on the H200 (20261127-1606) -- only had N = 32 or 16 tiles, each N tile
        # gathering the same input patches again.
        _cfg(128, 64, 32, num_stages=4),
        # Wide tile for few pixels (late stages, small batch) and many filters.
        _cfg(64, 128, 64, num_stages=4),
        # Small tile: more programs for small problems so that all 132 SMs get work.
        _cfg(64, 64, 64, num_stages=4),
        # Narrow N for C_out/G <= 32 (grouped convs, thin layers) and small-K first layers.
        _cfg(128, 32, 32, num_stages=4),
        # Minimum-N tile for depthwise-like shapes (C_out/G <= 16) with tiny K.
        _cfg(128, 16, 16, num_stages=3),
        # Two warpgroups share a 128x128 tile (half the accumulator a thread). 16-bit only, and
        # for 1x1 filters or pre-pass patch norms (pruned otherwise): with the norms squared
        # inside the K loop this tile gave wrong norms on an H200 for a 3x3 conv
        # (bench.tile_sweep, 20261127-1540), while with the pre-pass it was right and the
        # fastest tile on sn9.conv1_x (0.145 ms vs 0.168 ms for the best 4-warp tile).
        _cfg(128, 128, 64, num_stages=3, num_warps=8),
    ]


# Tiles whose fused-norm build (patch norms squared inside the K loop) gave wrong outputs on an
# H200 with triton 3.6 while their pre-pass build was right: 64x128x64, 4 warps, 4 stages --
# r_x right, y off by 1.9e-2 relative on a 3x3 bf16 conv (tests/test_gpu.py::
# test_every_forward_config_vs_float64, 20261127-1606; the tile sweep of -1540 saw 1.4e-2).
# Pruned from the fused path only.
FUSED_NORM_FAULTY_TILES = {(64, 128, 64, 4, 4)}


def _tile(config) -> tuple:
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages)


def fits_fma_dot(config) -> bool:
    """Whether a GEMM config suits exact fp32 (``input_precision="ieee"``: no tensor-core
    instruction, the dot runs on the FMA units with both operand tiles in registers).

    make aot-check: tiles above 64x64x64 spill 1-14 KB a thread there (sm_80 and sm_90), while
    64x64x64, 128x32x32 and 128x16x16 stay in registers on sm_90."""
    kw = config.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"] <= 64 * 64 * 64


def fits_flat_k_loop(config) -> bool:
    """Whether a GEMM config suits the forward's flat K loop (C_in/G < 16: every lane of the x
    tile gathers its own (tap, channel) with its own 64-bit address). AOT, sm_90, bf16, a 3 ->
    64 channel 5x5 conv: BLOCK_M x BLOCK_K = 8192 spills 568-1352 B a thread, and so does a
    128-wide N at 4096 (160 B); 128x64x32, 64x64x64, 128x32x32 and 128x16x16 spill nothing."""
    kw = config.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_K"] <= 4096 and kw["BLOCK_N"] <= 64


def prune_conv_fwd_configs(configs, named_args, **kwargs):
    """Drop configs whose N or K block is far larger than the problem needs (pure padding).

    Keeps a config when BLOCK_N <= max(16, next_pow2(C_out/G)), BLOCK_K <= max(32, next_pow2(K
    step range)) (C_in/G for the channel-chunk loop, C_in/G*kh*kw for the flat loop),
    num_warps < 8 unless the dtype is 16-bit and the filter 1x1 or the patch norms come from the
    pre-pass (NORMS_FROM_Q), for fused norms none of FUSED_NORM_FAULTY_TILES, for exact fp32
    the tile fits the FMA dot (:func:`fits_fma_dot`), and for the flat K loop (C_in/G < 16)
    the tile fits it (:func:`fits_flat_k_loop`); always keeps at least one config.
    """
    def arg(name, default=None):
        # positional launch arguments arrive in named_args, keyword ones (constexprs) in kwargs
        return named_args.get(name, kwargs.get(name, default))

    c_out_g = int(arg("c_out_per_group"))
    c_in_g = int(arg("c_in_per_group"))
    n_cap = max(16, triton.next_power_of_2(c_out_g))
    k_cap = max(16, triton.next_power_of_2(c_in_g * int(arg("KH", 1)) * int(arg("KW", 1))))
    if c_in_g >= 16:
        k_cap = max(16, triton.next_power_of_2(c_in_g))
    one_by_one = int(arg("KH", 1)) * int(arg("KW", 1)) == 1
    x = arg("x_ptr")
    fp32 = getattr(x, "dtype", None) == torch.float32
    exact_fp32 = fp32 and arg("DOT_PRECISION") == "ieee"
    norms_from_q = bool(arg("NORMS_FROM_Q", False))
    # 8 warps: never fp32 -- no GPU test has run an 8-warp tf32 conv tile, and the SphereLinear's
    # 8-warp tf32 tile gave wrong results on an H200 (kernels/linear.py); for 16-bit, 1x1
    # filters or pre-pass norms only (conv_fwd_configs)
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= max(32, k_cap)
            and (c.num_warps < 8 or ((one_by_one or norms_from_q) and not fp32))
            and (norms_from_q or _tile(c) not in FUSED_NORM_FAULTY_TILES)
            and (fits_fma_dot(c) or not exact_fp32)
            and (c_in_g >= 16 or fits_flat_k_loop(c))]
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))]
    return kept


def conv_fwd_default_config():
    """The one config used when autotuning is switched off (SPHEREOPS_AUTOTUNE=0): valid for
    every shape (masks), a mid-size Hopper tile that neither spills nor starves small problems."""
    return _cfg(128, 64, 64, num_stages=3)


def conv_fwd_interpreter_config():
    """The single config used under TRITON_INTERPRET=1 (CPU tests): small blocks, so that the
    tiny test shapes still cover several M/N tiles, several K steps and the tile masks."""
    return _cfg(32, 16, 16, num_stages=1, group_m=2, num_warps=4)


def conv_fwd_grid_configs(interpreter=False):
    """Configs for ``conv_fwd_grid._sphere_conv_fwd_grid_kernel`` (TMA operands, a K loop that
    is loads and MMAs only). 4 warps (one warpgroup) and 8 (two sharing the tile: the
    pre-pass norms are the build a GPU showed right at 8 warps); 3-4 stages of TMA boxes.
    Under the interpreter one small tile, so tiny test shapes cover several M and N tiles."""
    if interpreter:
        return [_cfg(32, 16, 16, num_stages=1, group_m=2)]
    return [
        _cfg(128, 128, 64, num_stages=3),
        _cfg(128, 128, 64, num_stages=3, num_warps=8),
        _cfg(128, 64, 64, num_stages=4),
        _cfg(64, 128, 64, num_stages=4),
        _cfg(128, 128, 32, num_stages=4),
        _cfg(64, 64, 64, num_stages=4),
        _cfg(128, 32, 32, num_stages=4),
        _cfg(128, 16, 16, num_stages=4),
    ]


def fits_grid_channels(config, c_pad: int, dtype) -> bool:
    """Whether a grid-path config can run on groups of ``c_pad`` channels: BLOCK_K divides
    c_pad (a box past a group's channels would read the next group's, which the packed
    filters' next tap would then multiply), and fp32 boxes stay within one 128-byte swizzle
    row (BLOCK_K <= 32); 8 warps for 16-bit only (no GPU test has run an 8-warp tf32 tile)."""
    block_k = config.kwargs["BLOCK_K"]
    if c_pad % block_k:
        return False
    if dtype == torch.float32 and (block_k > 32 or config.num_warps >= 8):
        return False
    return True


def prune_conv_fwd_grid_configs(configs, named_args, **kwargs):
    """Keep the grid configs that fit the channels (:func:`fits_grid_channels`) and whose N
    block is at most max(16, next_pow2(C_out/G)); always keeps at least one (BLOCK_K 16
    divides every c_pad)."""
    return _prune_grid_configs(configs, int(named_args["c_pad"]),
                               int(named_args["c_out_per_group"]), named_args["y_ptr"].dtype)


def _prune_grid_configs(configs, k_channels, n_channels, dtype):
    """The grid configs that fit ``k_channels`` (:func:`fits_grid_channels`) with an N block of
    at most max(16, next_pow2(n_channels)); at least the smallest (BLOCK_K 16 fits any
    multiple of 16)."""
    n_cap = max(16, triton.next_power_of_2(n_channels))
    kept = [c for c in configs
            if fits_grid_channels(c, k_channels, dtype) and c.kwargs["BLOCK_N"] <= n_cap]
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"]))]
    return kept


def dgrad_grid_configs(interpreter=False):
    """Configs for ``conv_bwd_grid._dgrad_grid_kernel``: the forward grid path's tiles (the
    same GEMM over grid rows: M = grid rows, N = C_in/G, K = taps x C_out/G), 16-bit only."""
    return conv_fwd_grid_configs(interpreter)


def prune_dgrad_grid_configs(configs, named_args, **kwargs):
    """Keep the dgrad grid configs whose BLOCK_K divides C_out/G (a box past a group's Hn
    columns would read the next group's) and whose N block is at most max(16,
    next_pow2(C_in/G)); always keeps at least one (BLOCK_K 16 divides every C_out/G the path
    takes). For NCHW x and dx (PIXELS_FAST) no 4-warp tile with a 128-wide N block: under
    triton 3.6 their transposed epilogue spills 32-696 B a thread (sm_90 AOT compile under
    3.6; the 3.9 builds of docs/aot_table.md spill nothing), and triton 3.6 is what the GPU
    machine has."""
    if kwargs.get("PIXELS_FAST"):
        configs = [c for c in configs
                   if not (c.num_warps == 4 and c.kwargs["BLOCK_N"] >= 128)] or configs
    return _prune_grid_configs(configs, int(named_args["cg_out"]), int(named_args["cg_in"]),
                               named_args["dx_ptr"].dtype)
