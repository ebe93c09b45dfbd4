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

use cudarc::driver::{CudaView, CudaViewMut};

use crate::dropout_keying::Keying;
use crate::dtype::DtypeKind;
use crate::error::{check_len, Error, Result};
use crate::philox::DropRate;

// The shared dropout pieces this op's API has always named (see crate::dropout_keying).
pub use crate::dropout_keying::{slab_count, slab_rows, DropPath, LaunchTuning, Workspace};

pub mod cpu;
mod gpu;
pub mod unfused;

pub use gpu::{backward, forward, forward_inplace};

/// The name used in errors.
pub(crate) const OP: &str = "dropout_residual";

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
        crate::dropout_keying::mask_words(self.len())
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

    /// The dropout keying (seed, call, rate) the shared pieces take.
    pub(crate) fn keying(&self) -> Keying {
        Keying::with_rate(self.rate, self.seed, self.call)
    }

    fn has_row_scale(&self, given: bool) -> bool {
        given || self.drop_path.is_some()
    }
}

/// Minimal device-memory bytes of the fused forward on `n` elements: read x and the residual,
/// write y (`3 s` per element), plus the 1-bit mask when written. Bias and row-scale traffic is
/// negligible and not counted. bf16: 6 B per element (6.125 with the mask); f32: 12 (12.125).
///
/// ```
/// use fusedreg::dropout_residual::fused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, false), 6 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, true), 6 * 1024 + 128);
/// ```
pub fn fused_forward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    3 * dtype.size() as u64 * n + if bitmask { 4 * n.div_ceil(32) } else { 0 }
}

/// Minimal bytes of the fused backward: read dy, write dx (`2 s`: 4 B bf16, 8 B f32), plus the
/// 1-bit mask when it is read instead of regenerated. The dbias partials (one f32 per slab and
/// column, written and read once) are not counted.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::fused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_backward_bytes(DtypeKind::Bf16, 1024, false), 4 * 1024);
/// assert_eq!(fused_backward_bytes(DtypeKind::F32, 1024, true), 8 * 1024 + 128);
/// ```
pub fn fused_backward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    2 * dtype.size() as u64 * n + if bitmask { 4 * n.div_ceil(32) } else { 0 }
}

/// Minimal bytes of the unfused forward ([`unfused`]): bias add (read x, write t: `2 s`), dropout
/// (read t, write d and a 1-byte mask: `2 s + 1`), residual add (read r and d, write y: `3 s`):
/// `7 s + 1` = 15 B bf16, 29 B f32. Without bias the first kernel is skipped: `5 s + 1`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::unfused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, true), 15 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::F32, 1024, true), 29 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, false), 11 * 1024);
/// ```
pub fn unfused_forward_bytes(dtype: DtypeKind, n: u64, bias: bool) -> u64 {
    let s = dtype.size() as u64;
    n * if bias { 7 * s + 1 } else { 5 * s + 1 }
}

/// Minimal bytes of the unfused backward: masked scale (read dy and the byte mask, write dx:
/// `2 s + 1`), then the bias-gradient column sum (read dx: `s`): `3 s + 1` = 7 B bf16, 13 B
/// f32. Without dbias only the first kernel runs: `2 s + 1`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::unfused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024, true), 7 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::F32, 1024, true), 13 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024, false), 5 * 1024);
/// ```
pub fn unfused_backward_bytes(dtype: DtypeKind, n: u64, dbias: bool) -> u64 {
    let s = dtype.size() as u64;
    n * if dbias { 3 * s + 1 } else { 2 * s + 1 }
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
        if path.rows_per_sample() > 1 && cfg.rows > u32::MAX as usize {
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
}
