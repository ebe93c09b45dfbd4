//! Launch wrappers for `kernels/mlp.cu` and the cuBLAS linear layers of the MLP.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};

use super::{colsum_slab_rows, MSE_PER_BLOCK};
use crate::error::{check_len, Error, Result};
use crate::runtime::kernels::Kernel;
use crate::runtime::{grid_for, Handle};

const OP: &str = "mlp";
const BLOCK: u32 = 256;

/// `a * b`, or an error naming `what` when it overflows.
fn product(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::shape(OP, format!("{what}: {a} x {b} overflows")))
}

/// Rows of a row-major buffer of `len` elements and `width` columns (both checked).
fn rows_of(what: &str, len: usize, width: usize) -> Result<usize> {
    if width == 0 || len % width != 0 {
        return Err(Error::shape(
            OP,
            format!("{what} has {len} elements: not whole rows of {width}"),
        ));
    }
    Ok(len / width)
}

/// A matrix dimension as cuBLAS's 32-bit int.
fn dim(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::shape(OP, format!("{what} = {v} exceeds cuBLAS's 32-bit sizes")))
}

/// A grid dimension (at most 2^31 - 1 blocks).
fn grid_dim(blocks: usize) -> Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(OP, format!("{blocks} blocks exceed the grid limit")))
}

#[repr(C)]
#[derive(Clone, Copy)]
struct BiasGeluParams {
    h: u64,
    bias: u64,
    out: u64,
    da: u64,
    rows: u64,
    cols: u64,
}
const _: () = assert!(std::mem::size_of::<BiasGeluParams>() == 48);
// SAFETY: plain old data, layout asserted on both sides.
unsafe impl DeviceRepr for BiasGeluParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct ColsumParams {
    x: u64,
    partials: u64,
    out: u64,
    rows: u64,
    cols: u64,
    slab_rows: u64,
}
const _: () = assert!(std::mem::size_of::<ColsumParams>() == 48);
// SAFETY: as above.
unsafe impl DeviceRepr for ColsumParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct MseParams {
    y: u64,
    target: u64,
    dy: u64,
    partials: u64,
    n: u64,
    scale: f32,
    pad: f32,
}
const _: () = assert!(std::mem::size_of::<MseParams>() == 48);
// SAFETY: as above.
unsafe impl DeviceRepr for MseParams {}

/// `out = gelu(h + bias[col])` (forward) over row-major `[rows, cols]`.
pub fn bias_gelu_fwd(
    handle: &Handle,
    h: &impl DevicePtr<f32>,
    bias: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    bias_gelu(
        handle,
        Kernel::MlpBiasGeluFwdF32,
        h,
        bias,
        None::<&CudaSlice<f32>>,
        out,
    )
}

/// `out = da * gelu'(h + bias[col])` (backward).
pub fn bias_gelu_bwd(
    handle: &Handle,
    h: &impl DevicePtr<f32>,
    bias: &impl DevicePtr<f32>,
    da: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    bias_gelu(handle, Kernel::MlpBiasGeluBwdF32, h, bias, Some(da), out)
}

fn bias_gelu(
    handle: &Handle,
    k: Kernel,
    h: &impl DevicePtr<f32>,
    bias: &impl DevicePtr<f32>,
    da: Option<&impl DevicePtr<f32>>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let (n, cols) = (h.len(), bias.len());
    if cols == 0 || n % cols != 0 {
        return Err(Error::shape(
            OP,
            format!("{n} elements are not rows of {cols} columns"),
        ));
    }
    check_len(OP, "out", out.len(), n)?;
    if let Some(da) = da {
        check_len(OP, "da", da.len(), n)?;
    }
    let (hp, _g1) = handle.read_ptr(OP, "h", h)?;
    let (bp, _g2) = handle.read_ptr(OP, "bias", bias)?;
    let (dap, _g3) = match da {
        Some(da) => {
            let (p, g) = handle.read_ptr(OP, "da", da)?;
            (p, Some(g))
        }
        None => (0, None),
    };
    let (op, _g4) = handle.write_ptr(OP, "out", out)?;
    let p = BiasGeluParams {
        h: hp,
        bias: bp,
        out: op,
        da: dap,
        rows: (n / cols) as u64,
        cols: cols as u64,
    };
    handle.launch(k, (grid_for(n as u64, BLOCK), 1, 1), (BLOCK, 1, 1), 0, &p)
}

/// Column sums of row-major `[rows, cols]` into `out` (deterministic, bit-exact with
/// [`super::cpu::colsum`]). `partials` is scratch of at least [`colsum_scratch_len`] floats.
pub fn colsum(
    handle: &Handle,
    x: &impl DevicePtr<f32>,
    rows: usize,
    partials: &mut impl DevicePtrMut<f32>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let cols = out.len();
    check_len(OP, "x", x.len(), product("x", rows, cols)?)?;
    if partials.len() < colsum_scratch_len(rows, cols) {
        return Err(Error::shape(OP, "colsum scratch too small"));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let slab = colsum_slab_rows(rows);
    let slabs = (rows as u64).div_ceil(slab) as u32;
    let (xp, _g1) = handle.read_ptr(OP, "x", x)?;
    let (pp, _g2) = handle.write_ptr(OP, "partials", partials)?;
    let (op, _g3) = handle.write_ptr(OP, "out", out)?;
    let p = ColsumParams {
        x: xp,
        partials: pp,
        out: op,
        rows: rows as u64,
        cols: cols as u64,
        slab_rows: slab,
    };
    let gx = grid_dim(cols.div_ceil(BLOCK as usize))?;
    handle.launch(
        Kernel::MlpColsumPartialF32,
        (gx, slabs, 1),
        (BLOCK, 1, 1),
        0,
        &p,
    )?;
    handle.launch(Kernel::MlpColsumFinalF32, (gx, 1, 1), (BLOCK, 1, 1), 0, &p)
}

/// Scratch floats [`colsum`] needs.
pub fn colsum_scratch_len(rows: usize, cols: usize) -> usize {
    (rows as u64).div_ceil(colsum_slab_rows(rows)) as usize * cols
}

/// Scratch floats [`mse_grad`] needs for its per-block partial sums.
pub fn mse_scratch_len(n: usize) -> usize {
    n.div_ceil(MSE_PER_BLOCK)
}

/// `dy = (2 / n)(y - target)` and per-block partial sums of `(y - target)^2` in `partials`
/// (sum them in order and divide by n for the loss: [`mse_from_partials`]).
pub fn mse_grad(
    handle: &Handle,
    y: &impl DevicePtr<f32>,
    target: &impl DevicePtr<f32>,
    dy: &mut impl DevicePtrMut<f32>,
    partials: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let n = y.len();
    check_len(OP, "target", target.len(), n)?;
    check_len(OP, "dy", dy.len(), n)?;
    if partials.len() < mse_scratch_len(n) {
        return Err(Error::shape(OP, "mse scratch too small"));
    }
    if n == 0 {
        return Ok(());
    }
    let (yp, _g1) = handle.read_ptr(OP, "y", y)?;
    let (tp, _g2) = handle.read_ptr(OP, "target", target)?;
    let (dp, _g3) = handle.write_ptr(OP, "dy", dy)?;
    let (pp, _g4) = handle.write_ptr(OP, "partials", partials)?;
    let p = MseParams {
        y: yp,
        target: tp,
        dy: dp,
        partials: pp,
        n: n as u64,
        scale: 2.0 / n as f32,
        pad: 0.0,
    };
    handle.launch(
        Kernel::MlpMseGradF32,
        (grid_dim(mse_scratch_len(n))?, 1, 1),
        (256, 1, 1),
        0,
        &p,
    )
}

/// The loss from the partials [`mse_grad`] wrote (reads them back: a sync).
pub fn mse_from_partials(handle: &Handle, partials: &CudaSlice<f32>, n: usize) -> Result<f64> {
    if partials.len() < mse_scratch_len(n) {
        return Err(Error::shape(
            OP,
            "mse partials shorter than mse_scratch_len(n)",
        ));
    }
    let host = handle
        .stream()
        .clone_dtoh(&partials.slice(0..mse_scratch_len(n)))
        .map_err(Error::driver(OP))?;
    Ok(host.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64)
}

/// Linear layers through cuBLAS on the handle's stream (row-major, `y = x · W^T`). Shapes are
/// checked (whole rows, no overflow, cuBLAS's 32-bit sizes) and errors returned, never panics.
pub struct Blas {
    blas: CudaBlas,
    gemms: std::cell::Cell<u64>,
}

impl Blas {
    /// Creates a cuBLAS handle on `handle`'s stream. Fails with a clear error when libcublas
    /// cannot be loaded.
    pub fn new(handle: &Handle) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublas (cudarc panics later if it is missing).
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::invalid(
                OP,
                "libcublas.so could not be loaded: install the CUDA 13 cuBLAS library (or add it to LD_LIBRARY_PATH)",
            ));
        }
        let blas = CudaBlas::new(Arc::clone(handle.stream()))
            .map_err(|e| Error::invalid(OP, format!("cuBLAS: {e}")))?;
        Ok(Blas {
            blas,
            gemms: std::cell::Cell::new(0),
        })
    }

    /// Matrix products cuBLAS accepted so far.
    pub fn gemm_count(&self) -> u64 {
        self.gemms.get()
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (transa, transb): (Op, Op),
        (m, n, k): (i32, i32, i32),
        (lda, ldb, ldc): (i32, i32, i32),
        beta: f32,
        a: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        c: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let cfg = GemmConfig {
            transa,
            transb,
            m,
            n,
            k,
            alpha: 1.0,
            lda,
            ldb,
            beta,
            ldc,
        };
        // SAFETY: the callers derive every dimension from checked buffer lengths.
        unsafe { self.blas.gemm(cfg, a, b, c) }
            .map_err(|e| Error::invalid(OP, format!("cuBLAS sgemm: {e}")))?;
        self.gemms.set(self.gemms.get() + 1);
        Ok(())
    }

    /// `y[T, out] = x[T, inp] · w[out, inp]^T`.
    pub fn linear_fwd(
        &self,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
        inp: usize,
        out: usize,
    ) -> Result<()> {
        let t = rows_of("x", x.len(), inp)?;
        check_len(OP, "w", w.len(), product("w", out, inp)?)?;
        check_len(OP, "y", y.len(), product("y", t, out)?)?;
        let (t, i, o) = (dim("tokens", t)?, dim("inp", inp)?, dim("out", out)?);
        self.gemm(
            (Op::CUBLAS_OP_T, Op::CUBLAS_OP_N),
            (o, t, i),
            (i, i, o),
            0.0,
            w,
            x,
            y,
        )
    }

    /// `dx[T, inp] = dy[T, out] · w[out, inp]` (`+ dx` when `accumulate`).
    pub fn linear_bwd_input(
        &self,
        dy: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        dx: &mut impl DevicePtrMut<f32>,
        inp: usize,
        out: usize,
        accumulate: bool,
    ) -> Result<()> {
        let t = rows_of("dy", dy.len(), out)?;
        check_len(OP, "w", w.len(), product("w", out, inp)?)?;
        check_len(OP, "dx", dx.len(), product("dx", t, inp)?)?;
        let (t, i, o) = (dim("tokens", t)?, dim("inp", inp)?, dim("out", out)?);
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.gemm(
            (Op::CUBLAS_OP_N, Op::CUBLAS_OP_N),
            (i, t, o),
            (i, o, i),
            beta,
            w,
            dy,
            dx,
        )
    }

    /// `dw[out, inp] = dy[T, out]^T · x[T, inp]`.
    pub fn linear_bwd_weight(
        &self,
        dy: &impl DevicePtr<f32>,
        x: &impl DevicePtr<f32>,
        dw: &mut impl DevicePtrMut<f32>,
        inp: usize,
        out: usize,
    ) -> Result<()> {
        let t = rows_of("dy", dy.len(), out)?;
        check_len(OP, "x", x.len(), product("x", t, inp)?)?;
        check_len(OP, "dw", dw.len(), product("dw", out, inp)?)?;
        let (t, i, o) = (dim("tokens", t)?, dim("inp", inp)?, dim("out", out)?);
        self.gemm(
            (Op::CUBLAS_OP_N, Op::CUBLAS_OP_T),
            (i, o, t),
            (i, o, i),
            0.0,
            x,
            dy,
            dw,
        )
    }
}
