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
//! compared with the [`DropRate`](crate::dropping::DropRate) threshold, so the mask is a pure function of `(seed, call, i)`
//! (not of the tensor length, the launch, the vector width, the alignment or the GPU), and the
//! applied drop probability is exactly [`DropRate::effective_p`](crate::dropping::DropRate::effective_p). p = 0 and p = 1 are exact and do
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
//! # `Math::Exact`: pinned arithmetic (CPU and GPU agree bit for bit)
//!
//! The CPU reference ([`cpu`]) always computes this; the GPU does under [`Math::Exact`]
//! ([`Config::with_math`]; the default for ReLU). Every operation is one IEEE f32 operation (the kernels are built with `--fmad=false`;
//! `fma` is written out), and the transcendentals are [`crate::fmath`], the same operations on
//! both sides. With `scale = Keying::scale()` (`1 / (1 - effective p)` at the mask resolution,
//! so the output is unbiased however `p` is quantised; 0 for p = 1):
//!
//! * `h = x + b` (one add), `y = keep ? T(act(h) * scale) : +0`;
//! * `d = keep ? (dy * scale) * act'(h) : +0`, `dx = T(d)`;
//! * `dbias[col] = T(sum over slabs s, in order, of P(s, col))`, each slab `s` being
//!   [`slab_rows`](crate::dropping::slab_rows) rows (a function of the shape and dtype only),
//!   `P(s, col) = ((L0 + L1) + L2) + L3` where lane `l` sums, in increasing row order from `+0`,
//!   the unrounded `d` of the slab's rows `r` with `(r - slab_start) % 4 == l` — the partition of
//!   `dropout`'s dbias. No float atomics: dbias is identical from run to run, GPU to
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
//! # `Math::Fast` (the default for GELU and SiLU): a stated, tested bound
//!
//! The exact activations cost 60–100 SASS instructions per element, 3–4x what a memory-bound
//! kernel can issue at the copy rate (README, "instruction budget"). Under [`Math::Fast`] the
//! kernels use the special-function unit instead ([`crate::math`]: `ex2.approx.ftz`,
//! `rcp.approx.ftz`), branch-free:
//!
//! | act | `act(h)` | `act'(h)` | SASS per element (act / act') |
//! | --- | --- | --- | --- |
//! | GELU (tanh) | `h c`, `c = 1 / (1 + 2^z)`, `z = -2u log2 e` (`(1 + tanh u) / 2 = sigmoid(2u)`) | `c (1 + h u' (1 - c))`, `1 - c = 2^z c` | 8 / 12 |
//! | SiLU | `h c`, `c = 1 / (1 + 2^(-h log2 e))` | `c (1 + h (1 - c))` | 6 / 8 |
//! | GELU (erf) | `h Phi`, `Phi = q` (`h < 0`) or `1 - q`, `q = t 2^(-h^2 log2(e) / 2 + F(t))`, `t = 1 / (1 + |h| / 2 sqrt 2)`, `F` a fitted cubic | `Phi + h phi` from one `phi = 2^(-a^2 log2(e) / 2) / sqrt(2 pi)`, `a = min(|h|, 16)`: `r = phi (t P(t) - a)` (= `act'(-a)`), `act' = r` (`h < 0`) or `1 - r`, `t = 1 / (1 + 0.3 a)`, `P` a fitted cubic | 14 / 13 |
//!
//! The scale is folded into the forward's reciprocal (`1 / ((1 - p)(1 + 2^z))`) or exponent
//! (GELU erf), and into the GELU-tanh / SiLU backward's `c`: the exponent takes `log2(1 - p)`,
//! so `e' = (1 - p) 2^z`, `a = 1 / (e' + (1 - p)) = scale c` and `e' a = 1 - c` unscaled; the kept
//! `d` is `(dy * a) * (1 + w (e' a))` (`w = h u'` or `h`) instead of `(dy * scale) * act'(h)`.
//! The GELU-erf backward puts the scale into the exponent of the one `ex2` that `Phi` and `phi`
//! share (`2^(... + log2(1 / sqrt(2 pi)) - log2(1 - p))`): `d = dy * (scale act'(h))`, one
//! product. The sigmoid forms keep their relative accuracy in both tails, where
//! `1 + tanh.approx(u)` would lose all of it. Specials come out of the formulas: `h = +inf` gives
//! `+inf` (act) and 1 (act'), `h = -inf` gives `-0` and 0, NaN gives NaN; the backward clamps `h`
//! to where every intermediate is finite (±9 GELU tanh, ±80 SiLU, `|h| <= 16` GELU erf; beyond, act' is
//! 1 or 0 to within `2^-88`). The mask and the dropped `+0` are exact: the same keep bits as the
//! CPU reference in both modes.
//!
//! **Bounds** ([`Activation::fast_bound`]), against [`Activation::forward_f64`] /
//! [`Activation::grad_f64`] at the same f32 `h`, as `|error| <= rel |exact| + abs`:
//!
//! | act | `act`: rel / abs | `act'`: rel / abs |
//! | --- | --- | --- |
//! | GELU (tanh) | `2^-16` / `2^-118` | `2^-18` / `2^-23` |
//! | SiLU | `2^-17` / `2^-118` | `2^-18` / `2^-23` |
//! | GELU (erf) | `2^-11` / `2^-118` | `2^-12` / `2^-14` |
//!
//! Where they come from: the SFU's documented errors (ex2 2 ulp, rcp 1 ulp), the rounding of the
//! exponent's argument (an error of `|z| 2^-24` in `z` is a relative `ln 2 |z| 2^-24` in `2^z`,
//! up to `2^-17` where `|z|` nears 128), for GELU (erf) the cubics' fits (relative in `q = 1 -
//! Phi(|h|)`: `2^-11.56` for `F` in the forward, `2^-12.08` for `P` in the backward), and the flushing of subnormal intermediates (the `abs` of `act`, `2^-118`); the `abs`
//! of `act'` is for its zero crossing (GELU: `h = -0.75`, SiLU: `h = -1.28`), where no relative
//! bound can hold. A unit test (`fast.rs`) evaluates these formulas with every SFU result off by
//! its full documented error, in every combination of signs, on 48,000 inputs (edge values:
//! 0, ±tiny, subnormal, ±inf, NaN, the saturation and overflow points; random ones over
//! `[-20, 20]` and all of f32), and checks every bound; the deterministic model of the emulator
//! (`scripts/emu`) is checked against the CPU reference within them, and the GPU suite checks
//! the hardware the same way.
//!
//! On the outputs (`s = scale`, `u_T` half an ulp of `T` relative: `2^-24` f32, `2^-11` f16,
//! `2^-8` bf16; `m_T` half the smallest subnormal of `T`), with `A`, `G` the bounds above:
//!
//! * `y`: `|y - s act(h)| <= (A.rel + 2^-23 + u_T) |s act(h)| + s A.abs + m_T` (kept elements;
//!   dropped ones are exactly `+0`);
//! * `dx`: `|dx - dy s act'(h)| <= (G.rel + 2^-22 + u_T) |dy s act'(h)| + |dy s| G.abs + m_T
//!   + (1 + |b|) 2^-150`, where the kernel forms `dx = (dy a) b` (`b = h act'(h) / act(h)` for
//!   GELU (tanh) and SiLU, whose `a` carries the scale; `a = 1`, `b = s act'(h)` for GELU (erf),
//!   `dx = dy b`) and `dy a` may round in f32's subnormal range (a subnormal or near-subnormal
//!   `dy`);
//! * `dbias[col]`: with `d_r = dy_r s act'(h_r)` over the kept rows,
//!   `|dbias - sum d_r| <= sum ((G.rel + 2^-22) |d_r| + |dy_r s| G.abs) + rows 2^-24 sum |d_r|`,
//!   plus `u_T |dbias| + m_T` for the final rounding (the sum's order is the exact mode's).
//!
//! `h = x + bias` is the same f32 add in both modes (for [`Preact::H`] the saved, rounded `h`).
//! The unfused baseline ([`unfused`]) always runs the exact activations.
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
//!     let k = cfg.keying(fusedreg::DtypeKind::F32); // f32 data: 32-bit keys by default
//!     let want = if k.keeps(i as u64) { Activation::GeluTanh.forward(h) * k.scale() } else { 0.0 };
//!     assert_eq!(y[i], want);
//!     assert!(k.keeps(i as u64) || dx[i] == 0.0);
//! }
//! # Ok(()) }
//! ```

use crate::dropping::{check_shape, config_methods, KeySetting};
use crate::dtype::DtypeKind;
use crate::error::{check_len, Result};
use crate::math::{ErrorBound, Math};

pub mod cpu;
mod fast;
pub(crate) mod gpu;
pub mod unfused;

pub use gpu::{backward, backward_with_workspace, forward};

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

    /// `act(h)` in f64: the reference [`Math::Fast`]'s bounds are stated against (accurate in
    /// both tails: GELU (tanh) through `sigmoid(2u)`, GELU (erf) through `erfc`).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// let y = Activation::GeluErf.forward_f64(-10.0);
    /// assert!(y < 0.0 && y > -1e-21); // -10 Phi(-10) = -7.6e-23, not 0
    /// ```
    pub fn forward_f64(self, h: f64) -> f64 {
        fast::act_f64(self, h)
    }

    /// `act'(h)` in f64 (see [`Activation::forward_f64`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// assert!((Activation::Silu.grad_f64(0.0) - 0.5).abs() < 1e-15);
    /// ```
    pub fn grad_f64(self, h: f64) -> f64 {
        fast::grad_f64(self, h)
    }

    /// The default math mode of this activation: [`Math::Fast`] for GELU and SiLU (their exact
    /// path costs 3–4x the instruction budget of a memory-bound kernel), [`Math::Exact`] for
    /// ReLU (no transcendental: both modes are the same code).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// use fusedreg::Math;
    /// assert_eq!(Activation::GeluTanh.default_math(), Math::Fast);
    /// assert_eq!(Activation::Relu.default_math(), Math::Exact);
    /// ```
    pub fn default_math(self) -> Math {
        match self {
            Activation::Relu => Math::Exact,
            _ => Math::Fast,
        }
    }

    /// The error bounds of [`Math::Fast`] for this activation, against [`Activation::forward_f64`]
    /// and [`Activation::grad_f64`] at the same f32 `h` (see the module docs, "Math::Fast", for
    /// how they compose into bounds on `y`, `dx` and `dbias`). ReLU: exact (0, 0).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// let b = Activation::GeluTanh.fast_bound();
    /// assert!(b.act.rel <= 2f64.powi(-10) && b.grad.rel <= 2f64.powi(-10));
    /// assert_eq!(Activation::Relu.fast_bound().act.rel, 0.0);
    /// ```
    pub fn fast_bound(self) -> FastBound {
        let p = |e: i32| 2f64.powi(e);
        let (act, grad) = match self {
            Activation::GeluTanh => ((p(-16), p(-118)), (p(-18), p(-23))),
            Activation::Silu => ((p(-17), p(-118)), (p(-18), p(-23))),
            Activation::GeluErf => ((p(-11), p(-118)), (p(-12), p(-14))),
            Activation::Relu => ((0.0, 0.0), (0.0, 0.0)),
        };
        FastBound {
            act: ErrorBound {
                rel: act.0,
                abs: act.1,
            },
            grad: ErrorBound {
                rel: grad.0,
                abs: grad.1,
            },
        }
    }
}

/// The error bounds of an activation under [`Math::Fast`] ([`Activation::fast_bound`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastBound {
    /// `|act_fast(h) - act(h)|` with `act(h)` = [`Activation::forward_f64`].
    pub act: ErrorBound,
    /// `|act'_fast(h) - act'(h)|` with `act'(h)` = [`Activation::grad_f64`].
    pub grad: ErrorBound,
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

impl<B> Preact<B> {
    /// The lengths of its buffers, each `len(buffer)` (for [`check_backward`]).
    pub(crate) fn lens(&self, len: impl Fn(&B) -> usize) -> Preact<usize> {
        match self {
            Preact::X { x, bias } => Preact::X {
                x: len(x),
                bias: bias.as_ref().map(&len),
            },
            Preact::H(h) => Preact::H(len(h)),
        }
    }
}

/// Shape, activation, drop rate and random keys of one call: everything but the buffers.
/// Validated on construction; the CPU reference and the GPU kernels take the same `Config`.
/// Its keying methods (`rate`, `seed`, `call`, `with_resolution`, `resolution`,
/// `resolution_for`, `effective_p`, `scale`, `keying`, `keeps`) are those of its
/// [`KeySetting`], documented there.
///
/// ```
/// use fusedreg::bias_act_dropout::{Activation, Config};
/// use fusedreg::dropping::MaskResolution;
/// use fusedreg::philox::mask_word;
/// use fusedreg::DtypeKind::{Bf16, F32};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1024, 4096, Activation::GeluTanh, 0.1, 42, 7)?;
/// assert_eq!((cfg.rows(), cfg.cols(), cfg.len()), (1024, 4096, 1 << 22));
/// assert!(Config::new(0, 5, Activation::Relu, 0.1, 1, 2)?.is_empty());
/// assert!(Config::new(usize::MAX, 2, Activation::Relu, 0.1, 0, 0).is_err()); // overflow
/// assert!(Config::new(4, 4, Activation::Relu, 1.5, 0, 0).is_err()); // p outside [0, 1]
/// assert_eq!((cfg.rate().threshold(), cfg.seed(), cfg.call()), (429_496_730, 42, 7));
/// assert_eq!(cfg.keeps(F32, 69), cfg.rate().keeps(mask_word(42, 7, 69)));
/// let k = cfg.keying(Bf16);
/// assert_eq!((k.seed(), k.call(), k.resolution()), (42, 7, MaskResolution::Bits16));
/// let cfg8 = cfg.with_resolution(MaskResolution::Bits8);
/// assert_eq!(cfg8.resolution_for(Bf16), MaskResolution::Bits8);
/// assert_eq!(cfg8.effective_p(F32), 26.0 / 256.0);
/// assert_eq!(cfg8.scale(F32), (256.0f64 / 230.0) as f32);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    rows: usize,
    cols: usize,
    act: Activation,
    keys: KeySetting,
    math: Math,
}

impl Config {
    /// A `[rows, cols]` tensor (cols = the FFN width, the length of the bias), activated by
    /// `act`, dropped with probability `p` under `(seed, call)`.
    ///
    /// Errors: [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) when `rows * cols`
    /// overflows; [`Error::InvalidArgument`](crate::Error::InvalidArgument) when `p` is NaN or
    /// outside `[0, 1]`.
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
        let keys = KeySetting::new(OP, p, seed, call)?;
        check_shape(OP, rows, cols)?;
        Ok(Config {
            rows,
            cols,
            act,
            keys,
            math: act.default_math(),
        })
    }

    /// The same call in another math mode: [`Math::Exact`] for GPU results equal to the CPU
    /// reference's bits, [`Math::Fast`] for the special-function-unit formulas (the default for
    /// GELU and SiLU; see the module docs for their bounds). The CPU reference computes the
    /// exact function in either mode; the mask does not depend on the mode.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::{Activation, Config};
    /// use fusedreg::Math;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(8, 64, Activation::GeluTanh, 0.1, 42, 7)?;
    /// assert_eq!(cfg.math(), Math::Fast);
    /// assert_eq!(cfg.with_math(Math::Exact).math(), Math::Exact);
    /// assert_eq!(Config::new(2, 2, Activation::Relu, 0.1, 1, 2)?.math(), Math::Exact);
    /// # Ok(()) }
    /// ```
    pub fn with_math(self, math: Math) -> Self {
        Config { math, ..self }
    }

    /// The math mode (default [`Activation::default_math`]).
    pub fn math(&self) -> Math {
        self.math
    }

    config_methods!(
        "Every kernel of this op implements every resolution; the unfused baseline keys at 32"
        "bits only (its default for every dtype, an error for another explicit resolution)."
    );

    /// The activation.
    pub fn act(&self) -> Activation {
        self.act
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
