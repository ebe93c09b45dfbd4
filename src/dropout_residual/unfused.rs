//! The unfused baseline, the way PyTorch eager runs `residual + dropout(x + bias)`, and its CPU
//! mirror. The benchmarks compare the fused op with this.
//!
//! Forward, three kernels, each reading its inputs from and writing its output to device memory
//! in `T`: bias add `t = T(x + b)` (skipped without bias), dropout `d = keep ? T(t * scale) : 0`
//! writing a 1-byte mask (1 = kept), residual add `y = T(r + d)`. Backward: masked scale
//! `dx = mask ? T(dy * scale) : 0`, then a separate bias-gradient column sum of the rounded `dx`
//! (two kernels: per-slab partials and their ordered sum, the fused op's partition, so it is
//! deterministic too; no atomics).
//!
//! The mask uses the fused op's Philox keying, so the byte mask equals the fused bitmask element
//! for element. Because every kernel rounds to `T`, the results are not bitwise equal to the fused
//! op in 16-bit types: [`forward_cpu`] and [`backward_cpu`] mirror this path exactly (the GPU
//! tests compare with them bit for bit), and the tests bound their distance from the fused
//! reference. No drop path or row scale: timm and torchvision apply those as a separate multiply.
//!
//! ```no_run
//! use fusedreg::dropout_residual::{unfused::Unfused, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let h = fusedreg::Handle::new(0)?;
//! let cfg = Config::new(16, 64, 0.1, 42, 7)?;
//! let s = h.stream();
//! let x = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
//! let r = x.clone();
//! let mut y = s.alloc_zeros::<f32>(cfg.len()).unwrap();
//! let mut mask = s.alloc_zeros::<u8>(cfg.len()).unwrap();
//! let mut baseline = Unfused::<f32>::new(&h);
//! baseline.forward(&cfg, &x, None, &r, &mut y, &mut mask)?;
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};

use super::gpu::{aligned16, finish_dbias, geometry, Slabs, FWD_SLAB_ROWS};
use super::{slab_rows, Config, LaunchTuning, OP};
use crate::dtype::Dtype;
use crate::error::{check_len, Error, Result};
use crate::runtime::kernels::{per_dtype, KernelFamily};
use crate::runtime::{grid_for, Handle};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BiasAddParams {
    x: u64,
    bias: u64,
    t: u64,
    rows: u64,
    cols: u64,
    slab_rows: u64,
    vec: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<BiasAddParams>() == 56);
// SAFETY: plain old data with the layout of the kernel's struct (size asserted on both sides).
unsafe impl DeviceRepr for BiasAddParams {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DropoutParams {
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
const _: () = assert!(std::mem::size_of::<DropoutParams>() == 64);
// SAFETY: as above.
unsafe impl DeviceRepr for DropoutParams {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AddParams {
    a: u64,
    b: u64,
    out: u64,
    n: u64,
    vec: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<AddParams>() == 40);
// SAFETY: as above.
unsafe impl DeviceRepr for AddParams {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct MaskedScaleParams {
    dy: u64,
    mask: u64,
    dx: u64,
    n: u64,
    scale: f32,
    vec: u32,
}
const _: () = assert!(std::mem::size_of::<MaskedScaleParams>() == 40);
// SAFETY: as above.
unsafe impl DeviceRepr for MaskedScaleParams {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ColSumParams {
    dx: u64,
    partials: u64,
    rows: u64,
    cols: u64,
    slab_rows: u64,
    vec: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<ColSumParams>() == 48);
// SAFETY: as above.
unsafe impl DeviceRepr for ColSumParams {}

const BIAS_ADD: KernelFamily = per_dtype!(
    DropoutResidualUnfusedBiasAddF32,
    DropoutResidualUnfusedBiasAddF16,
    DropoutResidualUnfusedBiasAddBf16
);
const DROPOUT: KernelFamily = per_dtype!(
    DropoutResidualUnfusedDropoutF32,
    DropoutResidualUnfusedDropoutF16,
    DropoutResidualUnfusedDropoutBf16
);
const ADD: KernelFamily = per_dtype!(
    DropoutResidualUnfusedAddF32,
    DropoutResidualUnfusedAddF16,
    DropoutResidualUnfusedAddBf16
);
const MASKED_SCALE: KernelFamily = per_dtype!(
    DropoutResidualUnfusedMaskedScaleF32,
    DropoutResidualUnfusedMaskedScaleF16,
    DropoutResidualUnfusedMaskedScaleBf16
);
const COL_SUM: KernelFamily = per_dtype!(
    DropoutResidualUnfusedColSumF32,
    DropoutResidualUnfusedColSumF16,
    DropoutResidualUnfusedColSumBf16
);

const BLOCK: u32 = 256;

fn no_row_scale(cfg: &Config) -> Result<()> {
    if cfg.drop_path().is_some() {
        return Err(Error::invalid(
            OP,
            "the unfused baseline has no drop path (frameworks apply it as a separate multiply)",
        ));
    }
    Ok(())
}

/// The unfused baseline on one handle, with its intermediate buffers (`t`, `d`, the column-sum
/// partials) kept between calls the way a framework's caching allocator keeps them, so a
/// benchmark loop allocates nothing.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout_residual::{unfused::Unfused, Config};
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
///     baseline.forward(&cfg, &x, Some(bias.as_view()), &r, &mut y, &mut mask)?;
/// }
/// # Ok(()) }
/// ```
pub struct Unfused<T: Dtype> {
    handle: Handle,
    t: Option<CudaSlice<T>>,
    d: Option<CudaSlice<T>>,
    partials: Option<CudaSlice<f32>>,
}

/// Returns a buffer of at least `len` elements, reallocating (stream-ordered) when too small.
fn ensure<'a, E: DeviceRepr>(
    handle: &Handle,
    slot: &'a mut Option<CudaSlice<E>>,
    len: usize,
) -> Result<&'a mut CudaSlice<E>> {
    if !matches!(slot, Some(b) if b.len() >= len) {
        *slot = None;
        // SAFETY: every element a kernel reads is written by an earlier kernel first.
        *slot = Some(unsafe { handle.stream().alloc::<E>(len.max(1)) }.map_err(Error::driver(OP))?);
    }
    Ok(slot.as_mut().expect("just allocated"))
}

impl<T: Dtype> Unfused<T> {
    /// A baseline launching on `handle`'s stream; buffers are allocated on first use.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::dropout_residual::unfused::Unfused;
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

    /// `y = residual + dropout(x + bias)` with the byte mask written to `mask` (`len` bytes).
    /// No drop path (`cfg` must have none).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::dropout_residual::{unfused::Unfused, Config};
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let cfg = Config::new(16, 64, 0.1, 42, 7)?;
    /// let x = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
    /// let bias = s.clone_htod(&vec![0.5f32; cfg.cols()]).unwrap();
    /// # let r = x.clone();
    /// # let mut y = s.alloc_zeros::<f32>(cfg.len()).unwrap();
    /// let mut mask = s.alloc_zeros::<u8>(cfg.len()).unwrap(); // one byte per element
    /// let mut baseline = Unfused::<f32>::new(&h);
    /// baseline.forward(&cfg, &x, Some(bias.as_view()), &r, &mut y, &mut mask)?;
    /// # Ok(()) }
    /// ```
    pub fn forward(
        &mut self,
        cfg: &Config,
        x: &impl DevicePtr<T>,
        bias: Option<CudaView<'_, T>>,
        residual: &impl DevicePtr<T>,
        y: &mut impl DevicePtrMut<T>,
        mask: &mut impl DevicePtrMut<u8>,
    ) -> Result<()> {
        no_row_scale(cfg)?;
        let n = cfg.len();
        check_len(OP, "x", x.len(), n)?;
        check_len(OP, "residual", residual.len(), n)?;
        check_len(OP, "y", y.len(), n)?;
        check_len(OP, "mask (bytes)", mask.len(), n)?;
        if let Some(b) = &bias {
            check_len(OP, "bias (one per column)", b.len(), cfg.cols())?;
        }
        if n == 0 {
            return Ok(());
        }
        let h = self.handle.clone();
        let vec = 16 / T::KIND.size();
        let (x_ptr, _g1) = h.read_ptr(OP, "x", x)?;
        let (r_ptr, _g2) = h.read_ptr(OP, "residual", residual)?;
        let (y_ptr, _g3) = h.write_ptr(OP, "y", y)?;
        let (m_ptr, _g4) = h.write_ptr(OP, "mask", mask)?;
        let bias_g = bias
            .as_ref()
            .map(|b| h.read_ptr(OP, "bias", b))
            .transpose()?;

        // 1. t = T(x + bias), or t = x without bias.
        let mut _t_guard = None;
        let t_src = match &bias_g {
            Some((b_ptr, _)) => {
                let t_buf = ensure(&h, &mut self.t, n)?;
                let (t_ptr, g) = h.write_ptr(OP, "t", t_buf)?;
                _t_guard = Some(g);
                let g = geometry::<T>(
                    cfg.rows(),
                    cfg.cols(),
                    aligned16(&[x_ptr, *b_ptr, t_ptr]),
                    true,
                    Slabs::Free(FWD_SLAB_ROWS),
                    &LaunchTuning {
                        unroll: false,
                        ..Default::default()
                    },
                )?;
                let p = BiasAddParams {
                    x: x_ptr,
                    bias: *b_ptr,
                    t: t_ptr,
                    rows: g.rows,
                    cols: g.cols,
                    slab_rows: g.slab_rows,
                    vec: u32::from(g.vector),
                    pad: 0,
                };
                h.launch(BIAS_ADD.get::<T>(), g.grid, g.block, 0, &p)?;
                t_ptr
            }
            None => x_ptr,
        };

        // 2. d = keep ? T(t * scale) : 0, mask = keep.
        let d_buf = ensure(&h, &mut self.d, n)?;
        let (d_ptr, _g6) = h.write_ptr(OP, "d", d_buf)?;
        let rate = cfg.rate();
        let mask_aligned = m_ptr % vec as u64 == 0;
        let p = DropoutParams {
            t: t_src,
            d: d_ptr,
            mask: m_ptr,
            n: n as u64,
            seed: cfg.seed(),
            call: cfg.call(),
            threshold: rate.threshold(),
            scale: rate.scale(),
            vec: u32::from(aligned16(&[t_src, d_ptr]) && mask_aligned),
        };
        let grid = (grid_for((n as u64).div_ceil(vec as u64), BLOCK), 1, 1);
        h.launch(DROPOUT.get::<T>(), grid, (BLOCK, 1, 1), 0, &p)?;

        // 3. y = T(r + d).
        let p = AddParams {
            a: r_ptr,
            b: d_ptr,
            out: y_ptr,
            n: n as u64,
            vec: u32::from(aligned16(&[r_ptr, d_ptr, y_ptr])),
            pad: 0,
        };
        h.launch(ADD.get::<T>(), grid, (BLOCK, 1, 1), 0, &p)
    }

    /// `dx = mask ? T(dy * scale) : 0`, then, when `dbias` is given, its column sums of the
    /// rounded dx (deterministic, the fused op's slab partition).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::dropout_residual::{unfused::Unfused, Config};
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
        no_row_scale(cfg)?;
        let n = cfg.len();
        check_len(OP, "dy", dy.len(), n)?;
        check_len(OP, "mask (bytes)", mask.len(), n)?;
        check_len(OP, "dx", dx.len(), n)?;
        if let Some(b) = &dbias {
            check_len(OP, "dbias (one per column)", b.len(), cfg.cols())?;
        }
        let h = self.handle.clone();
        let mut dbias = dbias;
        if n == 0 {
            if let Some(db) = dbias.as_mut().filter(|d| !d.is_empty()) {
                h.stream().memset_zeros(db).map_err(Error::driver(OP))?;
            }
            return Ok(());
        }
        let vec = 16 / T::KIND.size();
        let (dy_ptr, _g1) = h.read_ptr(OP, "dy", dy)?;
        let (m_ptr, _g2) = h.read_ptr(OP, "mask", mask)?;
        let (dx_ptr, _g3) = h.write_ptr(OP, "dx", dx)?;
        let p = MaskedScaleParams {
            dy: dy_ptr,
            mask: m_ptr,
            dx: dx_ptr,
            n: n as u64,
            scale: cfg.rate().scale(),
            vec: u32::from(aligned16(&[dy_ptr, dx_ptr]) && m_ptr % vec as u64 == 0),
        };
        let grid = (grid_for((n as u64).div_ceil(vec as u64), BLOCK), 1, 1);
        h.launch(MASKED_SCALE.get::<T>(), grid, (BLOCK, 1, 1), 0, &p)?;

        if let Some(db) = dbias.as_mut() {
            let g = geometry::<T>(
                cfg.rows(),
                cfg.cols(),
                aligned16(&[dx_ptr]),
                true,
                Slabs::Dbias,
                &LaunchTuning {
                    unroll: false,
                    ..Default::default()
                },
            )?;
            let slabs = g.grid.1 as usize;
            let part = ensure(&h, &mut self.partials, slabs * cfg.cols())?;
            let (part_ptr, _g4) = h.write_ptr(OP, "partials", part)?;
            let p = ColSumParams {
                dx: dx_ptr,
                partials: part_ptr,
                rows: g.rows,
                cols: g.cols,
                slab_rows: g.slab_rows,
                vec: u32::from(g.vector),
                pad: 0,
            };
            h.launch(COL_SUM.get::<T>(), g.grid, g.block, 0, &p)?;
            let (db_ptr, _g5) = h.write_ptr(OP, "dbias", db)?;
            finish_dbias::<T>(&h, part_ptr, db_ptr, cfg.cols(), slabs)?;
        }
        Ok(())
    }
}

/// CPU mirror of [`Unfused::forward`], bit for bit: `t = T(x + b)`, `d = keep ? T(t * scale) :
/// 0`, `y = T(r + d)`, `mask[i] = keep`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::{unfused, Config, DropPath};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 4, 0.5, 42, 7)?;
/// let (x, bias, r) = ([1.0f32; 8], [0.5f32; 4], [0.25f32; 8]);
/// let (mut y, mut mask) = ([0.0f32; 8], [0u8; 8]);
/// unfused::forward_cpu(&cfg, &x, Some(&bias), &r, &mut y, &mut mask)?;
/// for i in 0..8 {
///     assert_eq!(mask[i] == 1, cfg.keeps(i as u64)); // the fused op's mask
///     assert_eq!(y[i], if mask[i] == 1 { 3.25 } else { 0.25 }); // r + 2 (x + b)
/// }
/// let with_path = cfg.with_drop_path(DropPath::new(0.1, 9)?);
/// assert!(unfused::forward_cpu(&with_path, &x, None, &r, &mut y, &mut mask).is_err());
/// # Ok(()) }
/// ```
pub fn forward_cpu<T: Dtype>(
    cfg: &Config,
    x: &[T],
    bias: Option<&[T]>,
    residual: &[T],
    y: &mut [T],
    mask: &mut [u8],
) -> Result<()> {
    no_row_scale(cfg)?;
    let n = cfg.len();
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "residual", residual.len(), n)?;
    check_len(OP, "y", y.len(), n)?;
    check_len(OP, "mask (bytes)", mask.len(), n)?;
    if let Some(b) = bias {
        check_len(OP, "bias (one per column)", b.len(), cfg.cols())?;
    }
    let scale = cfg.rate().scale();
    let mut bits = super::cpu::KeepBits::new(cfg);
    for i in 0..n {
        let t = match bias {
            Some(b) => T::from_f32_rn(x[i].to_f32() + b[i % cfg.cols()].to_f32()),
            None => x[i],
        };
        let keep = bits.get(i as u64);
        let d = if keep {
            T::from_f32_rn(t.to_f32() * scale)
        } else {
            T::from_f32_rn(0.0)
        };
        mask[i] = u8::from(keep);
        y[i] = T::from_f32_rn(residual[i].to_f32() + d.to_f32());
    }
    Ok(())
}

/// CPU mirror of [`Unfused::backward`], bit for bit.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::{unfused, Config};
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
    no_row_scale(cfg)?;
    let n = cfg.len();
    check_len(OP, "dy", dy.len(), n)?;
    check_len(OP, "mask (bytes)", mask.len(), n)?;
    check_len(OP, "dx", dx.len(), n)?;
    if let Some(b) = &dbias {
        check_len(OP, "dbias (one per column)", b.len(), cfg.cols())?;
    }
    let scale = cfg.rate().scale();
    for i in 0..n {
        dx[i] = if mask[i] != 0 {
            T::from_f32_rn(dy[i].to_f32() * scale)
        } else {
            T::from_f32_rn(0.0)
        };
    }
    if let Some(db) = dbias {
        let (rows, cols) = (cfg.rows(), cfg.cols());
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
        for (d, t) in db.iter_mut().zip(&total) {
            *d = T::from_f32_rn(*t);
        }
    }
    Ok(())
}
