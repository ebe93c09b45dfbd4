//! Launch wrappers for `kernels/dropout_add_norm.cu`.
//!
//! Two kernel families compute the same bits. On the vector path (`cols % 8 == 0`, every pointer
//! 16-byte aligned) a row of at most 8 groups of 8 per partial ([`row_partials`]`(cols)`
//! partials; hidden sizes up to 16384) runs a register tier: tier `NG` (1, 2, 4, 8 groups per
//! partial) keeps the row in registers, split over `SEG` threads per partial, in blocks of
//! `row_partials(cols) * SEG` threads ([`Tier`], mirroring `FwdTier` / `BwdTier` in the kernel).
//! Everything else (odd or misaligned rows, rows past 16384 columns; the statistics forward of
//! an f32 stream past 8192) runs the generic kernels: one block of `row_partials(cols)` threads
//! loops over the row. Forward: a block per row, grid-stride (tiers: as many blocks as fit the GPU at once, so
//! each block's setup is paid once for many rows). Backward: one block per slab of
//! [`colsum_slab_rows`]`(rows)` rows, writing f32 column partials (`[3][slabs][cols]`, the wanted arrays
//! only) that the colsum kernel adds in slab order.

use super::{
    check_backward, check_forward, check_stream_dtype, colsum_slab_count, colsum_slab_rows,
    row_partials, BackwardArgs, BackwardOut, Config, ForwardArgs, ForwardOut, Norm, GROUP, OP,
};
use crate::dropping::gpu::{aligned16, bind_partials, resolution_flag, row_scale_fields};
use crate::dropping::MaskResolution;
use crate::dtype::{Dtype, DtypeKind, PerDtype};
use crate::error::{Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::Kernel;
use crate::runtime::Handle;

crate::kernel_list! {
    "dropout_add_norm" => {
        [f32 DropoutAddNormFwdF32, f16 DropoutAddNormFwdF16, bf16 DropoutAddNormFwdBf16] = "dropout_add_norm_fwd_" => FWD,
        [f16 DropoutAddNormFwdF16Sf32, bf16 DropoutAddNormFwdBf16Sf32] = "dropout_add_norm_fwd_", "_sf32" => FWD_SF32,
        [f32 DropoutAddNormBwdF32, f16 DropoutAddNormBwdF16, bf16 DropoutAddNormBwdBf16] = "dropout_add_norm_bwd_" => BWD,
        [f16 DropoutAddNormBwdF16Sf32, bf16 DropoutAddNormBwdBf16Sf32] = "dropout_add_norm_bwd_", "_sf32" => BWD_SF32,
        [f32 DropoutAddNormFwdT1F32, f16 DropoutAddNormFwdT1F16, bf16 DropoutAddNormFwdT1Bf16] = "dropout_add_norm_fwd_t1_" => FWD_T1,
        [f32 DropoutAddNormFwdT2F32, f16 DropoutAddNormFwdT2F16, bf16 DropoutAddNormFwdT2Bf16] = "dropout_add_norm_fwd_t2_" => FWD_T2,
        [f32 DropoutAddNormFwdT4F32, f16 DropoutAddNormFwdT4F16, bf16 DropoutAddNormFwdT4Bf16] = "dropout_add_norm_fwd_t4_" => FWD_T4,
        [f32 DropoutAddNormFwdT8F32, f16 DropoutAddNormFwdT8F16, bf16 DropoutAddNormFwdT8Bf16] = "dropout_add_norm_fwd_t8_" => FWD_T8,
        [f16 DropoutAddNormFwdT1F16Sf32, bf16 DropoutAddNormFwdT1Bf16Sf32] = "dropout_add_norm_fwd_t1_", "_sf32" => FWD_T1_SF32,
        [f16 DropoutAddNormFwdT2F16Sf32, bf16 DropoutAddNormFwdT2Bf16Sf32] = "dropout_add_norm_fwd_t2_", "_sf32" => FWD_T2_SF32,
        [f16 DropoutAddNormFwdT4F16Sf32, bf16 DropoutAddNormFwdT4Bf16Sf32] = "dropout_add_norm_fwd_t4_", "_sf32" => FWD_T4_SF32,
        [f16 DropoutAddNormFwdT8F16Sf32, bf16 DropoutAddNormFwdT8Bf16Sf32] = "dropout_add_norm_fwd_t8_", "_sf32" => FWD_T8_SF32,
        [f32 DropoutAddNormBwdT1F32, f16 DropoutAddNormBwdT1F16, bf16 DropoutAddNormBwdT1Bf16] = "dropout_add_norm_bwd_t1_" => BWD_T1,
        [f32 DropoutAddNormBwdT2F32, f16 DropoutAddNormBwdT2F16, bf16 DropoutAddNormBwdT2Bf16] = "dropout_add_norm_bwd_t2_" => BWD_T2,
        [f32 DropoutAddNormBwdT4F32, f16 DropoutAddNormBwdT4F16, bf16 DropoutAddNormBwdT4Bf16] = "dropout_add_norm_bwd_t4_" => BWD_T4,
        [f32 DropoutAddNormBwdT8F32, f16 DropoutAddNormBwdT8F16, bf16 DropoutAddNormBwdT8Bf16] = "dropout_add_norm_bwd_t8_" => BWD_T8,
        [f16 DropoutAddNormBwdT1F16Sf32, bf16 DropoutAddNormBwdT1Bf16Sf32] = "dropout_add_norm_bwd_t1_", "_sf32" => BWD_T1_SF32,
        [f16 DropoutAddNormBwdT2F16Sf32, bf16 DropoutAddNormBwdT2Bf16Sf32] = "dropout_add_norm_bwd_t2_", "_sf32" => BWD_T2_SF32,
        [f16 DropoutAddNormBwdT4F16Sf32, bf16 DropoutAddNormBwdT4Bf16Sf32] = "dropout_add_norm_bwd_t4_", "_sf32" => BWD_T4_SF32,
        [f16 DropoutAddNormBwdT8F16Sf32, bf16 DropoutAddNormBwdT8Bf16Sf32] = "dropout_add_norm_bwd_t8_", "_sf32" => BWD_T8_SF32,
        [f32 DropoutAddNormFwdStatsF32, f16 DropoutAddNormFwdStatsF16, bf16 DropoutAddNormFwdStatsBf16] = "dropout_add_norm_fwd_stats_" => STATS,
        [f32 DropoutAddNormFwdStatsT1F32, f16 DropoutAddNormFwdStatsT1F16, bf16 DropoutAddNormFwdStatsT1Bf16] = "dropout_add_norm_fwd_stats_t1_" => STATS_T1,
        [f32 DropoutAddNormFwdStatsT2F32, f16 DropoutAddNormFwdStatsT2F16, bf16 DropoutAddNormFwdStatsT2Bf16] = "dropout_add_norm_fwd_stats_t2_" => STATS_T2,
        [f32 DropoutAddNormFwdStatsT4F32, f16 DropoutAddNormFwdStatsT4F16, bf16 DropoutAddNormFwdStatsT4Bf16] = "dropout_add_norm_fwd_stats_t4_" => STATS_T4,
        [f16 DropoutAddNormFwdStatsT8F16, bf16 DropoutAddNormFwdStatsT8Bf16] = "dropout_add_norm_fwd_stats_t8_",
        [f16 DropoutAddNormFwdStatsF16Sf32, bf16 DropoutAddNormFwdStatsBf16Sf32] = "dropout_add_norm_fwd_stats_", "_sf32" => STATS_SF32,
        [f16 DropoutAddNormFwdStatsT1F16Sf32, bf16 DropoutAddNormFwdStatsT1Bf16Sf32] = "dropout_add_norm_fwd_stats_t1_", "_sf32" => STATS_T1_SF32,
        [f16 DropoutAddNormFwdStatsT2F16Sf32, bf16 DropoutAddNormFwdStatsT2Bf16Sf32] = "dropout_add_norm_fwd_stats_t2_", "_sf32" => STATS_T2_SF32,
        [f16 DropoutAddNormFwdStatsT4F16Sf32, bf16 DropoutAddNormFwdStatsT4Bf16Sf32] = "dropout_add_norm_fwd_stats_t4_", "_sf32" => STATS_T4_SF32,
        [f32 DropoutAddNormColsumF32, f16 DropoutAddNormColsumF16, bf16 DropoutAddNormColsumBf16] = "dropout_add_norm_colsum_" => COLSUM,
    }
}

/// The keying resolutions kernels/dropout_add_norm.cu implements (every kernel: the tiers, the
/// generic kernels, forward and backward, the statistics forwards).
const RESOLUTIONS: &[MaskResolution] = &[
    MaskResolution::Bits32,
    MaskResolution::Bits16,
    MaskResolution::Bits8,
];

// Flags of kernels/dropout_add_norm.cu: the shared dropping flags keep their values, this op's
// own start at bit 8.
const FLAG_VEC: u32 = 1 << 8;
const FLAG_RMS: u32 = 1 << 9;
const FLAG_BETA: u32 = 1 << 10;
const FLAG_NORM_ONLY: u32 = 1 << 11;
const FLAG_SMEM: u32 = 1 << 12;
const FLAG_DBETA: u32 = 1 << 13;
const FLAG_DBIAS: u32 = 1 << 14;
/// Static shared memory of the generic kernels (the row sums' scratch), beside the dynamic part.
const STATIC_SMEM: usize = 64;
/// The generic kernels' 32-bit group indices: a row of at most `GROUP * 2^31` columns.
const MAX_COLS: usize = GROUP << 31;
/// Threads per block the generic kernels' shared-memory layout is strided by (`MAX_THREADS`).
const SMEM_STRIDE: usize = 256;

/// Dynamic shared memory of a generic kernel with `FLAG_SMEM`: `words` floats for each group a
/// thread owns (8: the forward's row cache; 24: the backward's three partial arrays), each a
/// stride of 256 words apart (kernels/dropout_add_norm/generic.cuh). `None` on overflow.
fn generic_smem_bytes(cols: usize, words: usize) -> Option<usize> {
    cols.div_ceil(GROUP)
        .div_ceil(row_partials(cols))
        .checked_mul(words * SMEM_STRIDE * 4)
}

/// Rows longer than the generic kernels index (32-bit groups within a row) get an error.
fn check_cols(cols: usize) -> Result<()> {
    if cols > MAX_COLS {
        return Err(Error::invalid(
            OP,
            format!("rows of {cols} columns: the GPU kernels take at most {MAX_COLS}; split the hidden dimension"),
        ));
    }
    Ok(())
}

/// Dynamic shared memory every kernel may use without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

device_params! {
    /// Mirrors `FwdParams<T, S>` in the kernel.
    #[derive(Debug, Default)]
    struct FwdParams(168) {
        x: u64,
        residual: u64,
        bias: u64,
        gamma: u64,
        beta: u64,
        rowscale: u64,
        out: u64,
        s: u64,
        mean: u64,
        rstd: u64,
        rows: u64,
        cols: u64,
        seed: u64,
        call: u64,
        threshold: u64,
        path_call: u64,
        path_threshold: u64,
        scale: f32,
        path_scale: f32,
        eps: f32,
        layer_scale: f32,
        flags: u32,
        rows_per_sample: u32,
        /// The meter site's 3 words (the `*_stats_*` kernels only; 0 otherwise).
        stats: u64,
    }
}

device_params! {
    /// Mirrors `BwdParams<T, S>` in the kernel.
    #[derive(Debug, Default)]
    struct BwdParams(176) {
        d_out: u64,
        d_s: u64,
        s: u64,
        gamma: u64,
        mean: u64,
        rstd: u64,
        rowscale: u64,
        dx: u64,
        d_residual: u64,
        partials: u64,
        rows: u64,
        cols: u64,
        slab_rows: u64,
        slabs: u64,
        seed: u64,
        call: u64,
        threshold: u64,
        path_call: u64,
        path_threshold: u64,
        scale: f32,
        path_scale: f32,
        layer_scale: f32,
        flags: u32,
        rows_per_sample: u32,
        pad: u32,
    }
}

device_params! {
    /// Mirrors `ColsumParams<T>` in the kernel.
    #[derive(Debug, Default)]
    struct ColsumParams(48) {
        partials: u64,
        dgamma: u64,
        dbeta: u64,
        dbias: u64,
        cols: u64,
        slabs: u64,
    }
}

/// The kernels of one (x type, stream type) pair: the generic forward and backward, and the
/// register tiers `t1, t2, t4, t8` (index `log2 NG`).
struct Family {
    fwd: Kernel,
    bwd: Kernel,
    fwd_t: [Option<Kernel>; 4],
    bwd_t: [Option<Kernel>; 4],
}

/// A kernel of every (x type, stream type) pair: the family with a stream of the x type, and the
/// f16 and bf16 kernels with an f32 stream (`_sf32`; an f32 x has the one kernel, the family's).
type Streams = (PerDtype<Kernel>, [Kernel; 2]);

/// The kernel of x type `T` and stream type `S` (`S` is `T` or f32: [`check_stream_dtype`]).
fn pick<T: Dtype, S: Dtype>((same, sf32): Streams) -> Kernel {
    match (T::KIND, S::KIND) {
        (DtypeKind::F16, DtypeKind::F32) => sf32[0],
        (DtypeKind::Bf16, DtypeKind::F32) => sf32[1],
        _ => same.get::<T>(),
    }
}

/// The forward's and the backward's kernels: each the generic kernel, then the tiers t1, t2,
/// t4, t8 ([`Family`]).
const DIRECTIONS: [[Streams; 5]; 2] = [
    [
        (FWD, FWD_SF32),
        (FWD_T1, FWD_T1_SF32),
        (FWD_T2, FWD_T2_SF32),
        (FWD_T4, FWD_T4_SF32),
        (FWD_T8, FWD_T8_SF32),
    ],
    [
        (BWD, BWD_SF32),
        (BWD_T1, BWD_T1_SF32),
        (BWD_T2, BWD_T2_SF32),
        (BWD_T4, BWD_T4_SF32),
        (BWD_T8, BWD_T8_SF32),
    ],
];

/// The forwards with the redundancy statistics: the generic kernel, then the tiers t1, t2, t4
/// (t8 is built for 16-bit streams only: [`stats_kernels`]).
const STATS_KERNELS: [Streams; 4] = [
    (STATS, STATS_SF32),
    (STATS_T1, STATS_T1_SF32),
    (STATS_T2, STATS_T2_SF32),
    (STATS_T4, STATS_T4_SF32),
];

/// The kernels of x type `T` and stream type `S` (checked: `S` is `T` or f32).
fn kernels<T: Dtype, S: Dtype>() -> Result<Family> {
    check_stream_dtype(T::KIND, S::KIND)?;
    let [[fwd, fwd_t @ ..], [bwd, bwd_t @ ..]] = DIRECTIONS.map(|k| k.map(pick::<T, S>));
    Ok(Family {
        fwd,
        bwd,
        fwd_t: fwd_t.map(Some),
        bwd_t: bwd_t.map(Some),
    })
}

/// The forwards with the redundancy statistics of x type `T` and stream type `S`: the generic
/// kernel and the tiers (as [`Family::fwd`] and [`Family::fwd_t`]; the same bits in every
/// output, plus the meter site's words).
fn stats_kernels<T: Dtype, S: Dtype>() -> Result<(Kernel, [Option<Kernel>; 4])> {
    use DtypeKind::{Bf16, F16};
    check_stream_dtype(T::KIND, S::KIND)?;
    let [generic, t1, t2, t4] = STATS_KERNELS.map(pick::<T, S>);
    let t8 = match (T::KIND, S::KIND) {
        (F16, F16) => Some(Kernel::DropoutAddNormFwdStatsT8F16),
        (Bf16, Bf16) => Some(Kernel::DropoutAddNormFwdStatsT8Bf16),
        _ => None,
    };
    Ok((generic, [Some(t1), Some(t2), Some(t4), t8]))
}

/// A register tier's thread layout: `ngt` groups of 8 per thread, `seg` threads per partial
/// (`Tier` in kernels/dropout_add_norm.cu; the same for both directions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tier {
    /// `log2 NG`: the kernel's index in [`Family`].
    pub index: usize,
    pub ngt: usize,
    pub seg: usize,
}

/// The tier that holds a vector-path row of `cols` columns (the smallest NG >= the groups per
/// partial), or `None` past the tiers. A 16-bit stream holds two groups per thread (t4 and t8
/// over 2 and 4 segments), an f32 stream (`wide`) one in t2 and t4 (over 2 and 4 segments) and
/// two in t8 (over 4 segments: one would need 2048 threads).
pub(super) fn tier(cols: usize, wide: bool) -> Option<Tier> {
    const NARROW: [Option<(usize, usize)>; 4] =
        [Some((1, 1)), Some((2, 1)), Some((2, 2)), Some((2, 4))];
    const WIDE: [Option<(usize, usize)>; 4] =
        [Some((1, 1)), Some((1, 2)), Some((1, 4)), Some((2, 4))];
    let per = (cols / GROUP).div_ceil(row_partials(cols));
    let index = (0..4).find(|&i| per <= 1 << i)?;
    let (ngt, seg) = if wide { WIDE[index] } else { NARROW[index] }?;
    Some(Tier { index, ngt, seg })
}

/// `s = residual + rowscale * dropout(x + bias)`, `out = norm(s) * layer_scale` and the row
/// statistics, on the handle's stream (see the [module docs](super)).
///
/// Views starting at any element are accepted (misaligned ones take the scalar path, with the
/// same results).
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config;
/// [`Error::InvalidArgument`] for a rowscale together with a drop path, a stream type other
/// than `T` or f32, or a buffer from another CUDA context; driver errors.
///
/// # Examples
///
/// See [`ForwardArgs`]; bf16 activations with the residual stream kept in f32:
///
/// ```no_run
/// use fusedreg::dropout_add_norm::{self as dan, Config, ForwardArgs, ForwardOut, Norm};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(8, 4096, Norm::RmsNorm, 1e-6)?.with_dropout(0.1, 42, 7)?.with_layer_norm_scaling(3)?;
/// let x = s.alloc_zeros::<bf16>(cfg.len()).unwrap();
/// let gamma = s.clone_htod(&vec![bf16::ONE; 4096]).unwrap();
/// let mut out = s.alloc_zeros::<bf16>(cfg.len()).unwrap();
/// let mut stream = s.alloc_zeros::<f32>(cfg.len()).unwrap(); // the residual, updated in place
/// let (mut mean, mut rstd) = (s.alloc_zeros::<f32>(8).unwrap(), s.alloc_zeros::<f32>(8).unwrap());
/// let outs = ForwardOut {
///     out: out.as_view_mut(), s: stream.as_view_mut(), mean: mean.as_view_mut(), rstd: rstd.as_view_mut(),
/// };
/// dan::forward_inplace(&h, &cfg, ForwardArgs::new(x.as_view(), gamma.as_view()), outs)?;
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype, S: Dtype>(
    handle: &Handle,
    cfg: &Config,
    args: ForwardArgs<'_, T, S>,
    out: ForwardOut<'_, T, S>,
) -> Result<()> {
    forward_impl(handle, cfg, args, out, Mode::Fused)
}

/// [`forward`] with the stream updated in place: `out.s` holds the residual on entry and `s` on
/// return (`args.residual` must be `None`).
///
/// # Examples
///
/// See [`forward`].
///
/// ```no_run
/// # use fusedreg::dropout_add_norm::{self as dan, Config, ForwardArgs, ForwardOut, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// # let h = fusedreg::Handle::new(0)?;
/// # let z = |n| h.stream().alloc_zeros::<f32>(n).unwrap();
/// let cfg = Config::new(4, 256, Norm::LayerNorm, 1e-5)?;
/// let (x, gamma, mut out, mut stream, mut mean, mut rstd) = (z(1024), z(256), z(1024), z(1024), z(4), z(4));
/// let outs = ForwardOut {
///     out: out.as_view_mut(), s: stream.as_view_mut(), mean: mean.as_view_mut(), rstd: rstd.as_view_mut(),
/// };
/// dan::forward_inplace(&h, &cfg, ForwardArgs::new(x.as_view(), gamma.as_view()), outs)?;
/// # Ok(()) }
/// ```
pub fn forward_inplace<T: Dtype, S: Dtype>(
    handle: &Handle,
    cfg: &Config,
    args: ForwardArgs<'_, T, S>,
    out: ForwardOut<'_, T, S>,
) -> Result<()> {
    if args.residual.is_some() {
        return Err(Error::invalid(
            OP,
            "forward_inplace reads the residual from out.s; args.residual must be None",
        ));
    }
    forward_impl(handle, cfg, args, out, Mode::InPlace)
}

/// What the forward kernel does with the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// `s` computed from x and the residual (if any) and written.
    Fused,
    /// As `Fused`, the residual read from `out.s`.
    InPlace,
    /// `out.s` is an input, already computed (the unfused baseline's separate norm); x, bias,
    /// the dropout and the row scale are not used.
    NormOnly,
}

pub(super) fn forward_impl<T: Dtype, S: Dtype>(
    handle: &Handle,
    cfg: &Config,
    args: ForwardArgs<'_, T, S>,
    mut out: ForwardOut<'_, T, S>,
    mode: Mode,
) -> Result<()> {
    let in_place = mode == Mode::InPlace;
    let fam = kernels::<T, S>()?;
    let mut lens = forward_lens!(args, out);
    if in_place {
        lens.residual = Some(out.s.len());
    }
    check_forward(cfg, &lens)?;
    if mode == Mode::NormOnly && args.redundancy.is_some() {
        return Err(Error::invalid(
            OP,
            "the norm-only pass adds no residual: measure redundancy on the fused forward",
        ));
    }
    let t = args.tuning;
    if t.max_grid == 0 {
        return Err(Error::invalid(OP, "launch tuning: max_grid must be >= 1"));
    }
    if cfg.is_empty() {
        return Ok(());
    }
    let (x, _g0) = handle.read_ptr(OP, "x", &args.x)?;
    let (gamma, _g1) = handle.read_ptr(OP, "gamma", &args.gamma)?;
    let (beta, _gbeta) = handle.read_opt(OP, "beta", args.beta.as_ref())?;
    let (bias, _gbias) = handle.read_opt(OP, "bias", args.bias.as_ref())?;
    let (res, _gres) = handle.read_opt(OP, "residual", args.residual.as_ref())?;
    let (rowscale, _grs) = handle.read_opt(OP, "rowscale", args.rowscale.as_ref())?;
    let (o, _g2) = handle.write_ptr(OP, "out", &mut out.out)?;
    let (s, _g3) = handle.write_ptr(OP, "s", &mut out.s)?;
    let (mean, _g4) = handle.write_ptr(OP, "mean", &mut out.mean)?;
    let (rstd, _g5) = handle.write_ptr(OP, "rstd", &mut out.rstd)?;
    // The redundancy statistics: the meter site's words, and the *_stats_* kernels.
    let mut site = args.redundancy;
    let words = site.as_mut().map(|st| &mut st.words);
    let (stats, _gstats) = handle.write_opt(OP, "redundancy site", words)?;
    let (fwd_g, fwd_t) = if stats != 0 {
        stats_kernels::<T, S>()?
    } else {
        (fam.fwd, fam.fwd_t)
    };
    let residual = match mode {
        Mode::Fused => res,
        Mode::InPlace => s,
        Mode::NormOnly => 0,
    };

    check_cols(cfg.cols())?;
    let vec = !t.force_scalar
        && cfg.cols() % GROUP == 0
        && aligned16(&[x, gamma, beta, bias, residual, o, s]);
    let rsf = row_scale_fields(cfg.drop_path(), rowscale);
    let keying = cfg.keying(T::KIND);
    let mut flags = rsf.flags | resolution_flag(OP, &keying, RESOLUTIONS)?;
    if vec {
        flags |= FLAG_VEC;
    }
    if cfg.norm() == Norm::RmsNorm {
        flags |= FLAG_RMS;
    }
    if beta != 0 {
        flags |= FLAG_BETA;
    }
    if mode == Mode::NormOnly {
        flags |= FLAG_NORM_ONLY;
    }
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let wide = S::KIND == DtypeKind::F32;
    let tiered = if vec && !t.generic {
        tier(cols, wide).and_then(|tr| Some((fwd_t[tr.index]?, row_partials(cols) * tr.seg)))
    } else {
        None
    };
    let (kernel, block, smem) = match tiered {
        Some((kernel, block)) => (kernel, block, 0),
        None => {
            // The row in shared memory for the passes after the first, when it fits (same
            // bits).
            let smem = if t.no_smem {
                0
            } else {
                generic_smem_bytes(cols, GROUP)
                    .and_then(|b| fit_smem(handle, fwd_g, b))
                    .unwrap_or(0)
            };
            if smem > 0 {
                flags |= FLAG_SMEM;
            }
            (fwd_g, row_partials(cols), smem)
        }
    };
    let mut grid = (rows as u64)
        .min(u64::from(t.max_grid))
        .min(i32::MAX as u64) as u32;
    if tiered.is_some() {
        // As many blocks as are resident at once: each loops over rows (its setup, the Philox
        // key schedule among it, paid once rather than per row).
        grid = grid.min(resident_blocks(handle, kernel, block as u32, 0).unwrap_or(u32::MAX));
    }
    let p = FwdParams {
        x,
        residual,
        bias,
        gamma,
        beta,
        rowscale,
        out: o,
        s,
        mean,
        rstd,
        rows: cfg.rows() as u64,
        cols: cfg.cols() as u64,
        seed: cfg.seed(),
        call: cfg.call(),
        threshold: keying.threshold(),
        path_call: rsf.path_call,
        path_threshold: rsf.path_threshold,
        scale: keying.scale(),
        path_scale: rsf.path_scale,
        eps: cfg.eps(),
        layer_scale: cfg.layer_scale(),
        flags,
        rows_per_sample: rsf.rows_per_sample,
        stats,
    };
    handle.launch(kernel, (grid, 1, 1), (block as u32, 1, 1), smem, &p)
}

/// Blocks of `kernel` resident on the whole GPU at once (SMs times blocks per SM), at least 1;
/// `None` when the driver cannot say.
fn resident_blocks(handle: &Handle, kernel: Kernel, block: u32, smem: u32) -> Option<u32> {
    use cudarc::driver::sys::CUdevice_attribute;
    let f = handle.function(kernel).ok()?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(block, smem as usize, None)
        .ok()?;
    let sms = handle
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .ok()?;
    Some(per_sm.max(1).saturating_mul(sms.max(1) as u32))
}

/// `bytes` of dynamic shared memory for `kernel` when they fit (beside its static shared memory)
/// the device's per-block limit, raising the kernel's limit above the default 48 KiB when
/// needed; `None` otherwise (the caller does without: the generic kernels' caches, or a tier,
/// are never needed for the bits). The limit is raised to the device's maximum, never lowered,
/// so concurrent callers cannot undercut each other.
fn fit_smem(handle: &Handle, kernel: Kernel, bytes: usize) -> Option<u32> {
    use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
    let f = handle.function(kernel).ok()?;
    let fixed = f
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .map_or(STATIC_SMEM, |v| v.max(0) as usize);
    let total = bytes.checked_add(fixed)?;
    let bytes32 = u32::try_from(bytes).ok()?;
    if total <= DEFAULT_SMEM {
        return Some(bytes32);
    }
    let optin = handle
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_or(0, |v| v.max(0) as usize);
    if total > optin {
        return None;
    }
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        (optin - fixed) as i32,
    )
    .ok()
    .map(|()| bytes32)
}

/// The size query the workspace view is checked against (named in its error).
const SIZE_QUERY: &str = "fusedreg::workspace::dropout_add_norm_backward_size";

/// The backward on the handle's stream (see the [module docs](super)): `dx` (mask and row scale
/// regenerated from `cfg`, the same config as the forward), `d_residual`, `dgamma`, and
/// optionally `dbeta` and `dbias`. The column gradients are deterministic: per-slab f32 partials
/// (in `args.workspace`, or allocated stream-ordered per call) summed in slab order by a second
/// kernel, the same order as [`super::cpu::backward`]. With no rows they are zeros.
///
/// Errors: as [`forward`].
///
/// # Examples
///
/// See [`BackwardArgs`]; a prenorm backward with every output:
///
/// ```no_run
/// use fusedreg::dropout_add_norm::{self as dan, BackwardArgs, BackwardOut, Config, Norm, Workspace};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let z = |n| h.stream().alloc_zeros::<f32>(n).unwrap();
/// let cfg = Config::new(64, 768, Norm::LayerNorm, 1e-5)?.with_dropout(0.1, 42, 7)?;
/// let (d_out, d_s, st, gamma, mean, rstd) = (z(cfg.len()), z(cfg.len()), z(cfg.len()), z(768), z(64), z(64));
/// let (mut dx, mut dres, mut dgamma, mut dbeta, mut dbias) = (z(cfg.len()), z(cfg.len()), z(768), z(768), z(768));
/// let mut ws = Workspace::new();
/// let args = BackwardArgs {
///     d_s: Some(d_s.as_view()),
///     workspace: Some(&mut ws),
///     ..BackwardArgs::new(d_out.as_view(), st.as_view(), gamma.as_view(), mean.as_view(), rstd.as_view())
/// };
/// let outs = BackwardOut {
///     d_residual: Some(dres.as_view_mut()),
///     dbeta: Some(dbeta.as_view_mut()),
///     dbias: Some(dbias.as_view_mut()),
///     ..BackwardOut::new(dx.as_view_mut(), dgamma.as_view_mut())
/// };
/// dan::backward(&h, &cfg, args, outs)?;
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype, S: Dtype>(
    handle: &Handle,
    cfg: &Config,
    args: BackwardArgs<'_, T, S>,
    mut out: BackwardOut<'_, T, S>,
) -> Result<()> {
    let fam = kernels::<T, S>()?;
    check_backward(cfg, &backward_lens!(args, out))?;
    let t = args.tuning;
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let slabs = colsum_slab_count(rows);

    let (dgamma, _h0) = handle.write_ptr(OP, "dgamma", &mut out.dgamma)?;
    let (dbeta, _gdbeta) = handle.write_opt(OP, "dbeta", out.dbeta.as_mut())?;
    let (dbias, _gdbias) = handle.write_opt(OP, "dbias", out.dbias.as_mut())?;

    // [3][slabs][cols] f32 partials; every entry the colsum kernel reads is written first.
    let partial_len = slabs
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(3))
        .ok_or_else(|| Error::shape(OP, "column partials overflow"))?;
    let mut own = None;
    let mut view = args.workspace_view;
    let want = (partial_len > 0).then_some(partial_len);
    // SAFETY: the backward kernel writes every partial the colsum kernel reads.
    let (partials, part_guard) = unsafe {
        bind_partials(
            handle,
            OP,
            SIZE_QUERY,
            view.as_mut(),
            args.workspace,
            &mut own,
            want,
        )
    }?;

    if !cfg.is_empty() {
        let (d_out, _g0) = handle.read_ptr(OP, "d_out", &args.d_out)?;
        let (s, _g1) = handle.read_ptr(OP, "s", &args.s)?;
        let (gamma, _g2) = handle.read_ptr(OP, "gamma", &args.gamma)?;
        let (mean, _g3) = handle.read_ptr(OP, "mean", &args.mean)?;
        let (rstd, _g4) = handle.read_ptr(OP, "rstd", &args.rstd)?;
        let (d_s, _gds) = handle.read_opt(OP, "d_s", args.d_s.as_ref())?;
        let (rowscale, _grs) = handle.read_opt(OP, "rowscale", args.rowscale.as_ref())?;
        let (dx, _g5) = handle.write_ptr(OP, "dx", &mut out.dx)?;
        let (d_residual, _gdr) = handle.write_opt(OP, "d_residual", out.d_residual.as_mut())?;
        check_cols(cols)?;
        let vec = !t.force_scalar
            && cols % GROUP == 0
            && aligned16(&[d_out, d_s, s, gamma, dx, d_residual]);
        let rsf = row_scale_fields(cfg.drop_path(), rowscale);
        let keying = cfg.keying(T::KIND);
        let mut flags = rsf.flags | resolution_flag(OP, &keying, RESOLUTIONS)?;
        if vec {
            flags |= FLAG_VEC;
        }
        if cfg.norm() == Norm::RmsNorm {
            flags |= FLAG_RMS;
        }
        if dbeta != 0 {
            flags |= FLAG_DBETA;
        }
        if dbias != 0 {
            flags |= FLAG_DBIAS;
        }
        // A register tier when the row fits one and its column partials fit this device's
        // shared memory (the wanted arrays, one float4 pair per group and thread); else the
        // generic kernel, its slab partials in shared memory when they fit (same bits).
        let wide = S::KIND == DtypeKind::F32;
        let tiered = if vec && !t.generic {
            tier(cols, wide).and_then(|tr| {
                let kernel = fam.bwd_t[tr.index]?;
                let block = row_partials(cols) * tr.seg;
                let arrays = 1 + usize::from(dbeta != 0) + usize::from(dbias != 0);
                let smem = fit_smem(handle, kernel, arrays * 2 * tr.ngt * block * 16)?;
                Some((kernel, block, smem))
            })
        } else {
            None
        };
        let (kernel, block, smem) = match tiered {
            Some(k) => k,
            None => {
                let smem = if t.no_smem {
                    0
                } else {
                    generic_smem_bytes(cols, 3 * GROUP)
                        .and_then(|b| fit_smem(handle, fam.bwd, b))
                        .unwrap_or(0)
                };
                if smem > 0 {
                    flags |= FLAG_SMEM;
                }
                (fam.bwd, row_partials(cols), smem)
            }
        };
        let p = BwdParams {
            d_out,
            d_s,
            s,
            gamma,
            mean,
            rstd,
            rowscale,
            dx,
            d_residual,
            partials,
            rows: rows as u64,
            cols: cols as u64,
            slab_rows: colsum_slab_rows(rows) as u64,
            slabs: slabs as u64,
            seed: cfg.seed(),
            call: cfg.call(),
            threshold: keying.threshold(),
            path_call: rsf.path_call,
            path_threshold: rsf.path_threshold,
            scale: keying.scale(),
            path_scale: rsf.path_scale,
            layer_scale: cfg.layer_scale(),
            flags,
            rows_per_sample: rsf.rows_per_sample,
            pad: 0,
        };
        handle.launch(kernel, (slabs as u32, 1, 1), (block as u32, 1, 1), smem, &p)?;
    }

    let c = ColsumParams {
        partials,
        dgamma,
        dbeta,
        dbias,
        cols: cols as u64,
        slabs: slabs as u64,
    };
    // blockIdx.y: which gradient (a block whose output is not wanted exits at once); x: blocks of
    // 32 columns (grid-stride past 2^16 of them). 256 threads: the staging warps of
    // drop::dbias_finish.
    let grid = (cols as u64).div_ceil(32).clamp(1, 1 << 16) as u32;
    handle.launch(COLSUM.get::<T>(), (grid, 3, 1), (256, 1, 1), 0, &c)?;
    drop(part_guard);
    drop(own); // stream-ordered free after the kernels that use it
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Each (x type, stream type) pair gets its own kernels: the x type's with a stream of the
    /// x type, the `_sf32` ones with an f32 stream (f32 x: one set); the statistics t8 only for
    /// 16-bit streams.
    #[test]
    fn kernels_by_stream_type() {
        use Kernel as K;
        let f = kernels::<f32, f32>().unwrap();
        assert_eq!(
            (f.fwd, f.bwd),
            (K::DropoutAddNormFwdF32, K::DropoutAddNormBwdF32)
        );
        assert_eq!(f.fwd_t[0], Some(K::DropoutAddNormFwdT1F32));
        assert_eq!(f.bwd_t[3], Some(K::DropoutAddNormBwdT8F32));
        let f = kernels::<f16, f16>().unwrap();
        assert_eq!(
            (f.fwd, f.bwd),
            (K::DropoutAddNormFwdF16, K::DropoutAddNormBwdF16)
        );
        assert_eq!(f.fwd_t[1], Some(K::DropoutAddNormFwdT2F16));
        let f = kernels::<bf16, f32>().unwrap();
        assert_eq!(f.fwd, K::DropoutAddNormFwdBf16Sf32);
        assert_eq!(f.fwd_t[2], Some(K::DropoutAddNormFwdT4Bf16Sf32));
        assert_eq!(f.bwd_t[3], Some(K::DropoutAddNormBwdT8Bf16Sf32));
        let f = kernels::<f16, f32>().unwrap();
        assert_eq!(f.bwd, K::DropoutAddNormBwdF16Sf32);
        assert_eq!(f.bwd_t[0], Some(K::DropoutAddNormBwdT1F16Sf32));
        assert!(kernels::<f32, f16>().is_err());
        assert!(kernels::<f16, bf16>().is_err());

        let (g, t) = stats_kernels::<f32, f32>().unwrap();
        assert_eq!(g, K::DropoutAddNormFwdStatsF32);
        assert_eq!(t[2..], [Some(K::DropoutAddNormFwdStatsT4F32), None]);
        let (g, t) = stats_kernels::<bf16, bf16>().unwrap();
        assert_eq!(g, K::DropoutAddNormFwdStatsBf16);
        assert_eq!(t[3], Some(K::DropoutAddNormFwdStatsT8Bf16));
        let (g, t) = stats_kernels::<f16, f32>().unwrap();
        assert_eq!(g, K::DropoutAddNormFwdStatsF16Sf32);
        assert_eq!(
            t,
            [
                Some(K::DropoutAddNormFwdStatsT1F16Sf32),
                Some(K::DropoutAddNormFwdStatsT2F16Sf32),
                Some(K::DropoutAddNormFwdStatsT4F16Sf32),
                None,
            ]
        );
        assert_eq!(COLSUM.get::<bf16>(), K::DropoutAddNormColsumBf16);
    }

    /// Every vector-path row up to 8 groups per partial gets the smallest tier that holds it,
    /// with no thread holding more than two groups and at most 1024 threads per block.
    #[test]
    fn tiers_hold_the_row() {
        for cols in (8..=20008).step_by(8) {
            let (p, groups) = (row_partials(cols), cols / GROUP);
            let per = groups.div_ceil(p);
            for wide in [false, true] {
                let Some(t) = tier(cols, wide) else {
                    assert!(per > 8, "{cols} wide {wide}: no tier");
                    continue;
                };
                let ng = 1 << t.index;
                assert!(per <= ng && (ng == 1 || per > ng / 2), "{cols}: {t:?}");
                assert_eq!(t.ngt * t.seg, ng, "{cols}: {t:?}");
                assert!(t.ngt <= 2 && p * t.seg <= 1024, "{cols}: {t:?}");
                assert!(ng == 1 || p == 256, "{cols}: P = {p}");
                assert!(!wide || t.ngt == 1 || t.index == 3, "{cols}: {t:?}");
            }
        }
        assert_eq!(
            tier(4096, false).map(|t| (t.index, t.ngt, t.seg)),
            Some((1, 2, 1))
        );
        assert_eq!(
            tier(4096, true).map(|t| (t.index, t.ngt, t.seg)),
            Some((1, 1, 2))
        );
        assert_eq!(tier(16384, false).map(|t| (t.ngt, t.seg)), Some((2, 4)));
        assert_eq!(tier(8192, true).map(|t| (t.ngt, t.seg)), Some((1, 4)));
        assert_eq!(tier(8200, true).map(|t| (t.ngt, t.seg)), Some((2, 4)));
        assert_eq!(tier(16384, true).map(|t| (t.ngt, t.seg)), Some((2, 4)));
        assert_eq!(tier(16392, false), None);
        assert_eq!(tier(16392, true), None);
    }
}
