//! Fused cross-entropy with label smoothing and z-loss: loss and logits gradient in one kernel,
//! with the gradient written in place into the logits buffer (or into a separate buffer), so no
//! `[rows, vocab]` temporary exists.
//!
//! Semantics are PyTorch's `F.cross_entropy(logits, target, label_smoothing=α,
//! ignore_index=i, reduction=r)` plus the optional PaLM z-loss `λ·lse²`. Per row, with
//! `lse = logsumexp(x)`:
//!
//! ```text
//! loss = (1-α)·(lse - x[t]) + α·(lse - mean(x)) + λ·lse²
//! grad = upstream · (softmax(x)·(1 + 2λ·lse) - (1-α)·onehot(t) - α/V)
//! ```
//!
//! `upstream` is `1/n_valid` for [`Reduction::Mean`], 1 for [`Reduction::Sum`], and for
//! [`Reduction::None`] that row's own upstream gradient (a per-row f32 buffer; 1 when not
//! given). A row whose target is `ignore_index` has loss 0 and an all-zero gradient row, and is
//! not counted in `n_valid`; with no valid rows the mean is 0 (not NaN) and every gradient is 0.
//! A target outside `[0, V)` that is not `ignore_index` is an [`Error`] on the CPU (targets are
//! checked on the host); on the GPU that row is treated like an ignored row (it reads nothing out
//! of bounds and is not counted) and a device-side flag is raised for the caller to read.
//!
//! Logits are `f32`, `f16` or `bf16` (all math in f32; the gradient is rounded once to the logits
//! dtype); targets are `i32` or `i64` ([`TargetIndex`]). Sizes and offsets are 64-bit.
//!
//! # Pinned arithmetic (Math::Exact: the CPU reference reproduces the kernel bit for bit)
//!
//! A row of `V` logits is cut into groups of [`GROUP`] = 8 consecutive elements (the last may be
//! shorter). Group `g` belongs to slot `g % SLOTS` ([`SLOTS`] = 256), and each slot folds its
//! groups in increasing `g` into a state `(m, s, sx)` — running max, sum of `exp(x - m)`, sum of
//! `x` — starting from `(-inf, 0, 0)`:
//!
//! ```text
//! gm = max of the group (x > gm || x is NaN ? x : gm, left to right)
//! if gm > m || gm is NaN { s = s · exp(m - gm); m = gm }
//! if m != -inf { s = s + exp(x_k - m) for each k, in order }
//! sx = sx + x_k for each k, in order
//! ```
//!
//! The 256 slot states are then combined by a halving tree (`h = 128, 64, …, 1`: state `i` takes
//! state `i + h`), combining `a` with `b` as `m = b.m > a.m ? b.m : a.m`,
//! `s = (a.m == m ? a.s : a.s·exp(a.m - m)) + (b.m == m ? b.s : b.s·exp(b.m - m))`,
//! `sx = a.sx + b.sx`. So the order of every reduction is a function of `V` only, never of the
//! launch configuration, the vector width, the alignment or the GPU. Then, each a single f32
//! operation: `lse = m + ln(s)`; `loss = conf·(lse - x[t])` (skipped when `conf = 1 - α` is 0),
//! `+ α·(lse - sx / V)` (skipped when α = 0), `+ λ·(lse·lse)` (skipped when λ = 0); and per
//! element `d = exp(x - lse)·zf - α/V`, `d = d - conf` at the target, `grad = T(d·upstream)`,
//! with `zf = 1 + 2λ·lse` (1 when λ = 0) and `α/V` rounded once on the host. `exp` and `ln` are
//! one shared implementation on both sides. The reduced loss sums the per-row losses in chunks of
//! [`REDUCE_CHUNK`] rows (256 strided sequential partial sums per chunk, then the halving tree),
//! repeated over the chunk sums until one value is left; the mean divides it by `n_valid` as f32.
//!
//! These skips keep masked vocabularies finite: `-inf` logits (with α = 0) and logits of ±1e4
//! give finite losses and gradients. With α > 0 a `-inf` logit makes `mean(x) = -inf` and the
//! loss `+inf`, as in PyTorch; a row whose logits are all `-inf` is NaN, as in PyTorch.
//!
//! # Non-finite logits
//!
//! | logits of a row | loss of the row | gradient row | sum / mean |
//! | --- | --- | --- | --- |
//! | a NaN anywhere, or a `+inf` | NaN | all NaN (whatever the upstream gradient) | NaN |
//! | `-inf` (masked), α = 0 | finite | 0 at the masked logits | finite |
//! | `-inf`, α > 0 | `+inf` | finite | `+inf` |
//! | all `-inf` | NaN | all NaN | NaN |
//! | anything, row ignored (or out-of-range target on the GPU) | 0 | all 0 | not counted |
//!
//! All as in PyTorch but the last line: an ignored row is not read at all, where PyTorch's
//! log-softmax backward turns a NaN in an ignored row into a NaN gradient row. The NaN-sticky
//! maximum above is what carries a NaN into `s` when it is the first element of a group while the
//! slot's maximum is still `-inf` (issue #25: such a NaN used to be dropped). Both math modes
//! follow this table.
//!
//! # Math::Fast (the default)
//!
//! [`Config::with_math`] chooses how the GPU kernel evaluates `exp` and `log`. [`Math::Exact`]
//! is the pinned arithmetic above ([`crate::fmath`]): the GPU equals the CPU reference bit for
//! bit, at about 86 instructions per element on the benchmark path. [`Math::Fast`] keeps the
//! same groups, slots, tree and `sx` (so the `α` term sees the same `sum(x)` bits) and puts `exp`
//! and `log` on the special-function unit (`kernels/common/fastmath.cuh`), as QuACK does:
//!
//! ```text
//! state m: the running maximum times log2(e), floored at -FLT_MAX     (L2E = log2(e) as f32)
//! per group: m' = max(m, max(gm·L2E, -FLT_MAX));
//!            s = s·ex2(m - m') + pairwise sum of ex2(fma(x_k, L2E, -m'))   (x_k = -inf pads)
//! combine:   m = max(a.m, b.m); s = a.s·ex2(a.m - m) + b.s·ex2(b.m - m)
//! lse2 = m + lg2(s); lse = lse2·LN2; the loss as above
//! grad = fma(ex2(fma(x, L2E, -lse2)), zf·scale, -(α/V·scale)), minus (1-α)·scale at the target
//! ```
//!
//! One FFMA and one `MUFU.EX2` per element and pass, no branch per element (a NaN or `+inf`
//! logit poisons its own term, so the table above holds unchanged). The CPU reference stays
//! exact in both modes: `Fast` changes only how close the GPU is to it. Its error against the CPU
//! reference, with `n = ⌈V / 2048⌉` (groups per slot), `u = 2^-21` and
//! `δ = (2n + 24 + |lse|)·u` (for `V = 128256`: `δ ≈ 7.2e-5 + 4.8e-7·|lse|`):
//!
//! * `lse` of a row: within `δ` (absolute).
//! * Loss of a row: within `w·δ + u·T`, `w = (1-α) + α + 2λ(|lse| + δ)`, `T` the sum of the
//!   magnitudes of its three terms `|(1-α)(lse - x_t)| + |α(lse - mean(x))| + λ·lse²`. For a
//!   plain language-model row (α = 0.1, λ = 0, `|lse|` ≈ 10, loss ≈ 2) that is about `8e-5`
//!   absolute, `4e-5` relative.
//! * Gradient, per element (f32, before rounding to the dtype):
//!   `|scale|·(p·(|zf|·(δ + 4u) + 2λδ) + u·(|zf| + α/V + (1-α)·[j = t]))`, `p = softmax(x)_j`;
//!   then one unit in the last place of the dtype (both sides round).
//! * Sum / mean: the sum of the rows' bounds plus `2^-16·Σ|loss_r|`, divided by `n_valid` for
//!   the mean.
//!
//! Where the bound comes from: `ex2.approx.ftz` and `lg2.approx.ftz` are within 2 ulp of the
//! exact result (2^-22 relative; `lg2` 2^-22 absolute for arguments in [0.5, 2]); each term of
//! `s` passes through at most `n + 8` rescales (its slot's later groups and the 8 tree levels),
//! each counted with that error (so the bound does not lean on 2^0 being exactly 1, which
//! NVIDIA documents); the exact reference's own summation order (one term at a time,
//! up to `8n` additions per slot) and rounding of `m + ln(s)` are included, as is f32's rounding
//! of `lse` itself (the `|lse|·u` part: with logits near 1e4 both sides are only good to about
//! 1e-3). It is a worst case: on random rows the observed error is far smaller. The tests hold
//! the kernel's fast arithmetic (run on the CPU over a model of the instructions that moves
//! every result by its documented worst error, up, down or at random) to it on random and edge
//! rows (huge, tiny, masked and ascending logits, smoothing, z-loss, ignored rows, every
//! reduction), the emulated kernel too (`tests/cross_entropy_emu.rs`), and the GPU suite holds
//! the device to it.
//!
//! # Bytes
//!
//! The two-pass kernel reads each row twice (pass 1: online softmax; pass 2: the gradient) and
//! writes the gradient once: `3 s` bytes per element (6 B bf16, 12 B f32) plus O(rows)
//! ([`fused_bytes`]). Reading the row once (a Hopper thread-block cluster holding a row in
//! distributed shared memory: `2 s`) is the next step and not implemented.
//!
//! # Example (CPU reference)
//!
//! ```
//! use fusedreg::cross_entropy::{cpu, Config, Reduction};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(2, 3)?.label_smoothing(0.1)?.reduction(Reduction::Mean);
//! let mut logits = vec![1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
//! let targets = [2i64, -100]; // the second row is ignored
//! let loss = cpu::forward_backward_inplace(&cfg, &mut logits, &targets, None)?;
//! assert_eq!(loss.n_valid, 1);
//! assert!((loss.reduced.unwrap() - loss.rows[0]).abs() == 0.0); // mean over one valid row
//! assert_eq!(&logits[3..], &[0.0, 0.0, 0.0]); // the ignored row's gradient
//! assert!(logits[..3].iter().sum::<f32>().abs() < 1e-6); // a softmax gradient sums to 0
//! # Ok(()) }
//! ```

use crate::dtype::DtypeKind;
use crate::error::{Error, Result};
use crate::math::Math;

pub mod cpu;
#[doc(hidden)]
pub mod fast_model;
pub(crate) mod gpu;
pub(crate) mod math;
pub mod unfused;

pub(crate) use gpu::workspace_size;
pub use gpu::{forward, forward_backward, forward_backward_inplace, Outputs, Workspace};

/// The name used in errors.
pub(crate) const OP: &str = "cross_entropy";

/// Consecutive elements per group of the pinned reduction order (one 16-byte load of a 16-bit
/// dtype, two of f32).
pub const GROUP: usize = 8;
/// Strided partial states per row (and the threads per block of the kernel).
pub const SLOTS: usize = 256;
/// Rows per chunk of the reduced-loss sum.
pub const REDUCE_CHUNK: usize = SLOTS * 16;
/// The largest vocabulary: `V` and `α/V` stay exact in f32 arithmetic below 2^24.
pub const MAX_VOCAB: usize = 1 << 24;
/// The most rows.
pub const MAX_ROWS: usize = 1 << 31;

mod sealed {
    pub trait Sealed {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// A target index type: `i32` or `i64`.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::TargetIndex;
/// assert_eq!(TargetIndex::to_i64(-100i32), -100);
/// assert_eq!(<i64 as TargetIndex>::NAME, "i64");
/// ```
pub trait TargetIndex:
    sealed::Sealed
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + Copy
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// `i32` or `i64` (the kernel symbol suffix is `t` + this).
    const NAME: &'static str;
    /// Widens to i64.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::TargetIndex;
    /// assert_eq!(7i32.to_i64(), 7i64);
    /// ```
    fn to_i64(self) -> i64;
}

impl TargetIndex for i32 {
    const NAME: &'static str = "i32";
    fn to_i64(self) -> i64 {
        i64::from(self)
    }
}

impl TargetIndex for i64 {
    const NAME: &'static str = "i64";
    fn to_i64(self) -> i64 {
        self
    }
}

/// How the per-row losses are reduced (PyTorch's `reduction`).
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{Config, Reduction};
/// # fn main() -> fusedreg::Result<()> {
/// assert_eq!(Config::new(4, 10)?.get_reduction(), Reduction::Mean); // PyTorch's default
/// assert_eq!(Reduction::None.loss_len(4), 4);
/// assert_eq!(Reduction::Sum.loss_len(4), 1);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// One loss per row; each row's gradient is scaled by its own upstream gradient.
    None,
    /// The sum over rows; gradient scale 1.
    Sum,
    /// The sum over non-ignored rows divided by their count; gradient scale `1/n_valid`.
    Mean,
}

impl Reduction {
    /// Length of the loss output: `rows` for `None`, 1 otherwise.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Reduction;
    /// assert_eq!(Reduction::Mean.loss_len(1000), 1);
    /// assert_eq!(Reduction::None.loss_len(1000), 1000);
    /// ```
    pub fn loss_len(self, rows: usize) -> usize {
        match self {
            Reduction::None => rows,
            Reduction::Sum | Reduction::Mean => 1,
        }
    }
}

/// Shape and options of one cross-entropy call: everything but the buffers. The CPU reference
/// and the GPU kernels take the same `Config`.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{Config, Reduction};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(8192, 128_256)?
///     .label_smoothing(0.1)?
///     .ignore_index(-100)
///     .z_loss(1e-4)?
///     .reduction(Reduction::Mean);
/// assert_eq!(cfg.len(), 8192 * 128_256);
/// assert!(Config::new(4, 0).is_err()); // an empty vocabulary has no softmax
/// assert!(Config::new(4, 10)?.label_smoothing(1.5).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    rows: usize,
    vocab: usize,
    alpha: f32,
    ignore_index: i64,
    z_loss: f32,
    reduction: Reduction,
    math: Math,
}

impl Config {
    /// `rows` rows of `vocab` logits, no smoothing, `ignore_index = -100`, no z-loss, mean,
    /// [`Math::Fast`].
    ///
    /// Errors: [`Error::InvalidArgument`] for `vocab` 0 or above [`MAX_VOCAB`], or `rows` above
    /// [`MAX_ROWS`]; [`Error::ShapeMismatch`] when `rows * vocab` overflows.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(3, 5)?;
    /// assert_eq!((cfg.rows(), cfg.vocab(), cfg.get_ignore_index()), (3, 5, -100));
    /// assert!(Config::new(0, 5)?.is_empty());
    /// assert!(Config::new(1, (1 << 24) + 1).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(rows: usize, vocab: usize) -> Result<Self> {
        if vocab == 0 || vocab > MAX_VOCAB {
            return Err(Error::invalid(
                OP,
                format!("vocab = {vocab} must lie in 1 ..= 2^24"),
            ));
        }
        if rows > MAX_ROWS {
            return Err(Error::invalid(OP, format!("rows = {rows} exceeds 2^31")));
        }
        rows.checked_mul(vocab)
            .filter(|&n| u64::try_from(n).is_ok())
            .ok_or_else(|| {
                Error::shape(OP, format!("rows * vocab = {rows} * {vocab} overflows"))
            })?;
        Ok(Config {
            rows,
            vocab,
            alpha: 0.0,
            ignore_index: -100,
            z_loss: 0.0,
            reduction: Reduction::Mean,
            math: Math::Fast,
        })
    }

    /// Label smoothing α in `[0, 1]` (PyTorch's `label_smoothing`), used as f32.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.label_smoothing(0.1)?.alpha(), 0.1f32);
    /// assert!(Config::new(1, 4)?.label_smoothing(-0.1).is_err());
    /// assert!(Config::new(1, 4)?.label_smoothing(f64::NAN).is_err());
    /// # Ok(()) }
    /// ```
    pub fn label_smoothing(self, alpha: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Error::invalid(
                OP,
                format!("label_smoothing = {alpha} is outside [0, 1]"),
            ));
        }
        Ok(Config {
            alpha: alpha as f32,
            ..self
        })
    }

    /// The target value whose rows are ignored (PyTorch's `ignore_index`, default -100).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.ignore_index(3).get_ignore_index(), 3);
    /// # Ok(()) }
    /// ```
    pub fn ignore_index(self, ignore_index: i64) -> Self {
        Config {
            ignore_index,
            ..self
        }
    }

    /// z-loss weight λ >= 0 (PaLM: 1e-4): adds `λ·lse²` per row.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.z_loss(1e-4)?.lambda(), 1e-4f32);
    /// assert!(Config::new(1, 4)?.z_loss(-1.0).is_err());
    /// assert!(Config::new(1, 4)?.z_loss(f64::INFINITY).is_err());
    /// # Ok(()) }
    /// ```
    pub fn z_loss(self, lambda: f64) -> Result<Self> {
        if !(lambda.is_finite() && lambda >= 0.0 && (lambda as f32).is_finite()) {
            return Err(Error::invalid(
                OP,
                format!("z_loss = {lambda} must be finite and >= 0"),
            ));
        }
        Ok(Config {
            z_loss: lambda as f32,
            ..self
        })
    }

    /// The reduction over rows.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::{Config, Reduction};
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(1, 4)?.reduction(Reduction::Sum);
    /// assert_eq!(cfg.get_reduction(), Reduction::Sum);
    /// # Ok(()) }
    /// ```
    pub fn reduction(self, reduction: Reduction) -> Self {
        Config { reduction, ..self }
    }

    /// How the GPU kernel evaluates `exp` and `log` (default [`Math::Fast`]; see "Math::Fast"
    /// in the [module docs](self) for its error bound). The CPU reference ([`cpu`]) is the exact
    /// arithmetic in either mode; [`Math::Exact`] makes the GPU match it bit for bit.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// use fusedreg::Math;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.math(), Math::Fast);
    /// assert_eq!(Config::new(1, 4)?.with_math(Math::Exact).math(), Math::Exact);
    /// # Ok(()) }
    /// ```
    pub fn with_math(self, math: Math) -> Self {
        Config { math, ..self }
    }

    /// The math mode of the GPU kernel.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert!(!Config::new(1, 4)?.math().is_exact());
    /// # Ok(()) }
    /// ```
    pub fn math(&self) -> Math {
        self.math
    }

    /// Rows.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(7, 5)?.rows(), 7);
    /// # Ok(()) }
    /// ```
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Vocabulary size `V` (logits per row).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(7, 5)?.vocab(), 5);
    /// # Ok(()) }
    /// ```
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Logits, `rows * vocab`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(7, 5)?.len(), 35);
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.rows * self.vocab
    }

    /// True when there are no rows.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert!(Config::new(0, 5)?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Label smoothing α as the f32 the arithmetic uses.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.alpha(), 0.0);
    /// # Ok(()) }
    /// ```
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// The ignored target value.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.get_ignore_index(), -100);
    /// # Ok(()) }
    /// ```
    pub fn get_ignore_index(&self) -> i64 {
        self.ignore_index
    }

    /// z-loss weight λ as f32 (0: off).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.lambda(), 0.0);
    /// # Ok(()) }
    /// ```
    pub fn lambda(&self) -> f32 {
        self.z_loss
    }

    /// The reduction.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::{Config, Reduction};
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::new(1, 4)?.get_reduction(), Reduction::Mean);
    /// # Ok(()) }
    /// ```
    pub fn get_reduction(&self) -> Reduction {
        self.reduction
    }

    /// The per-row constants of the pinned arithmetic, computed once on the host.
    pub(crate) fn consts(&self) -> Consts {
        let alpha = self.alpha;
        Consts {
            conf: 1.0 - alpha,
            alpha,
            eps: alpha / self.vocab as f32,
            vocab_f: self.vocab as f32,
            lambda: self.z_loss,
            lam2: 2.0 * self.z_loss,
        }
    }
}

/// f32 constants shared by the CPU reference and the kernel parameters (`#[repr(C)]`: the
/// kernels' parameter structs hold them as six consecutive floats).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Consts {
    /// `1 - α`: the weight of the target's one-hot.
    pub conf: f32,
    pub alpha: f32,
    /// `α / V`.
    pub eps: f32,
    pub vocab_f: f32,
    pub lambda: f32,
    /// `2λ`.
    pub lam2: f32,
}

/// Whether `t` is a valid class for a vocabulary of `vocab` (not the ignore index, in range).
pub(crate) fn target_class(t: i64, vocab: usize, ignore_index: i64) -> TargetClass {
    if t == ignore_index {
        TargetClass::Ignored
    } else if t >= 0 && (t as u64) < vocab as u64 {
        TargetClass::Valid(t as usize)
    } else {
        TargetClass::OutOfRange
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetClass {
    Valid(usize),
    Ignored,
    OutOfRange,
}

/// Minimal device-memory bytes of the fused two-pass kernel on `[rows, vocab]`: the row read
/// twice and the gradient written once (`3 s` per element: 6 B bf16, 12 B f32), the targets read
/// (8 B for i64) and one f32 loss per row written (4 B); saturating. Without a gradient
/// (`grad = false`, loss only) the row is read once. The reduced loss adds O(rows).
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::fused_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_bytes(DtypeKind::Bf16, 8, 1024, 8, true), 8 * 1024 * 6 + 8 * 12);
/// assert_eq!(fused_bytes(DtypeKind::F32, 8, 1024, 4, false), 8 * 1024 * 4 + 8 * 8);
/// assert_eq!(fused_bytes(DtypeKind::F32, u64::MAX, 2, 8, true), u64::MAX);
/// ```
pub fn fused_bytes(dtype: DtypeKind, rows: u64, vocab: u64, target_bytes: u64, grad: bool) -> u64 {
    let s = dtype.size() as u64;
    let per = if grad { 3 * s } else { s };
    rows.saturating_mul(vocab)
        .saturating_mul(per)
        .saturating_add(rows.saturating_mul(target_bytes.saturating_add(4)))
}

/// Minimal bytes of the unfused baseline ([`unfused`]), the eager way: log-softmax (read x
/// twice, write log-probabilities: `3 s`), gather + smoothing sum (read the log-probabilities:
/// `s`), backward (read the log-probabilities, write the gradient: `2 s`): `6 s` per element
/// (12 B bf16), plus per-row targets, lse and losses; saturating.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{fused_bytes, unfused_bytes};
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_bytes(DtypeKind::Bf16, 8, 1024, 8), 8 * 1024 * 12 + 8 * (2 * 8 + 4 * 4));
/// assert!(unfused_bytes(DtypeKind::Bf16, 8, 1024, 8) > fused_bytes(DtypeKind::Bf16, 8, 1024, 8, true));
/// ```
pub fn unfused_bytes(dtype: DtypeKind, rows: u64, vocab: u64, target_bytes: u64) -> u64 {
    let s = dtype.size() as u64;
    // Per row: targets read twice; lse written and read twice; loss written.
    let per_row = target_bytes.saturating_mul(2).saturating_add(16);
    rows.saturating_mul(vocab)
        .saturating_mul(6 * s)
        .saturating_add(rows.saturating_mul(per_row))
}

/// Checks the buffer lengths of a call: logits (and a separate gradient) `rows * vocab`,
/// targets `rows`, loss `reduction.loss_len(rows)`, upstream `rows` and only with
/// [`Reduction::None`].
pub(crate) fn check_lens(
    cfg: &Config,
    logits: usize,
    targets: usize,
    grad: Option<usize>,
    loss: usize,
    upstream: Option<usize>,
) -> Result<()> {
    use crate::error::check_len;
    check_len(OP, "logits", logits, cfg.len())?;
    check_len(OP, "targets", targets, cfg.rows())?;
    if let Some(g) = grad {
        check_len(OP, "grad", g, cfg.len())?;
    }
    check_len(OP, "loss", loss, cfg.reduction.loss_len(cfg.rows()))?;
    if let Some(u) = upstream {
        if cfg.reduction != Reduction::None {
            return Err(Error::invalid(
                OP,
                "a per-row upstream gradient is only taken with Reduction::None \
                 (mean and sum scale every row alike)",
            ));
        }
        check_len(OP, "upstream", u, cfg.rows())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_element() {
        let n = 1u64 << 20;
        assert_eq!(fused_bytes(DtypeKind::Bf16, 1, n, 0, true) - 4, 6 * n);
        assert_eq!(fused_bytes(DtypeKind::F32, 1, n, 0, true) - 4, 12 * n);
        assert_eq!(unfused_bytes(DtypeKind::Bf16, 1, n, 0) - 16, 12 * n);
        assert_eq!(unfused_bytes(DtypeKind::F32, u64::MAX, n, 8), u64::MAX);
    }

    #[test]
    fn target_classes() {
        assert_eq!(target_class(-100, 5, -100), TargetClass::Ignored);
        assert_eq!(target_class(4, 5, -100), TargetClass::Valid(4));
        assert_eq!(target_class(5, 5, -100), TargetClass::OutOfRange);
        assert_eq!(target_class(-1, 5, -100), TargetClass::OutOfRange);
        assert_eq!(target_class(3, 5, 3), TargetClass::Ignored);
        assert_eq!(target_class(i64::MIN, 5, -100), TargetClass::OutOfRange);
    }
}
