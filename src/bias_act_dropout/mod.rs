//! Fused bias + activation + dropout, the feed-forward site of a transformer, forward and backward
//! with the bias gradient, on row-major `[rows, cols]` tensors:
//!
//! ```text
//! h  = x + bias[col]                      (no bias: h = x)
//! y  = keep(seed, call, i) ? act(h) / (1 - p) : 0
//! dx = keep(seed, call, i) ? dy / (1 - p) * act'(h) : 0
//! dbias[col] = sum over rows of dx[row, col]
//! ```
//!
//! `act` is one of [`Activation`]: GELU (erf), GELU (tanh approximation), SiLU, ReLU. `i = row *
//! cols + col` is the 64-bit flat element index and `keep` is the keying of
//! [`dropping`](crate::dropping) shared by every dropping op: [`philox::mask_word`](crate::philox::mask_word)
//! compared with the [`DropRate`] threshold, so the mask is a pure function of `(seed, call, i)`
//! (not of the tensor length, the launch, the vector width, the alignment or the GPU), and the
//! applied drop probability is exactly [`DropRate::effective_p`]. p = 0 and p = 1 are exact and do
//! no generator work. x, bias, y, dy, dx, dbias share one dtype (`f32`, `f16`, `bf16`); all math
//! is f32.
//!
//! # The backward's input: recompute `x + bias`, or read the saved `h`
//!
//! [`Preact::X`] (the default choice) recomputes `h = x + bias` from the forward's input, so the
//! forward stores nothing extra. [`Preact::H`] reads a saved `h` instead — cheaper when the caller
//! has it anyway (a matmul epilogue that already added the bias then calls this op with no bias,
//! and `h` *is* its `x`), or writes it from the forward (`h_out`). `h_out` is stored in the
//! tensor's dtype: for f32 the two choices give the same bits; for f16/bf16 `Preact::H` computes
//! `act'` at the rounded `h`, so its `dx` may differ in the last bits from `Preact::X`.
//!
//! # Pinned arithmetic (CPU and GPU agree bit for bit)
//!
//! Every operation is one IEEE f32 operation (the kernels are built with `--fmad=false`;
//! `fma` is written out), and the transcendentals are [`crate::fmath`], the same operations on
//! both sides. With `scale = DropRate::scale()` (0 for p = 1):
//!
//! * `h = x + b` (one add), `y = keep ? T(act(h) * scale) : +0`;
//! * `d = keep ? (dy * scale) * act'(h) : +0`, `dx = T(d)`;
//! * `dbias[col] = T(sum over slabs s, in order, of P(s, col))`, each slab `s` being
//!   [`slab_rows`](crate::dropping::slab_rows) rows (a function of the shape and dtype only),
//!   `P(s, col) = ((L0 + L1) + L2) + L3` where lane `l` sums, in increasing row order from `+0`,
//!   the unrounded `d` of the slab's rows `r` with `(r - slab_start) % 4 == l` — the partition of
//!   `dropout_residual`'s dbias. No float atomics: dbias is identical from run to run, GPU to
//!   GPU, launch to launch, and on the CPU.
//!
//! The activations, with `c` the Gaussian CDF factor and every line one rounded operation:
//!
//! | act | `act(h)` | `act'(h)` | saturated for |
//! | --- | --- | --- | --- |
//! | GELU (erf) | `c = fma(erf(h * 1/sqrt2), 0.5, 0.5)`; `h * c` | `fma(h, exp((-0.5 * h) * h) * 1/sqrt(2 pi), c)` | `|h| >= 16` |
//! | GELU (tanh) | `t = tanh(sqrt(2/pi) * fma(0.044715, (h * h) * h, h))`; `h * fma(t, 0.5, 0.5)` | `fma((0.5 * h) * fma(-t, t, 1), sqrt(2/pi) * fma(0.134145, h * h, 1), fma(t, 0.5, 0.5))` | `|h| >= 16` |
//! | SiLU | `h * sigmoid(h)` | `s * fma(h, 1 - s, 1)`, `s = sigmoid(h)` | `|h| >= 128` |
//! | ReLU | `h > 0 ? h : 0` | `h > 0 ? 1 : 0` | — |
//!
//! Saturated (including `±inf`): `act = h` for `h > 0` and `-0` below, `act' = 1` and `0` — what
//! the formulas give there, without `inf * 0`. A NaN `h` gives NaN in both directions (ReLU
//! included). A dropped element is `+0` in `y` and `dx` whatever `x` or `dy` hold.
//!
//! # Example (CPU reference; the GPU functions take the same [`Config`])
//!
//! ```
//! use fusedreg::bias_act_dropout::{cpu, Activation, Config, Preact};
//! # fn main() -> fusedreg::Result<()> {
//! let (rows, cols) = (4, 8);
//! let cfg = Config::new(rows, cols, Activation::GeluTanh, 0.1, /* seed */ 42, /* call */ 7)?;
//! let x: Vec<f32> = (0..rows * cols).map(|i| i as f32 / 8.0 - 2.0).collect();
//! let bias = vec![0.25f32; cols];
//! let mut y = vec![0.0f32; rows * cols];
//! cpu::forward(&cfg, &x, Some(&bias), &mut y, None)?;
//! let dy = vec![1.0f32; rows * cols];
//! let (mut dx, mut dbias) = (vec![0.0f32; rows * cols], vec![0.0f32; cols]);
//! let pre = Preact::X { x: &x[..], bias: Some(&bias[..]) };
//! cpu::backward(&cfg, &dy, pre, &mut dx, Some(&mut dbias))?;
//! for i in 0..rows * cols {
//!     // Dropped elements are zero in both directions; kept ones are act(h) / 0.9.
//!     let h = x[i] + 0.25;
//!     let want = if cfg.keeps(i as u64) { Activation::GeluTanh.forward(h) * cfg.rate().scale() } else { 0.0 };
//!     assert_eq!(y[i], want);
//!     assert!(cfg.keeps(i as u64) || dx[i] == 0.0);
//! }
//! # Ok(()) }
//! ```

use crate::dropping::{DropRate, Keying};
use crate::dtype::DtypeKind;
use crate::error::{check_len, Error, Result};

pub mod cpu;
mod gpu;
pub mod unfused;

pub use gpu::{backward, forward};

/// The name used in errors.
pub(crate) const OP: &str = "bias_act_dropout";

/// Row lanes of the backward's dbias partials (blockDim.y): the shared partition's.
pub(crate) const LANES: usize = crate::dropping::DBIAS_LANES;

/// The activation between the bias add and the dropout.
///
/// # Examples
///
/// ```
/// use fusedreg::bias_act_dropout::Activation;
/// assert_eq!(Activation::Relu.forward(-1.0), 0.0);
/// assert_eq!(Activation::Relu.grad(2.0), 1.0);
/// assert!((Activation::GeluErf.forward(1.0) - 0.841_344_7).abs() < 1e-6);
/// assert_eq!(Activation::ALL.len(), 4);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// GELU with the exact Gaussian CDF: `h * (1 + erf(h / sqrt 2)) / 2` (PyTorch
    /// `approximate="none"`).
    GeluErf,
    /// GELU with the tanh approximation: `h * (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))) / 2`
    /// (PyTorch `approximate="tanh"`, GPT-2).
    GeluTanh,
    /// SiLU / swish: `h * sigmoid(h)`.
    Silu,
    /// `max(h, 0)`.
    Relu,
}

impl Activation {
    /// Every activation.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// assert!(Activation::ALL.contains(&Activation::Silu));
    /// ```
    pub const ALL: [Activation; 4] = [
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Relu,
    ];

    /// The kernel's activation code (`ACT_*` in `kernels/bias_act_dropout.cu`).
    pub(crate) fn code(self) -> u32 {
        match self {
            Activation::GeluErf => 0,
            Activation::GeluTanh => 1,
            Activation::Silu => 2,
            Activation::Relu => 3,
        }
    }

    /// `act(h)` in f32, the same bits as the kernels (see the [module docs](self)).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// assert_eq!(Activation::Silu.forward(0.0), 0.0);
    /// assert_eq!(Activation::GeluErf.forward(f32::NEG_INFINITY).to_bits(), (-0.0f32).to_bits());
    /// assert_eq!(Activation::GeluTanh.forward(20.0), 20.0);
    /// ```
    pub fn forward(self, h: f32) -> f32 {
        cpu::act_fwd(self, h)
    }

    /// `act'(h)` in f32, the same bits as the kernels.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// assert_eq!(Activation::GeluErf.grad(0.0), 0.5);
    /// assert_eq!(Activation::Silu.grad(f32::INFINITY), 1.0);
    /// assert_eq!(Activation::Relu.grad(0.0), 0.0);
    /// ```
    pub fn grad(self, h: f32) -> f32 {
        cpu::act_grad(self, h)
    }
}

/// Where the backward gets the pre-activation `h` (see the [module docs](self)).
///
/// `B` is `&[T]` for the CPU reference and a `CudaView<T>` for the GPU.
///
/// # Examples
///
/// ```
/// use fusedreg::bias_act_dropout::{cpu, Activation, Config, Preact};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 2, Activation::Relu, 0.0, 1, 2)?;
/// let (x, b) = ([1.0f32, -1.0, 2.0, -2.0], [0.5f32, 0.5]);
/// let mut h = [0.0f32; 4];
/// let mut y = [0.0f32; 4];
/// cpu::forward(&cfg, &x, Some(&b), &mut y, Some(&mut h))?;
/// let dy = [1.0f32; 4];
/// let (mut dx1, mut dx2) = ([0.0f32; 4], [0.0f32; 4]);
/// cpu::backward(&cfg, &dy, Preact::X { x: &x[..], bias: Some(&b[..]) }, &mut dx1, None)?;
/// cpu::backward(&cfg, &dy, Preact::H(&h[..]), &mut dx2, None)?;
/// assert_eq!(dx1, dx2); // f32: the same bits either way
/// assert_eq!(dx1, [1.0, 0.0, 1.0, 0.0]);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug)]
pub enum Preact<B> {
    /// Recompute `h = x + bias` from the forward's input and bias (the default).
    X {
        /// The forward's input, `len == rows * cols`.
        x: B,
        /// The forward's bias, `len == cols`, if it had one.
        bias: Option<B>,
    },
    /// Read the saved pre-activation `h` (`len == rows * cols`), e.g. the forward's `h_out`.
    H(B),
}

/// Shape, activation, drop rate and random keys of one call: everything but the buffers.
/// Validated on construction; the CPU reference and the GPU kernels take the same `Config`.
///
/// ```
/// use fusedreg::bias_act_dropout::{Activation, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1024, 4096, Activation::GeluTanh, 0.1, 42, 7)?;
/// assert_eq!(cfg.len(), 1 << 22);
/// assert!(Config::new(usize::MAX, 2, Activation::Relu, 0.1, 0, 0).is_err()); // overflow
/// assert!(Config::new(4, 4, Activation::Relu, 1.5, 0, 0).is_err()); // p outside [0, 1]
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    rows: usize,
    cols: usize,
    act: Activation,
    keying: Keying,
}

impl Config {
    /// A `[rows, cols]` tensor (cols = the FFN width, the length of the bias), activated by
    /// `act`, dropped with probability `p` under `(seed, call)`.
    ///
    /// Errors: [`Error::ShapeMismatch`] when `rows * cols` overflows; [`Error::InvalidArgument`]
    /// when `p` is NaN or outside `[0, 1]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::{Activation, Config};
    /// use fusedreg::Error;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(8, 1024, Activation::Silu, 0.1, 42, 7)?;
    /// assert_eq!((cfg.rows(), cfg.cols(), cfg.act()), (8, 1024, Activation::Silu));
    /// let bad = Config::new(8, 1024, Activation::Silu, f64::NAN, 42, 7);
    /// assert!(matches!(bad, Err(Error::InvalidArgument { .. })));
    /// # Ok(()) }
    /// ```
    pub fn new(
        rows: usize,
        cols: usize,
        act: Activation,
        p: f64,
        seed: u64,
        call: u64,
    ) -> Result<Self> {
        let keying = Keying::new(OP, p, seed, call)?;
        rows.checked_mul(cols)
            .filter(|&n| u64::try_from(n).is_ok())
            .ok_or_else(|| Error::shape(OP, format!("rows * cols = {rows} * {cols} overflows")))?;
        Ok(Config {
            rows,
            cols,
            act,
            keying,
        })
    }

    /// Rows.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// assert_eq!(Config::new(16, 64, Activation::Relu, 0.1, 1, 2).unwrap().rows(), 16);
    /// ```
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the length of the bias).
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// assert_eq!(Config::new(16, 64, Activation::Relu, 0.1, 1, 2).unwrap().cols(), 64);
    /// ```
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements, `rows * cols`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// assert_eq!(Config::new(3, 5, Activation::Relu, 0.1, 1, 2).unwrap().len(), 15);
    /// ```
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True when there are no elements.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// assert!(Config::new(0, 5, Activation::Relu, 0.1, 1, 2).unwrap().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The activation.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// let cfg = Config::new(3, 5, Activation::GeluErf, 0.1, 1, 2).unwrap();
    /// assert_eq!(cfg.act(), Activation::GeluErf);
    /// ```
    pub fn act(&self) -> Activation {
        self.act
    }

    /// The dropout rate.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// let cfg = Config::new(3, 5, Activation::Relu, 0.25, 1, 2).unwrap();
    /// assert_eq!(cfg.rate().threshold(), 1 << 30);
    /// ```
    pub fn rate(&self) -> DropRate {
        self.keying.rate()
    }

    /// The generator seed.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// assert_eq!(Config::new(3, 5, Activation::Relu, 0.1, 42, 2).unwrap().seed(), 42);
    /// ```
    pub fn seed(&self) -> u64 {
        self.keying.seed()
    }

    /// The call id of the mask.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// assert_eq!(Config::new(3, 5, Activation::Relu, 0.1, 42, 7).unwrap().call(), 7);
    /// ```
    pub fn call(&self) -> u64 {
        self.keying.call()
    }

    /// The shared dropout keying (seed, call, rate) of the mask.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::bias_act_dropout::{Activation, Config};
    /// let cfg = Config::new(3, 5, Activation::Relu, 0.1, 42, 7).unwrap();
    /// assert_eq!((cfg.keying().seed(), cfg.keying().call()), (42, 7));
    /// ```
    pub fn keying(&self) -> Keying {
        self.keying
    }

    /// Whether element `i` (flat index) is kept.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::{Activation, Config};
    /// use fusedreg::philox::mask_word;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(2, 64, Activation::Relu, 0.1, 42, 7)?;
    /// assert_eq!(cfg.keeps(69), cfg.rate().keeps(mask_word(42, 7, 69)));
    /// # Ok(()) }
    /// ```
    pub fn keeps(&self, i: u64) -> bool {
        self.keying.keeps(i)
    }
}

/// Checks the lengths of a forward call.
pub(crate) fn check_forward(
    cfg: &Config,
    x: usize,
    bias: Option<usize>,
    y: usize,
    h_out: Option<usize>,
) -> Result<()> {
    let n = cfg.len();
    check_len(OP, "x", x, n)?;
    if let Some(b) = bias {
        check_len(OP, "bias (one per column)", b, cfg.cols)?;
    }
    check_len(OP, "y", y, n)?;
    if let Some(h) = h_out {
        check_len(OP, "h_out", h, n)?;
    }
    Ok(())
}

/// Checks the lengths of a backward call; `pre` is `(x or h, bias)`.
pub(crate) fn check_backward(
    cfg: &Config,
    dy: usize,
    pre: &Preact<usize>,
    dx: usize,
    dbias: Option<usize>,
) -> Result<()> {
    let n = cfg.len();
    check_len(OP, "dy", dy, n)?;
    match *pre {
        Preact::X { x, bias } => {
            check_len(OP, "x", x, n)?;
            if let Some(b) = bias {
                check_len(OP, "bias (one per column)", b, cfg.cols)?;
            }
        }
        Preact::H(h) => check_len(OP, "h", h, n)?,
    }
    check_len(OP, "dx", dx, n)?;
    if let Some(d) = dbias {
        check_len(OP, "dbias (one per column)", d, cfg.cols)?;
    }
    Ok(())
}

/// Device-memory bytes of the fused forward on `n` elements: read x, write y (`2 s`), plus `s`
/// when `h_out` is written. The bias is negligible. Saturating arithmetic.
///
/// ```
/// use fusedreg::bias_act_dropout::fused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, false), 4 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::F32, 1024, true), 12 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::F32, u64::MAX, false), u64::MAX);
/// ```
pub fn fused_forward_bytes(dtype: DtypeKind, n: u64, h_out: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if h_out { 3 * s } else { 2 * s })
}

/// Device-memory bytes of the fused backward on `n` elements: read dy and x (or h), write dx
/// (`3 s`). The dbias partials (4 bytes per column per slab) are not counted.
///
/// ```
/// use fusedreg::bias_act_dropout::fused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_backward_bytes(DtypeKind::Bf16, 1024), 6 * 1024);
/// ```
pub fn fused_backward_bytes(dtype: DtypeKind, n: u64) -> u64 {
    n.saturating_mul(3 * dtype.size() as u64)
}

/// Device-memory bytes of the unfused forward ([`unfused`], the PyTorch-eager way): bias add
/// (read x, write h: `2 s`, without bias none), activation (read h, write a: `2 s`), dropout
/// writing a byte mask (read a, write y and the mask: `2 s + 1`). bf16 with bias: 13 B per
/// element; f32: 25.
///
/// ```
/// use fusedreg::bias_act_dropout::unfused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1, true), 13);
/// assert_eq!(unfused_forward_bytes(DtypeKind::F32, 1, false), 17);
/// ```
pub fn unfused_forward_bytes(dtype: DtypeKind, n: u64, bias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if bias { 6 * s + 1 } else { 4 * s + 1 })
}

/// Device-memory bytes of the unfused backward: masked scale from the byte mask (read dy and the
/// mask, write g: `2 s + 1`), activation gradient (read g and h, write dx: `3 s`), and with dbias
/// a column sum (read dx: `s`). bf16 with dbias: 13 B per element.
///
/// ```
/// use fusedreg::bias_act_dropout::unfused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1, true), 13);
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1, false), 11);
/// ```
pub fn unfused_backward_bytes(dtype: DtypeKind, n: u64, dbias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if dbias { 6 * s + 1 } else { 5 * s + 1 })
}
