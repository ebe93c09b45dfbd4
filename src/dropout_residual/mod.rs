//! Fused bias + dropout + residual add, forward and backward, with an optional per-row scale
//! (stochastic depth / drop path), on row-major `[rows, cols]` tensors:
//!
//! ```text
//! y  = residual + rowscale[row] * keep(seed, call, i) * (x + bias[col]) / (1 - p)
//! dx = rowscale[row] * keep(seed, call, i) * dy / (1 - p)
//! dbias[col] = sum over rows of dx[row, col]        dresidual = dy (no copy: reuse dy)
//! ```
//!
//! `i = row * cols + col` is the flat 64-bit element index; `keep` is [`philox::mask_word`]
//! compared with the [`DropRate`] threshold, so the mask is a pure function of `(seed, call, i)`:
//! independent of the tensor length, the launch configuration, the vector width, the alignment
//! and the GPU. x, bias, residual and y share one dtype (`f32`, `f16`, `bf16`); `rowscale` is f32.
//!
//! # Pinned arithmetic (CPU and GPU agree bit for bit)
//!
//! With `scale = DropRate::scale()` (0 for p = 1) and `rs` the row scale:
//!
//! * `t = x + b` (one f32 add; `t = x` without bias),
//! * `rowm = scale * rs` (one f32 multiply per row; `rowm = scale` without a row scale),
//!   `m = keep ? rowm : 0`,
//! * `y = m != 0 ? T(fma(t, m, r)) : r` — a dropped element returns the residual's own bits, so
//!   it contributes exactly nothing even when x is inf or NaN. With p = 0 and no row scale this is
//!   `T(fma(t, 1, r)) = T(t + r)`: exactly `x + bias + residual`, rounded once.
//! * `dx = m != 0 ? T(dy * m) : 0` (one f32 multiply, rounded once);
//!   `dbias[col] = T(sum over slabs s of (sum over the rows of s, in increasing order, of the
//!   unrounded f32 dx))`, every sum a sequential f32 sum starting from `+0.0`. The slabs are
//!   [`slab_rows`] rows each, a function of `(rows, cols, dtype)` only, so dbias is identical
//!   from run to run, GPU to GPU and launch configuration to launch configuration, and the CPU
//!   reference reproduces it.
//!
//! p = 0 and p = 1 do no generator work; p = 1 drops every element and divides by nothing.
//! Every f32 operation is a single IEEE operation (the kernels are built with `--fmad=false`).
//!
//! # Drop path (stochastic depth, row mode)
//!
//! The row scale is either supplied by the caller (a device f32 buffer, `len == rows`, any
//! values) or generated on the device from its own Philox stream ([`DropPath`]):
//! `rowscale[row] = keeps(mask_word(seed, path_call, row / rows_per_sample)) ? 1 / (1 - p_path) : 0`.
//! It composes with dropout in the same kernel; rows whose scale is 0 read no `x` (in place they
//! are not touched at all). The forward can write the generated scale out (`rowscale_out`); the
//! backward regenerates it from the same [`Config`] (or takes the caller's buffer).
//!
//! # The 1-bit mask
//!
//! Optionally the forward writes the dropout keep mask (not including the row scale) as `u32`
//! words: bit `b` of word `w` is element `32 w + b` (flat index), `ceil(n / 32)` words, the bits
//! past `n` zero ([`Config::mask_words`]). The backward can read it instead of regenerating the
//! mask (then seed and call id are not used for the dropout mask; the drop path is still
//! regenerated from them unless the caller supplies the row scale).
//!
//! # In place
//!
//! The common case updates the residual stream in place: use [`forward_inplace`] (GPU) or
//! [`cpu::forward_inplace`], where `residual` is the `&mut` output.
//!
//! # Example (CPU reference; the GPU functions take the same [`Config`])
//!
//! ```
//! use fusedreg::dropout_residual::{cpu, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let (rows, cols) = (4, 8);
//! let cfg = Config::new(rows, cols, 0.1, /* seed */ 42, /* call */ 7)?;
//! let x = vec![1.0f32; rows * cols];
//! let bias = vec![0.5f32; cols];
//! let mut stream = vec![2.0f32; rows * cols]; // the residual stream, updated in place
//! let opts = cpu::ForwardOptions { bias: Some(&bias), ..Default::default() };
//! cpu::forward_inplace(&cfg, &x, &mut stream, opts)?;
//! // Every element is either dropped (2.0) or kept: 2 + 1.5 / 0.9.
//! assert!(stream.iter().all(|&v| v == 2.0 || v == 1.5f32.mul_add(1.0 / 0.9, 2.0)));
//! # Ok(()) }
//! ```
//!
//! [`philox::mask_word`]: crate::philox::mask_word

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::dtype::DtypeKind;
use crate::error::{check_len, Error, Result};
use crate::philox::DropRate;

pub mod cpu;
mod gpu;
pub mod unfused;

pub use gpu::{backward, forward, forward_inplace};

/// The name used in errors.
pub(crate) const OP: &str = "dropout_residual";

/// A generated drop path (stochastic depth): one keep/drop draw per row (or per group of
/// `rows_per_sample` consecutive rows), keyed by `(seed, call, row / rows_per_sample)` with its
/// own call id, so it is independent of the dropout mask.
///
/// ```
/// use fusedreg::dropout_residual::DropPath;
/// # fn main() -> fusedreg::Result<()> {
/// let path = DropPath::new(0.25, 1000)?;
/// let s = path.row_scale(42, 3);
/// assert!(s == 0.0 || s == 1.0 / 0.75);
/// // A transformer block on [batch * seq, hidden]: one draw per sample of 512 rows.
/// let per_sample = path.per_sample(512)?;
/// assert_eq!(per_sample.row_scale(42, 512), per_sample.row_scale(42, 1023));
/// assert!(DropPath::new(f64::NAN, 1).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropPath {
    rate: DropRate,
    call: u64,
    rows_per_sample: u32,
}

impl DropPath {
    /// A drop path dropping each row with probability `p_path` (in `[0, 1]`, not NaN), keyed by
    /// `call` (use a call id different from the dropout's).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::DropPath;
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.1, 1000)?;
    /// assert_eq!((path.rate().p(), path.call(), path.rows_per_sample()), (0.1, 1000, 1));
    /// assert!(DropPath::new(-0.5, 1000).is_err());
    /// assert!(DropPath::new(f64::NAN, 1000).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(p_path: f64, call: u64) -> Result<Self> {
        Ok(DropPath {
            rate: DropRate::checked(OP, p_path)?,
            call,
            rows_per_sample: 1,
        })
    }

    /// One draw per group of `rows_per_sample` consecutive rows (a sample of a `[batch * seq,
    /// hidden]` tensor). Must be at least 1; above 1 the tensor must have fewer than 2^32 rows.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::DropPath;
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.5, 3)?.per_sample(4)?;
    /// // Rows 0..4 are sample 0, rows 4..8 sample 1: one draw per sample.
    /// assert!((0..4).all(|row| path.row_scale(9, row) == path.row_scale(9, 0)));
    /// assert!((4..8).all(|row| path.row_scale(9, row) == path.row_scale(9, 4)));
    /// assert!(DropPath::new(0.5, 3)?.per_sample(0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn per_sample(self, rows_per_sample: usize) -> Result<Self> {
        let rps = u32::try_from(rows_per_sample)
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| {
                Error::invalid(
                    OP,
                    format!("rows_per_sample = {rows_per_sample} must lie in 1 ..= 2^32 - 1"),
                )
            })?;
        Ok(DropPath {
            rows_per_sample: rps,
            ..self
        })
    }

    /// The drop rate of whole rows.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::DropPath;
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.25, 1)?;
    /// assert_eq!(path.rate().threshold(), 1 << 30);
    /// assert_eq!(path.rate().scale(), 1.0 / 0.75);
    /// # Ok(()) }
    /// ```
    pub fn rate(&self) -> DropRate {
        self.rate
    }

    /// The call id keying the row draws.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::DropPath;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(DropPath::new(0.1, 77)?.call(), 77);
    /// # Ok(()) }
    /// ```
    pub fn call(&self) -> u64 {
        self.call
    }

    /// Rows sharing one draw (1 unless set by [`DropPath::per_sample`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::DropPath;
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.1, 1)?;
    /// assert_eq!(path.rows_per_sample(), 1);
    /// assert_eq!(path.per_sample(128)?.rows_per_sample(), 128);
    /// # Ok(()) }
    /// ```
    pub fn rows_per_sample(&self) -> usize {
        self.rows_per_sample as usize
    }

    /// The row scale of `row` under `seed`: `1 / (1 - p_path)` (f32) when kept, 0 when dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::DropPath;
    /// use fusedreg::philox::mask_word;
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.5, 9)?;
    /// // Row 3 is kept when word 3 of the path's own call id passes the threshold.
    /// let kept = path.rate().keeps(mask_word(42, 9, 3));
    /// assert_eq!(path.row_scale(42, 3), if kept { 2.0 } else { 0.0 });
    /// let kept_rows = (0..1000).filter(|&row| path.row_scale(42, row) != 0.0).count();
    /// assert!((400..600).contains(&kept_rows));
    /// # Ok(()) }
    /// ```
    pub fn row_scale(&self, seed: u64, row: u64) -> f32 {
        let sample = row / u64::from(self.rows_per_sample);
        if self
            .rate
            .keeps(crate::philox::mask_word(seed, self.call, sample))
        {
            self.rate.scale()
        } else {
            0.0
        }
    }
}

/// Shape, drop rate and random keys of one dropout + residual call: everything but the buffers.
/// Validated on construction; the CPU reference and the GPU kernels take the same `Config`.
///
/// ```
/// use fusedreg::dropout_residual::{Config, DropPath};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1024, 4096, 0.1, 42, 7)?.with_drop_path(DropPath::new(0.2, 8)?);
/// assert_eq!(cfg.len(), 1 << 22);
/// assert_eq!(cfg.mask_words(), 1 << 17);
/// assert!(Config::new(usize::MAX, 2, 0.1, 0, 0).is_err()); // rows * cols overflows
/// assert!(Config::flat(10, 1.5, 0, 0).is_err()); // p outside [0, 1]
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    rows: usize,
    cols: usize,
    rate: DropRate,
    seed: u64,
    call: u64,
    drop_path: Option<DropPath>,
}

impl Config {
    /// A `[rows, cols]` tensor (cols = hidden size, the length of the bias), dropped with
    /// probability `p` under `(seed, call)`.
    ///
    /// Errors: [`Error::ShapeMismatch`] when `rows * cols` overflows; [`Error::InvalidArgument`]
    /// when `p` is NaN or outside `[0, 1]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// use fusedreg::Error;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(8, 1024, 0.1, 42, 7)?;
    /// assert_eq!((cfg.rows(), cfg.cols(), cfg.len()), (8, 1024, 8192));
    /// assert!(cfg.drop_path().is_none());
    /// assert!(matches!(Config::new(8, 1024, 1.5, 42, 7), Err(Error::InvalidArgument { .. })));
    /// assert!(matches!(Config::new(usize::MAX, 2, 0.1, 42, 7), Err(Error::ShapeMismatch { .. })));
    /// # Ok(()) }
    /// ```
    pub fn new(rows: usize, cols: usize, p: f64, seed: u64, call: u64) -> Result<Self> {
        let rate = DropRate::checked(OP, p)?;
        rows.checked_mul(cols)
            .filter(|&n| u64::try_from(n).is_ok())
            .ok_or_else(|| Error::shape(OP, format!("rows * cols = {rows} * {cols} overflows")))?;
        Ok(Config {
            rows,
            cols,
            rate,
            seed,
            call,
            drop_path: None,
        })
    }

    /// A flat tensor of `n` elements (`[1, n]`): for data without bias or row scale.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::flat(1000, 0.1, 42, 7)?;
    /// assert_eq!((cfg.rows(), cfg.cols(), cfg.len()), (1, 1000, 1000));
    /// assert!(Config::flat(1000, f64::NAN, 42, 7).is_err());
    /// # Ok(()) }
    /// ```
    pub fn flat(n: usize, p: f64, seed: u64, call: u64) -> Result<Self> {
        Self::new(1, n, p, seed, call)
    }

    /// Adds a generated drop path. It cannot be combined with a caller-supplied row scale.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::{cpu, Config, DropPath};
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.5, 8)?;
    /// let cfg = Config::new(2, 4, 0.0, 42, 7)?.with_drop_path(path);
    /// let (x, r, mut y) = ([1.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
    /// cpu::forward(&cfg, &x, &r, &mut y, Default::default())?;
    /// assert_eq!(y[..4], [path.row_scale(42, 0); 4]); // row 0 is kept or dropped as a whole
    /// // A caller-supplied row scale is refused:
    /// let opts = cpu::ForwardOptions { rowscale: Some(&[1.0, 1.0]), ..Default::default() };
    /// assert!(cpu::forward(&cfg, &x, &r, &mut y, opts).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_drop_path(self, path: DropPath) -> Self {
        Config {
            drop_path: Some(path),
            ..self
        }
    }

    /// Rows.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(16, 4096, 0.1, 42, 7)?.rows(), 16);
    /// # Ok(()) }
    /// ```
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the hidden size; the length of the bias).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(16, 4096, 0.1, 42, 7)?.cols(), 4096);
    /// # Ok(()) }
    /// ```
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements, `rows * cols`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(3, 5, 0.1, 42, 7)?.len(), 15);
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True when there are no elements.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert!(Config::new(0, 4096, 0.1, 42, 7)?.is_empty());
    /// assert!(!Config::flat(1, 0.1, 42, 7)?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dropout rate.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// use fusedreg::philox::DropRate;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(4, 8, 0.1, 42, 7)?;
    /// assert_eq!(cfg.rate(), DropRate::new(0.1)?);
    /// assert_eq!(cfg.rate().p(), 0.1);
    /// # Ok(()) }
    /// ```
    pub fn rate(&self) -> DropRate {
        self.rate
    }

    /// The generator seed.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(4, 8, 0.1, 42, 7)?.seed(), 42);
    /// # Ok(()) }
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The call id of the dropout mask.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(4, 8, 0.1, 42, 7)?.call(), 7);
    /// # Ok(()) }
    /// ```
    pub fn call(&self) -> u64 {
        self.call
    }

    /// The generated drop path, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::{Config, DropPath};
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(4, 8, 0.1, 42, 7)?;
    /// assert_eq!(cfg.drop_path(), None);
    /// let path = DropPath::new(0.2, 8)?;
    /// assert_eq!(cfg.with_drop_path(path).drop_path(), Some(path));
    /// # Ok(()) }
    /// ```
    pub fn drop_path(&self) -> Option<DropPath> {
        self.drop_path
    }

    /// Length in `u32` words of the 1-bit mask: `ceil(len / 32)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::flat(32, 0.1, 42, 7)?.mask_words(), 1);
    /// assert_eq!(Config::flat(33, 0.1, 42, 7)?.mask_words(), 2);
    /// assert_eq!(Config::new(0, 8, 0.1, 42, 7)?.mask_words(), 0);
    /// # Ok(()) }
    /// ```
    pub fn mask_words(&self) -> usize {
        self.len().div_ceil(32)
    }

    /// Whether element `i` (flat index) is kept by the dropout mask.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Config;
    /// use fusedreg::philox::mask_word;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(2, 64, 0.1, 42, 7)?;
    /// let i = 64 + 5; // row 1, column 5
    /// assert_eq!(cfg.keeps(i), cfg.rate().keeps(mask_word(42, 7, i)));
    /// assert!(Config::flat(8, 0.0, 42, 7)?.keeps(3)); // p = 0 keeps everything
    /// assert!(!Config::flat(8, 1.0, 42, 7)?.keeps(3)); // p = 1 nothing
    /// # Ok(()) }
    /// ```
    pub fn keeps(&self, i: u64) -> bool {
        self.rate
            .keeps(crate::philox::mask_word(self.seed, self.call, i))
    }

    fn has_row_scale(&self, given: bool) -> bool {
        given || self.drop_path.is_some()
    }
}

/// Rows per slab of the dbias partition: a function of `(rows, cols, dtype)` only — never of the
/// device, block size or grid — so dbias is reproducible everywhere and on the CPU.
///
/// The backward writes one f32 partial per (slab, column) and a second kernel sums them. Slabs
/// are sized so the grid has about 2^17 threads (16-byte column groups times slabs: enough to
/// fill an H100) while keeping 16 to 64 rows per slab, so the partials stay a small fraction of
/// the traffic (at most 1/8 of a bf16 backward's bytes at 16 rows, 1/32 at 64); never more than
/// 65,535 slabs (the grid's y limit), and 1 when `rows` is 0 or 1.
///
/// ```
/// use fusedreg::dropout_residual::{slab_rows, slab_count};
/// use fusedreg::DtypeKind;
/// assert_eq!(slab_rows(16384, 4096, DtypeKind::Bf16), 64);
/// assert_eq!(slab_count(16384, 4096, DtypeKind::Bf16), 256);
/// assert_eq!(slab_rows(1, 1 << 20, DtypeKind::F32), 1);
/// assert_eq!(slab_rows(1 << 26, 1, DtypeKind::F32), 1025); // grid.y <= 65535
/// ```
pub fn slab_rows(rows: usize, cols: usize, dtype: DtypeKind) -> usize {
    const TARGET_THREADS: u128 = 1 << 17;
    const MIN_ROWS: u128 = 16;
    const MAX_ROWS: u128 = 64;
    const MAX_SLABS: usize = 65_535;
    if rows <= 1 {
        return 1;
    }
    let groups = (cols as u128).div_ceil((16 / dtype.size()) as u128).max(1);
    let fill = rows as u128 * groups / TARGET_THREADS;
    let s = fill.clamp(MIN_ROWS, MAX_ROWS).min(rows as u128) as usize;
    s.max(rows.div_ceil(MAX_SLABS))
}

/// Number of slabs, `ceil(rows / slab_rows)` (0 when `rows` is 0).
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::{slab_count, slab_rows};
/// use fusedreg::DtypeKind;
/// assert_eq!(slab_rows(1000, 1024, DtypeKind::F32), 16);
/// assert_eq!(slab_count(1000, 1024, DtypeKind::F32), 63); // ceil(1000 / 16)
/// assert_eq!(slab_count(0, 1024, DtypeKind::F32), 0);
/// ```
pub fn slab_count(rows: usize, cols: usize, dtype: DtypeKind) -> usize {
    rows.div_ceil(slab_rows(rows, cols, dtype))
}

/// Minimal device-memory bytes of the fused forward on `n` elements: read x and the residual,
/// write y (`3 s` per element), plus the 1-bit mask when written. Bias and row-scale traffic is
/// negligible and not counted. bf16: 6 B per element (6.125 with the mask); f32: 12 (12.125).
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// ```
/// use fusedreg::dropout_residual::fused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, false), 6 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, true), 6 * 1024 + 128);
/// assert_eq!(fused_forward_bytes(DtypeKind::F32, 1 << 62, true), u64::MAX); // saturates
/// ```
pub fn fused_forward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    let mask = if bitmask { 4 * n.div_ceil(32) } else { 0 };
    (3 * dtype.size() as u64)
        .saturating_mul(n)
        .saturating_add(mask)
}

/// Minimal bytes of the fused backward: read dy, write dx (`2 s`: 4 B bf16, 8 B f32), plus the
/// 1-bit mask when it is read instead of regenerated. The dbias partials (one f32 per slab and
/// column, written and read once) are not counted.
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::fused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_backward_bytes(DtypeKind::Bf16, 1024, false), 4 * 1024);
/// assert_eq!(fused_backward_bytes(DtypeKind::F32, 1024, true), 8 * 1024 + 128);
/// assert_eq!(fused_backward_bytes(DtypeKind::F32, u64::MAX, false), u64::MAX); // saturates
/// ```
pub fn fused_backward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    let mask = if bitmask { 4 * n.div_ceil(32) } else { 0 };
    (2 * dtype.size() as u64)
        .saturating_mul(n)
        .saturating_add(mask)
}

/// Minimal bytes of the unfused forward ([`unfused`]): bias add (read x, write t: `2 s`), dropout
/// (read t, write d and a 1-byte mask: `2 s + 1`), residual add (read r and d, write y: `3 s`):
/// `7 s + 1` = 15 B bf16, 29 B f32. Without bias the first kernel is skipped: `5 s + 1`.
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::unfused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, true), 15 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::F32, 1024, true), 29 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, false), 11 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1 << 61, true), u64::MAX); // saturates
/// ```
pub fn unfused_forward_bytes(dtype: DtypeKind, n: u64, bias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if bias { 7 * s + 1 } else { 5 * s + 1 })
}

/// Minimal bytes of the unfused backward: masked scale (read dy and the byte mask, write dx:
/// `2 s + 1`), then the bias-gradient column sum (read dx: `s`): `3 s + 1` = 7 B bf16, 13 B
/// f32. Without dbias only the first kernel runs: `2 s + 1`.
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::unfused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024, true), 7 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::F32, 1024, true), 13 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024, false), 5 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::F32, 1 << 61, true), u64::MAX); // saturates
/// ```
pub fn unfused_backward_bytes(dtype: DtypeKind, n: u64, dbias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if dbias { 3 * s + 1 } else { 2 * s + 1 })
}

/// Row lanes of the fused backward's dbias partials: each slab's rows are split by
/// `(row - slab_start) % DBIAS_LANES`, each lane sums its rows in order, and the slab's partial
/// is `((lane0 + lane1) + lane2) + lane3`. Must equal `DBIAS_LANES` in the kernel.
pub(crate) const DBIAS_LANES: usize = 4;

/// Launch knobs for tests: results never depend on them (the tests check that). Not part of the
/// stable API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchTuning {
    /// Threads per block: a multiple of 32 in `32 ..= 256`.
    pub block: u32,
    /// Unroll the row loop (4 rows' loads in flight before their math).
    pub unroll: bool,
    /// Take the scalar path even when the vector path is possible.
    pub force_scalar: bool,
    /// Cap on grid.x; the kernels loop over the remaining column tiles.
    pub max_grid_x: u32,
    /// Rows per slab of launches without dbias partials (0: the defaults, 4 forward, 8 backward).
    pub slab_rows: u32,
    /// Row width when a flat tensor is laid out as rows (0: the default, 4 tiles of
    /// `block` x 16 bytes); must be a multiple of 32.
    pub flat_width: u32,
}

impl Default for LaunchTuning {
    fn default() -> Self {
        LaunchTuning {
            block: 256,
            unroll: true,
            force_scalar: false,
            max_grid_x: i32::MAX as u32,
            slab_rows: 0,
            flat_width: 0,
        }
    }
}

impl LaunchTuning {
    pub(crate) fn check(&self) -> Result<()> {
        if self.block == 0 || self.block % 32 != 0 || self.block > 256 || self.max_grid_x == 0 {
            return Err(Error::invalid(
                OP,
                format!("launch tuning {self:?}: block must be a multiple of 32 in 32..=256 and max_grid_x >= 1"),
            ));
        }
        Ok(())
    }
}

/// Reusable device workspace for the dbias partials of [`backward`] (one f32 per slab and
/// column). Without one the backward allocates the partials stream-ordered per call
/// (`cuMemAllocAsync`); with one it grows once and is reused, so a loop allocates nothing.
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// let mut ws = fusedreg::dropout_residual::Workspace::new();
/// assert_eq!(ws.capacity(), 0);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct Workspace {
    partials: Option<CudaSlice<f32>>,
}

impl Workspace {
    /// An empty workspace; the first backward with dbias sizes it.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Workspace;
    /// let ws = Workspace::new(); // allocates nothing: no GPU needed
    /// assert_eq!(ws.capacity(), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Current size in f32 elements.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_residual::Workspace;
    /// // Empty until a GPU backward with dbias sizes it (one f32 per slab and column).
    /// assert_eq!(Workspace::default().capacity(), 0);
    /// ```
    pub fn capacity(&self) -> usize {
        self.partials.as_ref().map_or(0, |p| p.len())
    }
}

/// The optional buffers of a GPU [`forward`] / [`forward_inplace`]. All default to `None`.
///
/// # Examples
///
/// A drop-path forward that also writes out the row scale it generated:
///
/// ```no_run
/// use fusedreg::dropout_residual::{self as dr, Config, DropPath, ForwardOptions};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(64, 256, 0.1, 42, 7)?.with_drop_path(DropPath::new(0.2, 8)?);
/// # let x = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// # let mut stream = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut rowscale = s.alloc_zeros::<f32>(cfg.rows()).unwrap();
/// let opts = ForwardOptions {
///     rowscale_out: Some(rowscale.as_view_mut()),
///     ..Default::default()
/// };
/// dr::forward_inplace(&h, &cfg, &x, &mut stream, opts)?;
/// # Ok(()) }
/// ```
pub struct ForwardOptions<'a, T> {
    /// Bias per column, `len == cols`.
    pub bias: Option<CudaView<'a, T>>,
    /// Caller-supplied row scale, `len == rows` (not with a [`DropPath`] in the config).
    pub rowscale: Option<CudaView<'a, f32>>,
    /// Writes the 1-bit keep mask here, `len == cfg.mask_words()`.
    pub mask_out: Option<CudaViewMut<'a, u32>>,
    /// Writes the generated row scale here, `len == rows` (needs a [`DropPath`]).
    pub rowscale_out: Option<CudaViewMut<'a, f32>>,
    #[doc(hidden)]
    pub tuning: LaunchTuning,
}

impl<T> Default for ForwardOptions<'_, T> {
    fn default() -> Self {
        ForwardOptions {
            bias: None,
            rowscale: None,
            mask_out: None,
            rowscale_out: None,
            tuning: LaunchTuning::default(),
        }
    }
}

/// The optional buffers of a GPU [`backward`]. All default to `None`.
///
/// # Examples
///
/// A backward reading the forward's 1-bit mask and the caller's row scale:
///
/// ```no_run
/// use fusedreg::dropout_residual::{self as dr, BackwardOptions, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(64, 256, 0.1, 42, 7)?;
/// # let dy = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// # let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mask = s.alloc_zeros::<u32>(cfg.mask_words()).unwrap(); // filled by the forward's mask_out
/// let rowscale = s.clone_htod(&vec![1.0f32; cfg.rows()]).unwrap(); // the forward's rowscale
/// let opts = BackwardOptions {
///     mask: Some(mask.as_view()),
///     rowscale: Some(rowscale.as_view()),
///     ..Default::default()
/// };
/// dr::backward(&h, &cfg, &dy, &mut dx, opts)?;
/// # Ok(()) }
/// ```
pub struct BackwardOptions<'a, T> {
    /// The caller-supplied row scale the forward used, `len == rows`.
    pub rowscale: Option<CudaView<'a, f32>>,
    /// The forward's 1-bit mask, read instead of regenerating, `len == cfg.mask_words()`.
    pub mask: Option<CudaView<'a, u32>>,
    /// Writes the bias gradient here, `len == cols`.
    pub dbias: Option<CudaViewMut<'a, T>>,
    /// Reusable space for the dbias partials (allocated per call when `None`).
    pub workspace: Option<&'a mut Workspace>,
    #[doc(hidden)]
    pub tuning: LaunchTuning,
}

impl<T> Default for BackwardOptions<'_, T> {
    fn default() -> Self {
        BackwardOptions {
            rowscale: None,
            mask: None,
            dbias: None,
            workspace: None,
            tuning: LaunchTuning::default(),
        }
    }
}

/// Buffer lengths of a forward call, checked the same way on the CPU and the GPU.
pub(crate) struct ForwardLens {
    pub x: usize,
    pub residual: usize,
    /// None in place (y is the residual).
    pub y: Option<usize>,
    pub bias: Option<usize>,
    pub rowscale: Option<usize>,
    pub mask_out: Option<usize>,
    pub rowscale_out: Option<usize>,
}

pub(crate) fn check_forward(cfg: &Config, l: &ForwardLens) -> Result<()> {
    let n = cfg.len();
    check_len(OP, "x", l.x, n)?;
    check_len(OP, "residual", l.residual, n)?;
    if let Some(y) = l.y {
        check_len(OP, "y", y, n)?;
    }
    if let Some(b) = l.bias {
        check_len(OP, "bias (one per column)", b, cfg.cols)?;
    }
    check_row_scale(cfg, l.rowscale)?;
    if let Some(m) = l.mask_out {
        check_len(OP, "mask_out (u32 words)", m, cfg.mask_words())?;
    }
    if let Some(r) = l.rowscale_out {
        if cfg.drop_path.is_none() {
            return Err(Error::invalid(
                OP,
                "rowscale_out is written only for a generated drop path (Config::with_drop_path)",
            ));
        }
        check_len(OP, "rowscale_out (one per row)", r, cfg.rows)?;
    }
    Ok(())
}

pub(crate) fn check_backward(
    cfg: &Config,
    dy: usize,
    dx: usize,
    rowscale: Option<usize>,
    mask: Option<usize>,
    dbias: Option<usize>,
) -> Result<()> {
    let n = cfg.len();
    check_len(OP, "dy", dy, n)?;
    check_len(OP, "dx", dx, n)?;
    check_row_scale(cfg, rowscale)?;
    if let Some(m) = mask {
        check_len(OP, "mask (u32 words)", m, cfg.mask_words())?;
    }
    if let Some(b) = dbias {
        check_len(OP, "dbias (one per column)", b, cfg.cols)?;
    }
    Ok(())
}

fn check_row_scale(cfg: &Config, rowscale: Option<usize>) -> Result<()> {
    if let Some(r) = rowscale {
        if cfg.drop_path.is_some() {
            return Err(Error::invalid(
                OP,
                "a caller-supplied rowscale and a generated drop path exclude each other",
            ));
        }
        check_len(OP, "rowscale (one per row)", r, cfg.rows)?;
    }
    if let Some(path) = cfg.drop_path {
        if path.rows_per_sample > 1 && cfg.rows > u32::MAX as usize {
            return Err(Error::invalid(
                OP,
                format!(
                    "a per-sample drop path needs fewer than 2^32 rows, got {}",
                    cfg.rows
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// REFERENCE.md §2: bytes per element.
    #[test]
    fn bytes_per_element_match_the_reference_table() {
        let n = 1u64 << 20;
        let per = |b: u64| b as f64 / n as f64;
        use DtypeKind::{Bf16, F32};
        assert_eq!(per(unfused_forward_bytes(Bf16, n, true)), 15.0);
        assert_eq!(per(unfused_forward_bytes(F32, n, true)), 29.0);
        assert_eq!(per(fused_forward_bytes(Bf16, n, true)), 6.125);
        assert_eq!(per(fused_forward_bytes(F32, n, true)), 12.125);
        assert_eq!(per(fused_forward_bytes(Bf16, n, false)), 6.0);
        assert_eq!(per(fused_forward_bytes(F32, n, false)), 12.0);
        assert_eq!(per(unfused_backward_bytes(Bf16, n, true)), 7.0);
        assert_eq!(per(unfused_backward_bytes(F32, n, true)), 13.0);
        assert_eq!(per(fused_backward_bytes(Bf16, n, false)), 4.0);
        assert_eq!(per(fused_backward_bytes(F32, n, false)), 8.0);
        // The mask of a length that is not a multiple of 32 is padded to whole words.
        assert_eq!(fused_forward_bytes(Bf16, 33, true), 6 * 33 + 8);
    }

    #[test]
    fn slab_partition_properties() {
        for kind in [DtypeKind::F32, DtypeKind::F16, DtypeKind::Bf16] {
            for &rows in &[
                0usize,
                1,
                2,
                15,
                16,
                17,
                37,
                257,
                4096,
                16384,
                1 << 20,
                1 << 26,
            ] {
                for &cols in &[0usize, 1, 3, 8, 1003, 1024, 4096, 65536] {
                    let s = slab_rows(rows, cols, kind);
                    let slabs = slab_count(rows, cols, kind);
                    assert!(s >= 1);
                    assert!(slabs <= 65_535, "{rows}x{cols}: {slabs} slabs");
                    assert!(rows == 0 || slabs * s >= rows && (slabs - 1) * s < rows);
                    if (16..=16 * 65_535).contains(&rows) {
                        assert!(s >= 16, "{rows}x{cols}: {s} rows per slab");
                    }
                }
            }
        }
        // About 2^17 threads for a mid-size bf16 shape.
        let (rows, cols) = (8192, 4096);
        let threads = slab_count(rows, cols, DtypeKind::Bf16) * cols / 8;
        assert_eq!(threads, 1 << 17);
    }

    #[test]
    fn tuning_is_validated() {
        assert!(LaunchTuning::default().check().is_ok());
        for block in [0, 16, 48, 512] {
            let t = LaunchTuning {
                block,
                ..Default::default()
            };
            assert!(t.check().is_err(), "block {block} accepted");
        }
    }
}
