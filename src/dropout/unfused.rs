//! The unfused baseline, the way PyTorch eager runs `dropout(x + bias)` and `residual +
//! dropout(x + bias)`, and its CPU mirror. The benchmarks compare the fused op with this.
//!
//! Forward, one kernel per op, each reading its inputs from and writing its output to device
//! memory in `T`: bias add `t = T(x + b)` (skipped without bias), dropout `d = keep ? T(t *
//! scale) : 0` writing a 1-byte mask (1 = kept), and with a residual the residual add `y = T(r +
//! d)`. Backward: masked scale `dx = mask ? T(dy * scale) : 0`, then a separate bias-gradient
//! column sum of the rounded `dx` (per-slab partials and their ordered sum, the fused op's
//! partition: deterministic, no atomics). The kernels are the shared eager ones of
//! `kernels/common/dropping.cuh` plus the residual add, instantiated in `kernels/dropout.cu`.
//!
//! The mask uses the fused op's Philox keying (32-bit only), so the byte mask equals the fused
//! bitmask element for element. Because every kernel rounds to `T`, the results with a bias or a
//! residual are not bitwise equal to the fused op in 16-bit types: [`forward_cpu`] and
//! [`backward_cpu`] mirror this path exactly (the GPU tests compare with them bit for bit), and
//! the CPU tests bound their distance from the fused reference. No drop path or row scale:
//! frameworks (timm, torchvision) apply those as a separate multiply.
//!
//! ```no_run
//! use fusedreg::dropout::{unfused::Unfused, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let h = fusedreg::Handle::new(0)?;
//! let cfg = Config::new(16, 64, 0.1, 42, 7)?;
//! let s = h.stream();
//! let x = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
//! let r = x.clone();
//! let mut y = s.alloc_zeros::<f32>(cfg.len()).unwrap();
//! let mut mask = s.alloc_zeros::<u8>(cfg.len()).unwrap();
//! let mut baseline = Unfused::<f32>::new(&h);
//! baseline.forward(&cfg, &x, None, None, &mut y, &mut mask)?; // y = dropout(x)
//! baseline.forward(&cfg, &x, None, Some(r.as_view()), &mut y, &mut mask)?; // y = r + dropout(x)
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::gpu::ADD;
use super::{Config, OP};
use crate::dropping::gpu::aligned16;
use crate::dropping::unfused::{
    bias_add_cpu, check_masked_backward, col_sum_cpu, dropout_cpu, ensure, launch_bias_add,
    launch_col_sum, launch_dropout, launch_flat, launch_masked_scale, UnfusedKernels,
};
use crate::dropping::Keying;
use crate::dtype::Dtype;
use crate::error::{check_len, Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::per_dtype;
use crate::runtime::Handle;

device_params! {
    /// Mirrors `dropout::UnfusedAddParams<T>` in the kernel.
    #[derive(Debug, Default)]
    struct AddParams(40) {
        a: u64,
        b: u64,
        out: u64,
        n: u64,
        vec: u32,
        pad: u32,
    }
}

const UNFUSED: UnfusedKernels = UnfusedKernels {
    bias_add: per_dtype!(
        DropoutUnfusedBiasAddF32,
        DropoutUnfusedBiasAddF16,
        DropoutUnfusedBiasAddBf16
    ),
    dropout: per_dtype!(
        DropoutUnfusedDropoutF32,
        DropoutUnfusedDropoutF16,
        DropoutUnfusedDropoutBf16
    ),
    masked_scale: per_dtype!(
        DropoutUnfusedMaskedScaleF32,
        DropoutUnfusedMaskedScaleF16,
        DropoutUnfusedMaskedScaleBf16
    ),
    col_sum: per_dtype!(
        DropoutUnfusedColSumF32,
        DropoutUnfusedColSumF16,
        DropoutUnfusedColSumBf16
    ),
    dbias: per_dtype!(DropoutDbiasF32, DropoutDbiasF16, DropoutDbiasBf16),
};

/// Refuses what the baseline does not implement and returns its keying: 32-bit keys for every
/// dtype (an explicit other resolution is an error, see `Config::keying_bits32`).
fn no_row_scale(cfg: &Config) -> Result<Keying> {
    let keying = cfg.keying_bits32(OP)?;
    if cfg.drop_path().is_some() {
        return Err(Error::invalid(
            OP,
            "the unfused baseline has no drop path (frameworks apply it as a separate multiply)",
        ));
    }
    Ok(keying)
}

fn check_forward_lens(
    cfg: &Config,
    x: usize,
    bias: Option<usize>,
    residual: Option<usize>,
    y: usize,
    mask: usize,
) -> Result<()> {
    let n = cfg.len();
    check_len(OP, "x", x, n)?;
    if let Some(r) = residual {
        check_len(OP, "residual", r, n)?;
    }
    check_len(OP, "y", y, n)?;
    check_len(OP, "mask (bytes)", mask, n)?;
    if let Some(b) = bias {
        check_len(OP, "bias (one per column)", b, cfg.cols())?;
    }
    Ok(())
}

/// The backward's keying ([`no_row_scale`]) once the lengths of `dy`, `mask`, `dx` and `dbias`
/// are checked.
fn backward_keying(
    cfg: &Config,
    [dy, mask, dx]: [usize; 3],
    dbias: Option<usize>,
) -> Result<Keying> {
    let keying = no_row_scale(cfg)?;
    check_masked_backward(OP, (cfg.len(), cfg.cols()), dy, mask, dx, dbias)?;
    Ok(keying)
}

/// The unfused baseline on one handle, with its intermediate buffers (`t`, `d`, the column-sum
/// partials) kept between calls the way a framework's caching allocator keeps them, so a
/// benchmark loop allocates nothing.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout::{unfused::Unfused, Config};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(256, 1024, 0.1, 42, 7)?;
/// # let s = h.stream();
/// # let x = s.alloc_zeros::<bf16>(cfg.len()).unwrap();
/// # let r = s.alloc_zeros::<bf16>(cfg.len()).unwrap();
/// # let mut y = s.alloc_zeros::<bf16>(cfg.len()).unwrap();
/// # let mut mask = s.alloc_zeros::<u8>(cfg.len()).unwrap();
/// # let bias = s.alloc_zeros::<bf16>(cfg.cols()).unwrap();
/// let mut baseline = Unfused::<bf16>::new(&h);
/// for _ in 0..10 {
///     // t and d are allocated by the first call and reused by the others.
///     baseline.forward(&cfg, &x, Some(bias.as_view()), Some(r.as_view()), &mut y, &mut mask)?;
/// }
/// # Ok(()) }
/// ```
pub struct Unfused<T: Dtype> {
    handle: Handle,
    t: Option<CudaSlice<T>>,
    d: Option<CudaSlice<T>>,
    partials: Option<CudaSlice<f32>>,
}

impl<T: Dtype> Unfused<T> {
    /// A baseline launching on `handle`'s stream; buffers are allocated on first use.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::dropout::unfused::Unfused;
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let baseline = Unfused::<f32>::new(&h); // nothing is allocated yet
    /// # Ok(()) }
    /// ```
    pub fn new(handle: &Handle) -> Self {
        Unfused {
            handle: handle.clone(),
            t: None,
            d: None,
            partials: None,
        }
    }

    /// `y = dropout(x + bias)`, or `y = residual + dropout(x + bias)`, with the byte mask written
    /// to `mask` (`len` bytes). No drop path (`cfg` must have none) and 32-bit keying.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::dropout::{unfused::Unfused, Config};
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let cfg = Config::new(16, 64, 0.1, 42, 7)?;
    /// let x = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
    /// let bias = s.clone_htod(&vec![0.5f32; cfg.cols()]).unwrap();
    /// let mut y = s.alloc_zeros::<f32>(cfg.len()).unwrap();
    /// let mut mask = s.alloc_zeros::<u8>(cfg.len()).unwrap(); // one byte per element
    /// let mut baseline = Unfused::<f32>::new(&h);
    /// baseline.forward(&cfg, &x, Some(bias.as_view()), None, &mut y, &mut mask)?;
    /// # Ok(()) }
    /// ```
    pub fn forward(
        &mut self,
        cfg: &Config,
        x: &impl DevicePtr<T>,
        bias: Option<CudaView<'_, T>>,
        residual: Option<CudaView<'_, T>>,
        y: &mut impl DevicePtrMut<T>,
        mask: &mut impl DevicePtrMut<u8>,
    ) -> Result<()> {
        let keying = no_row_scale(cfg)?;
        check_forward_lens(
            cfg,
            x.len(),
            bias.as_ref().map(|b| b.len()),
            residual.as_ref().map(|r| r.len()),
            y.len(),
            mask.len(),
        )?;
        let n = cfg.len();
        if n == 0 {
            return Ok(());
        }
        let h = self.handle.clone();
        let (x_ptr, _g1) = h.read_ptr(OP, "x", x)?;
        let (y_ptr, _g2) = h.write_ptr(OP, "y", y)?;
        let (m_ptr, _g3) = h.write_ptr(OP, "mask", mask)?;
        let (b_ptr, _gb) = h.read_opt(OP, "bias", bias.as_ref())?;
        let (r_ptr, _gr) = h.read_opt(OP, "residual", residual.as_ref())?;

        // 1. t = T(x + bias), or t = x without bias.
        let mut _t_guard = None;
        let t_src = if b_ptr != 0 {
            let t_buf = ensure(&h, OP, &mut self.t, n)?;
            let (t_ptr, g) = h.write_ptr(OP, "t", t_buf)?;
            _t_guard = Some(g);
            launch_bias_add::<T>(&h, &UNFUSED, x_ptr, b_ptr, t_ptr, cfg.rows(), cfg.cols())?;
            t_ptr
        } else {
            x_ptr
        };
        if r_ptr == 0 {
            // 2. y = keep ? T(t * scale) : 0, mask = keep.
            return launch_dropout::<T>(&h, &UNFUSED, &keying, t_src, y_ptr, m_ptr, n);
        }
        // 2. d = keep ? T(t * scale) : 0, mask = keep; 3. y = T(r + d).
        let d_buf = ensure(&h, OP, &mut self.d, n)?;
        let (d_ptr, _g4) = h.write_ptr(OP, "d", d_buf)?;
        launch_dropout::<T>(&h, &UNFUSED, &keying, t_src, d_ptr, m_ptr, n)?;
        let p = AddParams {
            a: r_ptr,
            b: d_ptr,
            out: y_ptr,
            n: n as u64,
            vec: u32::from(aligned16(&[r_ptr, d_ptr, y_ptr])),
            pad: 0,
        };
        launch_flat::<T, _>(&h, ADD.get::<T>(), n, &p)
    }

    /// `dx = mask ? T(dy * scale) : 0`, then, when `dbias` is given, its column sums of the
    /// rounded dx (deterministic, the fused op's slab partition). The same with or without a
    /// residual (`dresidual = dy`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::dropout::{unfused::Unfused, Config};
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let cfg = Config::new(16, 64, 0.1, 42, 7)?;
    /// # let mask = s.alloc_zeros::<u8>(cfg.len()).unwrap();
    /// let dy = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
    /// let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
    /// let mut dbias = s.alloc_zeros::<f32>(cfg.cols()).unwrap();
    /// let mut baseline = Unfused::<f32>::new(&h);
    /// // `mask` is the byte mask written by `Unfused::forward`.
    /// baseline.backward(&cfg, &dy, &mask, &mut dx, Some(dbias.as_view_mut()))?;
    /// # Ok(()) }
    /// ```
    pub fn backward(
        &mut self,
        cfg: &Config,
        dy: &impl DevicePtr<T>,
        mask: &impl DevicePtr<u8>,
        dx: &mut impl DevicePtrMut<T>,
        dbias: Option<CudaViewMut<'_, T>>,
    ) -> Result<()> {
        let db = dbias.as_ref().map(|b| b.len());
        let keying = backward_keying(cfg, [dy.len(), mask.len(), dx.len()], db)?;
        let n = cfg.len();
        let h = self.handle.clone();
        let mut dbias = dbias;
        if n == 0 {
            if let Some(db) = dbias.as_mut().filter(|d| !d.is_empty()) {
                h.stream().memset_zeros(db).map_err(Error::driver(OP))?;
            }
            return Ok(());
        }
        let (dy_ptr, _g1) = h.read_ptr(OP, "dy", dy)?;
        let (m_ptr, _g2) = h.read_ptr(OP, "mask", mask)?;
        let (dx_ptr, _g3) = h.write_ptr(OP, "dx", dx)?;
        launch_masked_scale::<T>(&h, &UNFUSED, keying.scale(), dy_ptr, m_ptr, dx_ptr, n)?;
        if let Some(db) = dbias.as_mut() {
            let (db_ptr, _g4) = h.write_ptr(OP, "dbias", db)?;
            let (rows, cols) = (cfg.rows(), cfg.cols());
            launch_col_sum::<T>(
                &h,
                &UNFUSED,
                OP,
                &mut self.partials,
                dx_ptr,
                db_ptr,
                rows,
                cols,
            )?;
        }
        Ok(())
    }
}

/// CPU mirror of [`Unfused::forward`], bit for bit: `t = T(x + b)`, `d = keep ? T(t * scale) :
/// 0`, `y = d` or `y = T(r + d)` with a residual, `mask[i] = keep`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::{unfused, Config, DropPath};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 4, 0.5, 42, 7)?;
/// let (x, bias, r) = ([1.0f32; 8], [0.5f32; 4], [0.25f32; 8]);
/// let (mut y, mut yr, mut mask) = ([0.0f32; 8], [0.0f32; 8], [0u8; 8]);
/// unfused::forward_cpu(&cfg, &x, Some(&bias), None, &mut y, &mut mask)?;
/// unfused::forward_cpu(&cfg, &x, Some(&bias), Some(&r), &mut yr, &mut mask)?;
/// for i in 0..8 {
///     assert_eq!(mask[i] == 1, cfg.keeps(fusedreg::DtypeKind::F32, i as u64)); // the fused op's f32 mask
///     assert_eq!(y[i], if mask[i] == 1 { 3.0 } else { 0.0 }); // 2 (x + b)
///     assert_eq!(yr[i], if mask[i] == 1 { 3.25 } else { 0.25 }); // r + 2 (x + b)
/// }
/// let with_path = cfg.with_drop_path(DropPath::new(0.1, 9)?);
/// assert!(unfused::forward_cpu(&with_path, &x, None, None, &mut y, &mut mask).is_err());
/// # Ok(()) }
/// ```
pub fn forward_cpu<T: Dtype>(
    cfg: &Config,
    x: &[T],
    bias: Option<&[T]>,
    residual: Option<&[T]>,
    y: &mut [T],
    mask: &mut [u8],
) -> Result<()> {
    let keying = no_row_scale(cfg)?;
    check_forward_lens(
        cfg,
        x.len(),
        bias.map(<[T]>::len),
        residual.map(<[T]>::len),
        y.len(),
        mask.len(),
    )?;
    let scale = keying.scale();
    let mut bits = keying.keep_bits();
    for i in 0..cfg.len() {
        let t = match bias {
            Some(b) => bias_add_cpu(x[i], b[i % cfg.cols()]),
            None => x[i],
        };
        let keep = bits.get(i as u64);
        mask[i] = u8::from(keep);
        let d = dropout_cpu(t, keep, scale);
        y[i] = match residual {
            Some(r) => T::from_f32_rn(r[i].to_f32() + d.to_f32()),
            None => d,
        };
    }
    Ok(())
}

/// CPU mirror of [`Unfused::backward`], bit for bit.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::{unfused, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 4, 0.5, 42, 7)?;
/// let mask = [1u8, 0, 1, 1, 0, 0, 1, 0]; // as written by the forward
/// let dy = [1.0f32; 8];
/// let (mut dx, mut dbias) = ([0.0f32; 8], [0.0f32; 4]);
/// unfused::backward_cpu(&cfg, &dy, &mask, &mut dx, Some(&mut dbias))?;
/// assert_eq!(dx, [2.0, 0.0, 2.0, 2.0, 0.0, 0.0, 2.0, 0.0]);
/// assert_eq!(dbias, [2.0, 0.0, 4.0, 2.0]);
/// # Ok(()) }
/// ```
pub fn backward_cpu<T: Dtype>(
    cfg: &Config,
    dy: &[T],
    mask: &[u8],
    dx: &mut [T],
    dbias: Option<&mut [T]>,
) -> Result<()> {
    let db = dbias.as_ref().map(|d| d.len());
    let keying = backward_keying(cfg, [dy.len(), mask.len(), dx.len()], db)?;
    let scale = keying.scale();
    for i in 0..cfg.len() {
        dx[i] = dropout_cpu(dy[i], mask[i] != 0, scale);
    }
    if let Some(db) = dbias {
        col_sum_cpu(dx, cfg.rows(), cfg.cols(), db);
    }
    Ok(())
}
