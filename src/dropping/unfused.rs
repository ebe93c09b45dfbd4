//! The unfused (PyTorch eager) dropout baseline's kernels, shared by every op's baseline, and
//! their CPU mirrors: bias add `t = T(x + b)`, dropout `d = keep ? T(t * scale) : 0` writing a
//! 1-byte mask (1 = kept; the fused ops' keying, so it equals their bitmask element for element),
//! masked scale `dx = mask ? T(dy * scale) : 0`, and the bias-gradient column sum of the rounded
//! `dx` (per-slab partials and their ordered sum: deterministic, the fused ops' partition). Each
//! op instantiates the kernels under its own stem (`<stem>_unfused_*` from the `unfused_*`
//! bodies of `kernels/common/dropping.cuh`) and passes its families here.

use cudarc::driver::{CudaSlice, DeviceRepr};

use super::gpu::{aligned16, finish_dbias, geometry, Slabs, FWD_SLAB_ROWS};
use super::{slab_rows, Keying, LaunchTuning};
use crate::dtype::Dtype;
use crate::error::{check_len, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::{Kernel, KernelFamily};
use crate::runtime::{grid_for, Handle};

device_params! {
    #[derive(Debug, Default)]
    struct BiasAddParams(56) {
        x: u64,
        bias: u64,
        t: u64,
        rows: u64,
        cols: u64,
        slab_rows: u64,
        vec: u32,
        pad: u32,
    }
}

device_params! {
    #[derive(Debug, Default)]
    struct DropoutParams(64) {
        t: u64,
        d: u64,
        mask: u64,
        n: u64,
        seed: u64,
        call: u64,
        threshold: u64,
        scale: f32,
        vec: u32,
    }
}

device_params! {
    #[derive(Debug, Default)]
    struct MaskedScaleParams(40) {
        dy: u64,
        mask: u64,
        dx: u64,
        n: u64,
        scale: f32,
        vec: u32,
    }
}

device_params! {
    #[derive(Debug, Default)]
    struct ColSumParams(48) {
        dx: u64,
        partials: u64,
        rows: u64,
        cols: u64,
        slab_rows: u64,
        vec: u32,
        pad: u32,
    }
}

/// Threads per block of the flat baseline kernels.
pub(crate) const BLOCK: u32 = 256;

/// An op's instantiation of the baseline kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UnfusedKernels {
    pub bias_add: KernelFamily,
    pub dropout: KernelFamily,
    pub masked_scale: KernelFamily,
    pub col_sum: KernelFamily,
    pub dbias: KernelFamily,
}

/// Launches the flat elementwise kernel `k` of `T` over `n` (non-empty) elements: one thread per
/// 16-byte group.
pub(crate) fn launch_flat<T: Dtype, P: DeviceRepr>(
    h: &Handle,
    k: Kernel,
    n: usize,
    params: &P,
) -> Result<()> {
    let groups = (n as u64).div_ceil(vec_len::<T>() as u64);
    h.launch(k, (grid_for(groups, BLOCK), 1, 1), (BLOCK, 1, 1), 0, params)
}

/// Elements of `T` in one 16-byte group.
fn vec_len<T: Dtype>() -> usize {
    16 / T::KIND.size()
}

/// Whether a flat kernel over the elements at `ptrs` and the byte mask at `mask` takes its
/// 16-byte path (1) or its scalar one (0): every element pointer 16-byte aligned and the mask at
/// a whole group's offset.
fn vectorized<T: Dtype>(ptrs: &[u64], mask: u64) -> u32 {
    u32::from(aligned16(ptrs) && mask % vec_len::<T>() as u64 == 0)
}

/// The lengths of a baseline's masked backward over `n` elements of `cols` columns: `dy`, the
/// byte mask, `dx`, and `dbias` (one per column) when asked for.
pub(crate) fn check_masked_backward(
    op: &'static str,
    (n, cols): (usize, usize),
    dy: usize,
    mask: usize,
    dx: usize,
    dbias: Option<usize>,
) -> Result<()> {
    check_len(op, "dy", dy, n)?;
    check_len(op, "mask (bytes)", mask, n)?;
    check_len(op, "dx", dx, n)?;
    if let Some(b) = dbias {
        check_len(op, "dbias (one per column)", b, cols)?;
    }
    Ok(())
}

/// Returns a buffer of at least `len` elements, reallocating (stream-ordered) when too small:
/// the baseline keeps its intermediates between calls, as a framework's caching allocator does.
pub(crate) fn ensure<'a, E: DeviceRepr>(
    handle: &Handle,
    op: &'static str,
    slot: &'a mut Option<CudaSlice<E>>,
    len: usize,
) -> Result<&'a mut CudaSlice<E>> {
    // SAFETY: every element a baseline kernel reads was written by an earlier kernel of the call.
    unsafe { handle.scratch(op, slot, len) }
}

fn plain_tuning() -> LaunchTuning {
    LaunchTuning {
        unroll: false,
        ..Default::default()
    }
}

/// `t = T(x + bias[col])` over `[rows, cols]` (non-empty).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_bias_add<T: Dtype>(
    h: &Handle,
    k: &UnfusedKernels,
    x: u64,
    bias: u64,
    t: u64,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let g = geometry::<T>(
        rows,
        cols,
        aligned16(&[x, bias, t]),
        true,
        Slabs::Free(FWD_SLAB_ROWS),
        &plain_tuning(),
    )?;
    let p = BiasAddParams {
        x,
        bias,
        t,
        rows: g.rows,
        cols: g.cols,
        slab_rows: g.slab_rows,
        vec: u32::from(g.vector),
        pad: 0,
    };
    h.launch(k.bias_add.get::<T>(), g.grid, g.block, 0, &p)
}

/// `d = keep ? T(t * scale) : 0` and the byte mask over `n` (non-empty) elements.
pub(crate) fn launch_dropout<T: Dtype>(
    h: &Handle,
    k: &UnfusedKernels,
    keying: &Keying,
    t: u64,
    d: u64,
    mask: u64,
    n: usize,
) -> Result<()> {
    let rate = keying.rate();
    let p = DropoutParams {
        t,
        d,
        mask,
        n: n as u64,
        seed: keying.seed(),
        call: keying.call(),
        threshold: rate.threshold(),
        scale: rate.scale(),
        vec: vectorized::<T>(&[t, d], mask),
    };
    launch_flat::<T, _>(h, k.dropout.get::<T>(), n, &p)
}

/// `dx = mask ? T(dy * scale) : 0` over `n` (non-empty) elements.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_masked_scale<T: Dtype>(
    h: &Handle,
    k: &UnfusedKernels,
    scale: f32,
    dy: u64,
    mask: u64,
    dx: u64,
    n: usize,
) -> Result<()> {
    let p = MaskedScaleParams {
        dy,
        mask,
        dx,
        n: n as u64,
        scale,
        vec: vectorized::<T>(&[dy, dx], mask),
    };
    launch_flat::<T, _>(h, k.masked_scale.get::<T>(), n, &p)
}

/// `dbias = column sums of dx` over `[rows, cols]` (non-empty), through the partials in `slot`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_col_sum<T: Dtype>(
    h: &Handle,
    k: &UnfusedKernels,
    op: &'static str,
    slot: &mut Option<CudaSlice<f32>>,
    dx: u64,
    dbias: u64,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let g = geometry::<T>(
        rows,
        cols,
        aligned16(&[dx]),
        true,
        Slabs::Dbias,
        &plain_tuning(),
    )?;
    let slabs = g.grid.1 as usize;
    let part = ensure(h, op, slot, slabs * cols)?;
    let (part_ptr, _g) = h.write_ptr(op, "partials", part)?;
    let p = ColSumParams {
        dx,
        partials: part_ptr,
        rows: g.rows,
        cols: g.cols,
        slab_rows: g.slab_rows,
        vec: u32::from(g.vector),
        pad: 0,
    };
    h.launch(k.col_sum.get::<T>(), g.grid, g.block, 0, &p)?;
    finish_dbias::<T>(h, k.dbias, part_ptr, dbias, cols, slabs)
}

/// CPU mirror of the bias add: `T(x + b[col])`.
#[inline]
pub(crate) fn bias_add_cpu<T: Dtype>(x: T, b: T) -> T {
    T::from_f32_rn(x.to_f32() + b.to_f32())
}

/// CPU mirror of the dropout kernel on one element: `keep ? T(t * scale) : 0`.
#[inline]
pub(crate) fn dropout_cpu<T: Dtype>(t: T, keep: bool, scale: f32) -> T {
    if keep {
        T::from_f32_rn(t.to_f32() * scale)
    } else {
        T::from_f32_rn(0.0)
    }
}

/// CPU mirror of the column sum: `dbias[col] = T(sum over slabs of (sum over the slab's rows of
/// dx))`, sequential f32 sums in row and slab order.
pub(crate) fn col_sum_cpu<T: Dtype>(dx: &[T], rows: usize, cols: usize, dbias: &mut [T]) {
    let slab = slab_rows(rows, cols, T::KIND);
    let mut total = vec![0.0f32; cols];
    let mut partial = vec![0.0f32; cols];
    for row in 0..rows {
        for (col, p) in partial.iter_mut().enumerate() {
            *p += dx[row * cols + col].to_f32();
        }
        if (row + 1) % slab == 0 || row + 1 == rows {
            for (t, p) in total.iter_mut().zip(partial.iter_mut()) {
                *t += *p;
                *p = 0.0;
            }
        }
    }
    for (d, t) in dbias.iter_mut().zip(&total) {
        *d = T::from_f32_rn(*t);
    }
}
