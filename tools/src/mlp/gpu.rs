//! Launch wrappers for `tools/kernels/mlp.cu` and the cuBLAS linear layers of the MLP.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{colsum_slab_rows, rows_of, MSE_PER_BLOCK};
use crate::kernels::{self, check_len, grid_for, kernel_params, Kernel, BLOCK};
use fusedreg::{Error, Handle, Result};

const OP: &str = "mlp";

/// `a * b`, or an error naming `what` when it overflows.
fn product(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::shape(OP, format!("{what}: {a} x {b} overflows")))
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

kernel_params! {
    struct BiasGeluParams(48) { h: u64, bias: u64, out: u64, da: u64, rows: u64, cols: u64 }
}
kernel_params! {
    struct ColsumParams(48) { x: u64, partials: u64, out: u64, rows: u64, cols: u64, slab_rows: u64 }
}
kernel_params! {
    struct MseParams(48) { y: u64, target: u64, dy: u64, partials: u64, n: u64, scale: f32, pad: f32 }
}

/// `out = gelu(h + bias[col])` (forward) over row-major `[rows, cols]`.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{Error, Handle};
/// use fusedreg_tools::mlp::{gelu, gpu::bias_gelu_fwd};
/// let h = Handle::new(0)?;
/// let s = h.stream();
/// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
/// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
/// let (pre, bias, mut out) = (up(&[0.5; 8])?, up(&[0.25; 4])?, zeros(8)?); // [2, 4]
/// bias_gelu_fwd(&h, &pre, &bias, &mut out)?;
/// let host = s.clone_dtoh(&out).map_err(Error::driver("dtoh"))?;
/// assert!((host[0] - gelu(0.75)).abs() < 1e-5); // device tanhf: a few ulps from libm
/// # Ok(()) }
/// ```
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
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{Error, Handle};
/// use fusedreg_tools::mlp::{gelu_grad, gpu::bias_gelu_bwd};
/// let h = Handle::new(0)?;
/// let s = h.stream();
/// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
/// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
/// let (pre, bias, da, mut out) = (up(&[0.5; 8])?, up(&[0.0; 4])?, up(&[2.0; 8])?, zeros(8)?);
/// bias_gelu_bwd(&h, &pre, &bias, &da, &mut out)?;
/// let host = s.clone_dtoh(&out).map_err(Error::driver("dtoh"))?;
/// assert!((host[5] - 2.0 * gelu_grad(0.5)).abs() < 1e-5); // tanhf vs libm: a few ulps
/// # Ok(()) }
/// ```
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
    kernels::launch(handle, k, (grid_for(n as u64, BLOCK), 1, 1), &p)
}

/// Column sums of row-major `[rows, cols]` into `out` (deterministic, bit-exact with
/// [`super::cpu::colsum`]). `partials` is scratch of at least [`colsum_scratch_len`] floats.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{Error, Handle};
/// use fusedreg_tools::mlp::{cpu, gpu};
/// let h = Handle::new(0)?;
/// let s = h.stream();
/// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
/// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
/// let (rows, cols) = (300, 7);
/// let x: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 - 6.0).collect();
/// let (dx, mut scratch, mut out) = (up(&x)?, zeros(gpu::colsum_scratch_len(rows, cols))?, zeros(cols)?);
/// gpu::colsum(&h, &dx, rows, &mut scratch, &mut out)?;
/// let sums = s.clone_dtoh(&out).map_err(Error::driver("dtoh"))?;
/// assert_eq!(sums, cpu::colsum(&x, rows, cols)?); // bit for bit
/// # Ok(()) }
/// ```
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
    if cols == 0 {
        return Ok(());
    }
    if rows == 0 {
        // The sum over no rows is 0 in every column, as the CPU reference returns.
        return handle.stream().memset_zeros(out).map_err(Error::driver(OP));
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
    kernels::launch(handle, Kernel::MlpColsumPartialF32, (gx, slabs, 1), &p)?;
    kernels::launch(handle, Kernel::MlpColsumFinalF32, (gx, 1, 1), &p)
}

/// Scratch floats [`colsum`] needs (saturating at `usize::MAX` when that does not fit).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::gpu::colsum_scratch_len;
/// // One partial per column for each slab of rows; the slab size depends on `rows` only.
/// assert_eq!(colsum_scratch_len(4096, 1024), 64 * 1024); // 64 slabs of 64 rows
/// assert_eq!(colsum_scratch_len(1, 5), 5);
/// assert_eq!(colsum_scratch_len(0, 5), 0);
/// assert_eq!(colsum_scratch_len(2, usize::MAX), usize::MAX); // saturates, never wraps
/// ```
pub fn colsum_scratch_len(rows: usize, cols: usize) -> usize {
    // Saturates: a length no buffer can have, so `colsum` refuses the shape instead of wrapping.
    ((rows as u64).div_ceil(colsum_slab_rows(rows)) as usize).saturating_mul(cols)
}

/// Scratch floats [`mse_grad`] needs for its per-block partial sums.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::gpu::mse_scratch_len;
/// assert_eq!(mse_scratch_len(4096), 1); // 4096 elements per block
/// assert_eq!(mse_scratch_len(4097), 2);
/// assert_eq!(mse_scratch_len(1024 * 4096), 1024);
/// ```
pub fn mse_scratch_len(n: usize) -> usize {
    n.div_ceil(MSE_PER_BLOCK)
}

/// `dy = (2 / n)(y - target)` and per-block partial sums of `(y - target)^2` in `partials`
/// (sum them in order and divide by n for the loss: [`mse_from_partials`]).
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{Error, Handle};
/// use fusedreg_tools::mlp::gpu;
/// let h = Handle::new(0)?;
/// let s = h.stream();
/// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
/// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
/// let n = 10_000;
/// let (y, target) = (up(&vec![1.0; n])?, up(&vec![0.5; n])?);
/// let (mut dy, mut partials) = (zeros(n)?, zeros(gpu::mse_scratch_len(n))?);
/// gpu::mse_grad(&h, &y, &target, &mut dy, &mut partials)?; // no sync
/// assert_eq!(gpu::mse_from_partials(&h, &partials, n)?, 0.25);
/// # Ok(()) }
/// ```
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
    if n == 0 {
        // As the CPU reference (`cpu::mse_grad`): there is no loss to take a gradient of.
        return Err(Error::invalid(OP, "the MSE of nothing is undefined"));
    }
    if partials.len() < mse_scratch_len(n) {
        return Err(Error::shape(OP, "mse scratch too small"));
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
    let grid = grid_dim(mse_scratch_len(n))?;
    kernels::launch(handle, Kernel::MlpMseGradF32, (grid, 1, 1), &p)
}

/// The loss from the partials [`mse_grad`] wrote (reads them back: a sync).
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{Error, Handle};
/// use fusedreg_tools::mlp::gpu;
/// let h = Handle::new(0)?;
/// let s = h.stream();
/// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
/// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
/// let (y, target, mut dy) = (up(&[3.0, 1.0])?, up(&[1.0, 1.0])?, zeros(2)?);
/// let mut partials = zeros(gpu::mse_scratch_len(2))?;
/// gpu::mse_grad(&h, &y, &target, &mut dy, &mut partials)?;
/// assert_eq!(gpu::mse_from_partials(&h, &partials, 2)?, 2.0); // (2^2 + 0) / 2
/// assert!(gpu::mse_from_partials(&h, &partials, 1 << 20).is_err()); // too few partials
/// assert!(gpu::mse_from_partials(&h, &partials, 0).is_err()); // the MSE of nothing
/// # Ok(()) }
/// ```
pub fn mse_from_partials(handle: &Handle, partials: &CudaSlice<f32>, n: usize) -> Result<f64> {
    if n == 0 {
        // As the CPU reference: 0 / 0 would be a NaN loss.
        return Err(Error::invalid(OP, "the MSE of nothing is undefined"));
    }
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
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{Error, Handle};
/// use fusedreg_tools::mlp::gpu::Blas;
/// let h = Handle::new(0)?;
/// let s = h.stream();
/// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
/// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
/// let blas = Blas::new(&h)?;
/// let (x, w, mut y) = (up(&[1.0, 2.0])?, up(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])?, zeros(3)?);
/// blas.linear_fwd(&x, &w, &mut y, 2, 3)?; // [1, 2] · [3, 2]^T
/// assert_eq!(s.clone_dtoh(&y).map_err(Error::driver("dtoh"))?, vec![1.0, 2.0, 3.0]);
/// # Ok(()) }
/// ```
pub struct Blas {
    blas: CudaBlas,
    gemms: std::cell::Cell<u64>,
}

impl Blas {
    /// Creates a cuBLAS handle on `handle`'s stream. Fails with a clear error when libcublas
    /// cannot be loaded.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let blas = fusedreg_tools::mlp::gpu::Blas::new(&h)?; // its products run on h.stream()
    /// assert_eq!(blas.gemm_count(), 0);
    /// # Ok(()) }
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{Error, Handle};
    /// use fusedreg_tools::mlp::gpu::Blas;
    /// let h = Handle::new(0)?;
    /// let s = h.stream();
    /// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
    /// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
    /// let blas = Blas::new(&h)?;
    /// let (x, w, mut y) = (up(&[1.0; 8])?, up(&[1.0; 4])?, zeros(8)?);
    /// blas.linear_fwd(&x, &w, &mut y, 2, 2)?;
    /// assert!(blas.linear_fwd(&x, &w, &mut y, 3, 2).is_err()); // refused before cuBLAS
    /// assert_eq!(blas.gemm_count(), 1);
    /// # Ok(()) }
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{Error, Handle};
    /// use fusedreg_tools::mlp::{cpu, gpu::Blas};
    /// let h = Handle::new(0)?;
    /// let s = h.stream();
    /// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
    /// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
    /// let blas = Blas::new(&h)?;
    /// let (x, w): (Vec<f32>, Vec<f32>) = ((0..12).map(|i| i as f32).collect(), vec![0.5; 8]);
    /// let (mut y, mut want) = (zeros(6)?, vec![0.0; 6]); // x [3, 4] · w [2, 4]^T = y [3, 2]
    /// blas.linear_fwd(&up(&x)?, &up(&w)?, &mut y, 4, 2)?;
    /// cpu::linear_fwd(&x, &w, &mut want, 4, 2)?;
    /// assert_eq!(s.clone_dtoh(&y).map_err(Error::driver("dtoh"))?, want); // exact here
    /// assert!(blas.linear_fwd(&up(&x)?, &up(&w)?, &mut y, 3, 2).is_err()); // w is not [2, 3]
    /// # Ok(()) }
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{Error, Handle};
    /// use fusedreg_tools::mlp::gpu::Blas;
    /// let h = Handle::new(0)?;
    /// let s = h.stream();
    /// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
    /// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
    /// let blas = Blas::new(&h)?;
    /// let (dy, w) = (up(&[1.0, 1.0, 1.0])?, up(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])?);
    /// let mut dx = up(&[10.0, 10.0])?;
    /// blas.linear_bwd_input(&dy, &w, &mut dx, 2, 3, true)?; // dx += dy · w
    /// assert_eq!(s.clone_dtoh(&dx).map_err(Error::driver("dtoh"))?, vec![12.0, 12.0]);
    /// # let _ = zeros;
    /// # Ok(()) }
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{Error, Handle};
    /// use fusedreg_tools::mlp::gpu::Blas;
    /// let h = Handle::new(0)?;
    /// let s = h.stream();
    /// let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver("htod"));
    /// let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver("alloc"));
    /// let blas = Blas::new(&h)?;
    /// let (dy, x, mut dw) = (up(&[1.0, 2.0, 3.0])?, up(&[1.0, 2.0])?, zeros(6)?);
    /// blas.linear_bwd_weight(&dy, &x, &mut dw, 2, 3)?; // [3, 2] = dy^T · x
    /// let host = s.clone_dtoh(&dw).map_err(Error::driver("dtoh"))?;
    /// assert_eq!(host, vec![1.0, 2.0, 2.0, 4.0, 3.0, 6.0]);
    /// # Ok(()) }
    /// ```
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
