//! What every dropping op shares (dropout, bias_act_dropout, dropout_add_norm): rate and
//! threshold, keying, the drop path (row scale), the 1-bit mask, the dbias slab partition, the
//! CPU keep bits, and (in the crate) the launch geometry and the shared backward. The device side is
//! `kernels/common/dropping.cuh`; both sides implement one contract.
//!
//! # The keying contract
//!
//! Element `i` (the flat 64-bit index `row * cols + col`) is dropped when its Philox word
//! ([`crate::philox::mask_word`]`(seed, call, i)`) is below [`DropRate::threshold`]: the mask is a
//! pure function of `(seed, call, i)`, independent of the tensor length, the launch configuration,
//! the vector width, the alignment and the GPU. p = 0 and p = 1 are exact (no generator work); the
//! probability applied is [`DropRate::effective_p`]. Kept elements are scaled by
//! [`DropRate::scale`], times the row scale when there is one (caller's or a [`DropPath`]).
//! Under [`MaskResolution::Bits16`] element `i` takes halfword `i % 8` of Philox block `i / 8`
//! instead, compared with `round(p * 2^16)`; under [`MaskResolution::Bits8`] byte `i % 16` of
//! block `i / 16`, compared with `round(p * 2^8)` ([`Config::effective_p`] states the
//! probability applied, and the scale is one over its complement).
//!
//! # What a new dropping op uses
//!
//! Public (its API re-exports them): [`Config`] (shape, optional [`DropPath`] and a
//! [`KeySetting`]: rate, seed, call, [`MaskResolution`], unset by default and resolved per dtype
//! by [`MaskResolution::resolve`]; every op's `Config` holds one and offers its methods through
//! the crate-internal `config_methods!`),
//! [`ForwardOptions`] / [`BackwardOptions`] (GPU) and
//! [`CpuForwardOptions`] / [`CpuBackwardOptions`] (the optional buffers: bias, row scale, 1-bit
//! mask, generated row scale, dbias, workspace), [`DropRate`], [`Keying`] (seed, call, rate,
//! resolution: `keeps(i)`, [`KeepBits`] for a CPU loop that evaluates each Philox block once),
//! [`mask_words`] / [`mask_bit`] / [`set_mask_bit`] (the 1-bit mask layout: bit `b` of word `w`
//! is element `32 w + b`, padding bits zero), [`slab_rows`] / [`slab_count`] (the dbias
//! partition), [`Workspace`] (reusable column-gradient partials, one type for every dropping
//! op), `LaunchTuning` (hidden, for tests).
//!
//! Crate-internal: `check_forward` / `check_backward` (buffer lengths and option conflicts, as
//! `Error`s naming the op), `check_shape`, `KeySetting::keying_bits32` (the unfused baselines' 32-bit-only keying),
//! `row_scales` / `row_multiplier` (CPU row scale), `backward_cpu` (the CPU reference of the
//! shared backward, `dx = m != 0 ? T(dy * m) : 0` with dbias), `Workspace::partials` (the
//! partials of one backward, in the caller's workspace or per call); in `gpu`: `segments` /
//! `geometry` / `Slabs` / `aligned16` (launch geometry and the 16-byte alignment test of every
//! dropping op), `row_scale_fields` (the caller's row scale or the drop path's keys, for any
//! op's params), `resolution_flag`, `zero_mask`, `backward` (the whole GPU backward of an op
//! whose gradient is `m * dy`, given its kernel families), `launch_backward`, `finish_dbias`
//! (the ordered sum of `[slabs][cols]` partials; the kernel is `FUSEDREG_DROPPING_DBIAS_KERNEL`);
//! in `unfused`: the eager baseline's launches (bias add, dropout with a byte mask, masked
//! scale, column sum) and their CPU mirrors. The device side of each is named in the header's
//! top comment. The dependency runs one way: `dropping` uses [`crate::philox`] (the generator),
//! never the reverse.
//!
//! ```
//! use fusedreg::dropping::{mask_bit, mask_words, set_mask_bit, Keying};
//! # fn main() -> fusedreg::Result<()> {
//! let k = Keying::new("my_op", 0.1, /* seed */ 42, /* call */ 7)?;
//! let n = 100;
//! let mut mask = vec![0u32; mask_words(n)];
//! let mut bits = k.keep_bits();
//! for i in 0..n {
//!     if bits.get(i as u64) {
//!         set_mask_bit(&mut mask, i)?;
//!     }
//! }
//! assert!((0..n).all(|i| mask_bit(&mask, i) == Some(k.keeps(i as u64))));
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::dtype::{Dtype, DtypeKind};
use crate::error::{check_len, try_vec, Error, Result};
use crate::philox;
use crate::runtime::Handle;
use crate::runtime::WorkspaceView;

pub(crate) mod gpu;
pub(crate) mod rows;
pub(crate) mod unfused;

/// The op name in errors raised by the shared pieces themselves.
const OP: &str = "dropout";

/// A drop probability compiled to the integer threshold the kernels compare against.
///
/// `threshold = round(p * 2^32)`, held in 64 bits so that `p = 1` (threshold `2^32`) drops
/// every element and `p = 0` (threshold 0) drops none; kernels skip the generator entirely in
/// both cases. The probability actually applied is `threshold / 2^32`, within `2^-33` of `p`.
/// The kept elements are scaled by `1 / (1 - threshold / 2^32)`, one over the probability of
/// keeping that is actually applied, so the output's expectation is exactly the input's (up to
/// the f32 rounding of the scale) at every resolution ([`DropRate::scale_at`]).
///
/// ```
/// use fusedreg::dropping::DropRate;
/// let r = DropRate::new(0.5).unwrap();
/// assert_eq!(r.threshold(), 1 << 31);
/// assert!(r.keeps(1 << 31) && !r.keeps((1 << 31) - 1));
/// assert_eq!(r.scale(), 2.0);
/// assert!(DropRate::new(f64::NAN).is_err());
/// assert!(DropRate::new(1.5).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropRate {
    p: f64,
    threshold: u64,
}

impl DropRate {
    /// No dropping.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// assert_eq!(DropRate::ZERO, DropRate::new(0.0).unwrap());
    /// assert!(DropRate::ZERO.keeps_all() && DropRate::ZERO.keeps(0));
    /// assert_eq!(DropRate::ZERO.scale(), 1.0);
    /// ```
    pub const ZERO: DropRate = DropRate {
        p: 0.0,
        threshold: 0,
    };

    /// Validates `p` (must lie in `[0, 1]`, not NaN) and computes its threshold.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// let r = DropRate::new(0.1).unwrap();
    /// assert_eq!(r.p(), 0.1);
    /// assert_eq!(r.threshold(), 429_496_730); // round(0.1 * 2^32)
    /// assert!(matches!(DropRate::new(-0.1), Err(fusedreg::Error::InvalidArgument { .. })));
    /// assert!(DropRate::new(f64::INFINITY).is_err());
    /// ```
    pub fn new(p: f64) -> Result<Self> {
        Self::checked("DropRate", p)
    }

    /// Like [`DropRate::new`], naming `op` in the error.
    pub(crate) fn checked(op: &'static str, p: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                op,
                format!("drop probability p = {p} must lie in [0, 1]"),
            ));
        }
        let threshold = (p * 4_294_967_296.0).round() as u64;
        Ok(DropRate { p, threshold })
    }

    /// The nominal probability.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// assert_eq!(DropRate::new(0.3).unwrap().p(), 0.3);
    /// ```
    pub fn p(&self) -> f64 {
        self.p
    }

    /// The integer threshold in `0 ..= 2^32`: a word below it is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// assert_eq!(DropRate::new(0.25).unwrap().threshold(), 1 << 30);
    /// assert_eq!(DropRate::new(1.0).unwrap().threshold(), 1 << 32);
    /// assert_eq!(DropRate::ZERO.threshold(), 0);
    /// ```
    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    /// The drop probability actually applied, `threshold / 2^32`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// assert_eq!(DropRate::new(0.5).unwrap().effective_p(), 0.5);
    /// let r = DropRate::new(0.1).unwrap();
    /// // 0.1 is not a multiple of 2^-32: the nearest one is applied, within 2^-33 of it.
    /// assert_ne!(r.effective_p(), 0.1);
    /// assert!((r.effective_p() - 0.1).abs() <= 2f64.powi(-33));
    /// ```
    pub fn effective_p(&self) -> f64 {
        self.threshold as f64 / 4_294_967_296.0
    }

    /// The threshold at a mask resolution: [`DropRate::threshold`] for `Bits32`,
    /// `round(p * 2^16)` in `0 ..= 2^16` for `Bits16` (a 16-bit halfword below it is dropped),
    /// `round(p * 2^8)` in `0 ..= 2^8` for `Bits8` (a byte below it is dropped).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{DropRate, MaskResolution::*};
    /// let r = DropRate::new(0.25).unwrap();
    /// assert_eq!((r.threshold_at(Bits32), r.threshold_at(Bits16)), (1 << 30, 1 << 14));
    /// assert_eq!(DropRate::new(1.0).unwrap().threshold_at(Bits16), 1 << 16);
    /// assert_eq!(DropRate::new(0.1).unwrap().threshold_at(Bits8), 26); // round(25.6)
    /// ```
    pub fn threshold_at(&self, resolution: MaskResolution) -> u64 {
        match resolution {
            MaskResolution::Bits32 => self.threshold,
            MaskResolution::Bits16 => (self.p * 65_536.0).round() as u64,
            MaskResolution::Bits8 => (self.p * 256.0).round() as u64,
        }
    }

    /// The drop probability actually applied at a mask resolution: `threshold_at(r) / 2^bits`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{DropRate, MaskResolution::*};
    /// let r = DropRate::new(0.1).unwrap();
    /// assert!((r.effective_p_at(Bits16) - 0.1).abs() <= 2f64.powi(-17));
    /// assert_eq!(r.effective_p_at(Bits32), r.effective_p());
    /// ```
    pub fn effective_p_at(&self, resolution: MaskResolution) -> f64 {
        self.threshold_at(resolution) as f64 / 2f64.powi(resolution.bits() as i32)
    }

    /// Whether an element with this random word is kept.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// let r = DropRate::new(0.25).unwrap(); // threshold 2^30
    /// assert!(!r.keeps(0) && !r.keeps((1 << 30) - 1));
    /// assert!(r.keeps(1 << 30) && r.keeps(u32::MAX));
    /// assert!(!DropRate::new(1.0).unwrap().keeps(u32::MAX));
    /// ```
    #[inline]
    pub fn keeps(&self, word: u32) -> bool {
        u64::from(word) >= self.threshold
    }

    /// True when no element can be dropped (no generator work needed).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// assert!(DropRate::new(0.0).unwrap().keeps_all());
    /// assert!(!DropRate::new(1e-9).unwrap().keeps_all());
    /// // Below 2^-33 the threshold rounds to 0: nothing is dropped.
    /// assert!(DropRate::new(1e-10).unwrap().keeps_all());
    /// ```
    pub fn keeps_all(&self) -> bool {
        self.threshold == 0
    }

    /// True when every element is dropped (`p = 1`; no generator work needed).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// assert!(DropRate::new(1.0).unwrap().drops_all());
    /// assert!(!DropRate::new(0.999).unwrap().drops_all());
    /// ```
    pub fn drops_all(&self) -> bool {
        self.threshold == 1 << 32
    }

    /// The f32 scale applied to kept elements under 32-bit keying: [`DropRate::scale_at`]`(Bits32)`
    /// = `1 / (1 - effective_p())`; 0 when `p = 1`, where nothing is kept and no division by zero
    /// happens.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::DropRate;
    /// assert_eq!(DropRate::new(0.2).unwrap().scale(), 1.25);
    /// assert_eq!(DropRate::new(0.0).unwrap().scale(), 1.0);
    /// assert_eq!(DropRate::new(1.0).unwrap().scale(), 0.0);
    /// ```
    pub fn scale(&self) -> f32 {
        self.scale_at(MaskResolution::Bits32)
    }

    /// The f32 scale applied to kept elements at a mask resolution: `1 / (1 - q)` with `q` =
    /// [`DropRate::effective_p_at`]`(resolution)`, the probability of dropping actually applied,
    /// so that kept elements make up exactly for the dropped ones (no bias from the
    /// quantisation of `p`, however coarse the resolution). Rounded once to f32 from the exact
    /// quotient `2^bits / (2^bits - threshold)` computed in f64; 0 when every element is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{DropRate, MaskResolution::*};
    /// let r = DropRate::new(0.1).unwrap();
    /// // Bits16 applies 6554 / 65536 = 0.100006..: the scale is one over its complement.
    /// assert_eq!(r.scale_at(Bits16), (65536.0f64 / (65536.0 - 6554.0)) as f32);
    /// assert_ne!(r.scale_at(Bits16), (1.0f64 / 0.9) as f32);
    /// // A rate that rounds to dropping nothing is not scaled.
    /// assert_eq!(DropRate::new(1e-6).unwrap().scale_at(Bits16), 1.0);
    /// assert_eq!(DropRate::new(1.0).unwrap().scale_at(Bits16), 0.0);
    /// ```
    pub fn scale_at(&self, resolution: MaskResolution) -> f32 {
        let all = 2f64.powi(resolution.bits() as i32);
        let t = self.threshold_at(resolution) as f64;
        if t >= all {
            0.0
        } else {
            // all and all - t are exact in f64 (t <= 2^32): one f64 rounding, then one to f32.
            (all / (all - t)) as f32
        }
    }
}

/// How many random bits key one element's keep/drop decision.
///
/// * [`MaskResolution::Bits32`] (the default for f32): element `i` takes 32-bit word `i % 4` of Philox
///   block `i / 4`; the drop probability is quantised to `2^-32` ([`DropRate::threshold`]).
/// * [`MaskResolution::Bits16`] (the default for f16 and bf16): element `i` takes 16-bit halfword `i % 8` of Philox block
///   `i / 8` (halfword `k` is the low half of word `k / 2` for even `k`, the high half for odd
///   `k`) and is dropped when it is below `round(p * 2^16)`: one Philox evaluation keys 8
///   elements (a 16-bit type's 16-byte vector), half the generator work of `Bits32`; the
///   probability applied is quantised to `2^-16` ([`DropRate::effective_p_at`]).
///
/// * [`MaskResolution::Bits8`]: element `i` takes byte `i % 16` of Philox block `i / 16` (byte
///   `k` is bits `8 (k % 4)` .. of word `k / 4`, little-endian like memory) and is dropped when
///   it is below `round(p * 2^8)` (FlashAttention's resolution): one Philox evaluation keys 16
///   elements; the probability applied is quantised to `2^-8`.
///
/// Whatever the resolution the mask is a pure function of `(seed, call, i)` and kept elements
/// are scaled by `1 / (1 - effective p)`, so the output is unbiased. A `(seed, call)` pair should
/// key masks at one resolution only (all read the same Philox blocks). Each op's docs say which
/// resolutions its kernels implement; the others are refused with an error, never run as
/// another resolution.
///
/// There is no dtype-free default: an op's `Config` holds an `Option<MaskResolution>`
/// (`None` unless `with_resolution` is called) and resolves it at the call from the element
/// type with [`MaskResolution::resolve`] (the rule and the counts it rests on are there).
///
/// ```
/// use fusedreg::dropping::{DropRate, MaskResolution};
/// use fusedreg::DtypeKind;
/// let r = DropRate::new(0.1).unwrap();
/// assert_eq!(r.threshold_at(MaskResolution::Bits16), 6554); // round(0.1 * 2^16)
/// assert_eq!(r.effective_p_at(MaskResolution::Bits16), 6554.0 / 65536.0);
/// assert_eq!(MaskResolution::default_for(DtypeKind::Bf16), MaskResolution::Bits16);
/// assert_eq!(MaskResolution::default_for(DtypeKind::F32), MaskResolution::Bits32);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MaskResolution {
    /// One 32-bit word per element, 4 elements per Philox block (`p` quantised to `2^-32`).
    Bits32,
    /// One 16-bit halfword per element, 8 elements per Philox block (`p` quantised to `2^-16`).
    ///
    /// Kept elements are scaled by `1 / (1 - effective p)` ([`DropRate::scale_at`]), so the
    /// output stays unbiased; the rate applied differs from `p` by up to `2^-17` (a `p` below
    /// `2^-17` rounds to dropping nothing, and then nothing is scaled either): check
    /// [`DropRate::effective_p_at`] (or use `Bits32`) where that matters.
    Bits16,
    /// One byte per element, 16 elements per Philox block (`p` quantised to `2^-8`).
    ///
    /// Unbiased as `Bits16` is, but the rate applied differs from `p` by up to `2^-9` (0.1 runs
    /// as 26/256 = 0.1016, and a `p` below `2^-9` rounds to dropping nothing).
    Bits8,
}

impl MaskResolution {
    /// Random bits per element.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::MaskResolution;
    /// assert_eq!((MaskResolution::Bits32.bits(), MaskResolution::Bits16.bits()), (32, 16));
    /// assert_eq!(MaskResolution::Bits8.bits(), 8);
    /// ```
    pub fn bits(self) -> u32 {
        match self {
            MaskResolution::Bits32 => 32,
            MaskResolution::Bits16 => 16,
            MaskResolution::Bits8 => 8,
        }
    }

    /// The default resolution of an element type: [`MaskResolution::Bits16`] for f16 and bf16,
    /// [`MaskResolution::Bits32`] for f32. Chosen from the static SASS count per element of the
    /// kernels on their benchmark path (`scripts/sass-budget`, nvcc 13.0.88, sm_90, `[16384,
    /// 4096]`; `benches/sass-budget.json`), instructions per element, 32-bit / 16-bit keys:
    ///
    /// | kernel | bf16 | f16 | f32 |
    /// | --- | --- | --- | --- |
    /// | dropout fwd (bias) | 23.7 / **19.5** | 24.0 / **19.7** | **29.7** / 33.2 |
    /// | dropout bwd + dbias | 22.6 / **17.4** | 22.6 / **17.3** | **24.8** / 28.7 |
    /// | bias_act_dropout fwd GELU-tanh (`Math::Fast`) | 29.8 / **25.6** | | |
    /// | bias_act_dropout fwd ReLU | 23.7 / **19.4** | | |
    /// | bias_act_dropout bwd GELU-tanh | 36.1 / **31.8** | | |
    /// | dropout_add_norm LN fwd (tier t2) | 44.9 / **42.7** | | |
    /// | dropout_add_norm LN bwd (tier t2) | 61.3 / **59.1** | | |
    ///
    /// A 16-byte vector holds 8 elements of a 16-bit type, so one Philox block keys exactly
    /// one vector at 16 bits (half the generator work of 32 bits); an f32 vector holds 4, and
    /// splitting halfwords out of a block costs more than it saves. `Bits8` is sometimes
    /// cheaper still but applies `p` only to `2^-9` (0.1 runs as 0.1016): not a default.
    /// The f16 column counts the dropout kernels only (the other ops' f16 paths differ from
    /// bf16 only in the conversion); the prediction that 16-bit keys are faster at 16-bit dtypes
    /// is to be checked on a GPU (benches/NOTES.md, "default keying per dtype").
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::MaskResolution;
    /// use fusedreg::DtypeKind;
    /// assert_eq!(MaskResolution::default_for(DtypeKind::F16), MaskResolution::Bits16);
    /// assert_eq!(MaskResolution::default_for(DtypeKind::F32), MaskResolution::Bits32);
    /// ```
    pub const fn default_for(dtype: DtypeKind) -> MaskResolution {
        match dtype {
            DtypeKind::F16 | DtypeKind::Bf16 => MaskResolution::Bits16,
            DtypeKind::F32 => MaskResolution::Bits32,
        }
    }

    /// A config's resolution setting resolved for an element type: the explicit choice when
    /// there is one (it always wins), else [`MaskResolution::default_for`]`(dtype)`. Every
    /// path of every dropping op (the GPU launch, the CPU reference, the backward that
    /// regenerates the forward's mask) resolves through this one function, so the same config
    /// and dtype key the same mask everywhere.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::MaskResolution::{self, *};
    /// use fusedreg::DtypeKind;
    /// assert_eq!(MaskResolution::resolve(None, DtypeKind::Bf16), Bits16);
    /// assert_eq!(MaskResolution::resolve(None, DtypeKind::F32), Bits32);
    /// assert_eq!(MaskResolution::resolve(Some(Bits32), DtypeKind::Bf16), Bits32);
    /// assert_eq!(MaskResolution::resolve(Some(Bits8), DtypeKind::F32), Bits8);
    /// ```
    pub const fn resolve(setting: Option<MaskResolution>, dtype: DtypeKind) -> MaskResolution {
        match setting {
            Some(r) => r,
            None => MaskResolution::default_for(dtype),
        }
    }

    /// log2 of the elements one Philox block keys (2, 3 or 4).
    fn block_shift(self) -> u32 {
        match self {
            MaskResolution::Bits32 => 2,
            MaskResolution::Bits16 => 3,
            MaskResolution::Bits8 => 4,
        }
    }
}

/// The random keys and rate of one dropout call: everything that decides its mask.
///
/// A `Keying` always has a concrete [`MaskResolution`] (32 bits from [`Keying::new`] and
/// [`Keying::with_rate`], which know no dtype); the ops' configs build theirs at the call with
/// the resolution resolved for the element type (`Config::keying(dtype)`).
///
/// ```
/// use fusedreg::dropping::Keying;
/// use fusedreg::philox::mask_word;
/// # fn main() -> fusedreg::Result<()> {
/// let k = Keying::new("example", 0.25, 42, 7)?;
/// assert_eq!(k.keeps(5), mask_word(42, 7, 5) >= 1 << 30);
/// assert!(Keying::new("example", 2.0, 42, 7).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Keying {
    seed: u64,
    call: u64,
    rate: DropRate,
    resolution: MaskResolution,
}

impl Keying {
    /// Validates `p` (naming `op` in the error) and keeps the keys.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::Keying;
    /// # fn main() -> fusedreg::Result<()> {
    /// let k = Keying::new("op", 0.5, 1, 2)?;
    /// assert_eq!((k.seed(), k.call(), k.rate().threshold()), (1, 2, 1 << 31));
    /// assert!(matches!(Keying::new("op", f64::NAN, 1, 2), Err(fusedreg::Error::InvalidArgument { .. })));
    /// # Ok(()) }
    /// ```
    pub fn new(op: &'static str, p: f64, seed: u64, call: u64) -> Result<Self> {
        Ok(Keying {
            seed,
            call,
            rate: DropRate::checked(op, p)?,
            resolution: MaskResolution::Bits32,
        })
    }

    /// From an already validated rate.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{DropRate, Keying};
    /// # fn main() -> fusedreg::Result<()> {
    /// let k = Keying::with_rate(DropRate::new(0.5)?, 1, 2);
    /// assert_eq!(k, Keying::new("op", 0.5, 1, 2)?);
    /// # Ok(()) }
    /// ```
    pub fn with_rate(rate: DropRate, seed: u64, call: u64) -> Self {
        Keying {
            seed,
            call,
            rate,
            resolution: MaskResolution::Bits32,
        }
    }

    /// The same keys at another mask resolution.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{Keying, MaskResolution};
    /// use fusedreg::philox::block;
    /// let k = Keying::new("op", 0.5, 1, 2).unwrap().with_resolution(MaskResolution::Bits16);
    /// // Element 8 * 3 + 5 takes the high half of word 2 of block 3.
    /// assert_eq!(k.keeps(29), block(1, 2, 3)[2] >> 16 >= 1 << 15);
    /// ```
    pub fn with_resolution(self, resolution: MaskResolution) -> Self {
        Keying { resolution, ..self }
    }

    /// The mask resolution.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::{Keying, MaskResolution};
    /// assert_eq!(Keying::new("op", 0.1, 9, 3).unwrap().resolution(), MaskResolution::Bits32);
    /// ```
    pub fn resolution(&self) -> MaskResolution {
        self.resolution
    }

    /// The threshold the kernels compare against at this resolution.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::{Keying, MaskResolution};
    /// let k = Keying::new("op", 0.5, 9, 3).unwrap();
    /// assert_eq!(k.threshold(), 1 << 31);
    /// assert_eq!(k.with_resolution(MaskResolution::Bits16).threshold(), 1 << 15);
    /// ```
    pub fn threshold(&self) -> u64 {
        self.rate.threshold_at(self.resolution)
    }

    /// The drop probability applied at this resolution.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::{Keying, MaskResolution};
    /// let k = Keying::new("op", 0.3, 9, 3).unwrap().with_resolution(MaskResolution::Bits16);
    /// assert_eq!(k.effective_p(), (0.3f64 * 65536.0).round() / 65536.0);
    /// ```
    pub fn effective_p(&self) -> f64 {
        self.rate.effective_p_at(self.resolution)
    }

    /// The f32 scale of kept elements at this resolution: `1 / (1 - effective_p())`
    /// ([`DropRate::scale_at`]); 0 when every element is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::{Keying, MaskResolution};
    /// let k = Keying::new("op", 0.1, 9, 3).unwrap();
    /// assert_eq!(k.scale(), k.rate().scale());
    /// let k16 = k.with_resolution(MaskResolution::Bits16);
    /// assert_eq!(k16.scale(), (1.0 / (1.0 - k16.effective_p())) as f32);
    /// ```
    pub fn scale(&self) -> f32 {
        self.rate.scale_at(self.resolution)
    }

    /// The generator seed.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::Keying;
    /// assert_eq!(Keying::new("op", 0.1, 9, 3).unwrap().seed(), 9);
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The call id (a different one per dropout site and step).
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::Keying;
    /// assert_eq!(Keying::new("op", 0.1, 9, 3).unwrap().call(), 3);
    /// ```
    pub fn call(&self) -> u64 {
        self.call
    }

    /// The drop rate.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::Keying;
    /// assert_eq!(Keying::new("op", 0.1, 9, 3).unwrap().rate().p(), 0.1);
    /// ```
    pub fn rate(&self) -> DropRate {
        self.rate
    }

    /// Whether element `i` (flat index) is kept.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::Keying;
    /// assert!(Keying::new("op", 0.0, 9, 3).unwrap().keeps(17));
    /// assert!(!Keying::new("op", 1.0, 9, 3).unwrap().keeps(17));
    /// ```
    pub fn keeps(&self, i: u64) -> bool {
        self.keep_bits().get(i)
    }

    /// A CPU keep-bit generator for this call (one Philox evaluation per 4 elements).
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg::dropping::Keying;
    /// let k = Keying::new("op", 0.3, 9, 3).unwrap();
    /// let mut bits = k.keep_bits();
    /// assert!((0..64).all(|i| bits.get(i) == k.keeps(i)));
    /// ```
    pub fn keep_bits(&self) -> KeepBits {
        KeepBits {
            seed: self.seed,
            call: self.call,
            threshold: self.threshold(),
            all: 1 << self.resolution.bits(),
            shift: self.resolution.block_shift(),
            block: u64::MAX,
            words: [0; 4],
        }
    }
}

/// Keep bits by flat index on the CPU, evaluating each Philox block once for its four elements
/// (fastest when indices are visited in increasing order).
///
/// ```
/// use fusedreg::dropping::Keying;
/// let mut bits = Keying::new("op", 0.5, 1, 2).unwrap().keep_bits();
/// let kept = (0..1000u64).filter(|&i| bits.get(i)).count();
/// assert!((400..600).contains(&kept));
/// ```
#[derive(Clone, Debug)]
pub struct KeepBits {
    seed: u64,
    call: u64,
    threshold: u64,
    /// The threshold that drops everything (2^32, 2^16 or 2^8).
    all: u64,
    /// log2 of the elements per Philox block (2, 3 or 4).
    shift: u32,
    block: u64,
    words: [u32; 4],
}

impl KeepBits {
    /// Whether element `i` is kept (p = 0 and p = 1 without generator work, like the kernels).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::Keying;
    /// let k = Keying::new("op", 0.5, 1, 2).unwrap();
    /// let mut bits = k.keep_bits();
    /// assert_eq!(bits.get(12345), k.keeps(12345));
    /// ```
    #[inline]
    pub fn get(&mut self, i: u64) -> bool {
        if self.threshold == 0 {
            return true;
        }
        if self.threshold >= self.all {
            return false;
        }
        let b = i >> self.shift;
        if b != self.block {
            self.block = b;
            self.words = philox::block(self.seed, self.call, b);
        }
        let value = match self.shift {
            2 => self.words[(i & 3) as usize],
            // Halfword i % 8: word (i % 8) / 2, low half for even i.
            3 => (self.words[((i & 7) >> 1) as usize] >> (16 * (i & 1))) & 0xffff,
            // Byte i % 16: word (i % 16) / 4, byte i % 4 of it (little-endian).
            _ => (self.words[((i & 15) >> 2) as usize] >> (8 * (i & 3))) & 0xff,
        };
        u64::from(value) >= self.threshold
    }
}

/// The dropout keys a dropping op's `Config` holds: rate, seed, call and the mask resolution
/// setting (`None` unless chosen, then resolved per dtype at the call by
/// [`MaskResolution::resolve`]). The `Config` of `dropout`, `bias_act_dropout` and
/// `dropout_add_norm` each hold one and offer its methods as their own (`cfg.resolution()`,
/// `cfg.effective_p(dtype)`, `cfg.keeps(dtype, i)`, ...): they are documented here, once.
///
/// ```
/// use fusedreg::dropping::{KeySetting, MaskResolution::*};
/// use fusedreg::DtypeKind::{Bf16, F16, F32};
/// # fn main() -> fusedreg::Result<()> {
/// let keys = KeySetting::new("example", 0.1, 42, 7)?;
/// assert_eq!((keys.rate().p(), keys.seed(), keys.call()), (0.1, 42, 7));
/// // Unset, the resolution is the dtype's default; an explicit one wins for every dtype.
/// assert_eq!(keys.resolution(), None);
/// assert_eq!([keys.resolution_for(Bf16), keys.resolution_for(F16)], [Bits16; 2]);
/// assert_eq!(keys.resolution_for(F32), Bits32);
/// assert_eq!(keys.with_resolution(Bits8).resolution(), Some(Bits8));
/// assert_eq!(keys.with_resolution(Bits32).resolution_for(Bf16), Bits32);
/// assert!(KeySetting::new("example", 1.5, 42, 7).is_err()); // p outside [0, 1]
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeySetting {
    rate: DropRate,
    seed: u64,
    call: u64,
    resolution: Option<MaskResolution>,
}

impl KeySetting {
    /// No dropping (p = 0, seed and call 0), the resolution unset.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::KeySetting;
    /// use fusedreg::DtypeKind::Bf16;
    /// assert!(KeySetting::NONE.rate().keeps_all());
    /// assert!(KeySetting::NONE.keeps(Bf16, 17));
    /// assert_eq!(KeySetting::NONE.scale(Bf16), 1.0);
    /// ```
    pub const NONE: KeySetting = KeySetting {
        rate: DropRate::ZERO,
        seed: 0,
        call: 0,
        resolution: None,
    };

    /// Validates `p` (naming `op` in the error: [`Error::InvalidArgument`] when `p` is NaN or
    /// outside `[0, 1]`) and keeps the keys, the resolution unset.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::KeySetting;
    /// use fusedreg::Error;
    /// let bad = KeySetting::new("op", f64::NAN, 42, 7);
    /// assert!(matches!(bad, Err(Error::InvalidArgument { .. })));
    /// ```
    pub fn new(op: &'static str, p: f64, seed: u64, call: u64) -> Result<Self> {
        Ok(KeySetting {
            rate: DropRate::checked(op, p)?,
            seed,
            call,
            resolution: None,
        })
    }

    /// New rate and keys, the same resolution setting (so that it is kept whichever of the
    /// two is set first).
    pub(crate) fn rekeyed(self, op: &'static str, p: f64, seed: u64, call: u64) -> Result<Self> {
        Ok(KeySetting {
            resolution: self.resolution,
            ..Self::new(op, p, seed, call)?
        })
    }

    /// The same keys at an explicit mask resolution, whatever the dtype
    /// ([`MaskResolution::Bits32`]: 4 elements per Philox block; [`MaskResolution::Bits16`]:
    /// element `i` takes halfword `i % 8` of block `i / 8`, half the generator work, `p`
    /// quantised to `2^-16`; [`MaskResolution::Bits8`]: byte `i % 16` of block `i / 16`, a
    /// quarter of it, `p` quantised to `2^-8`, FlashAttention's resolution: 0.1 is applied as
    /// 26 / 256 = 0.1016). Kept elements are scaled by one over the complement of the
    /// probability actually applied ([`KeySetting::effective_p`]), so the output is unbiased
    /// at every resolution. Without it the resolution is the dtype's default
    /// ([`MaskResolution::default_for`]: 16 bits for f16 and bf16, 32 for f32). The CPU
    /// references implement every resolution; an op whose kernels do not implement one returns
    /// an error for it on the GPU (its `with_resolution` says what it offers), and the unfused
    /// baselines key at 32 bits only.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{KeySetting, MaskResolution};
    /// use fusedreg::philox::block;
    /// use fusedreg::DtypeKind::F32;
    /// # fn main() -> fusedreg::Result<()> {
    /// let keys = KeySetting::new("op", 0.1, 42, 7)?.with_resolution(MaskResolution::Bits8);
    /// assert_eq!(keys.effective_p(F32), 26.0 / 256.0); // round(0.1 * 2^8) / 2^8
    /// // Element 16 * 3 + 5 takes byte 1 of word 1 of Philox block 3.
    /// assert_eq!(keys.keeps(F32, 53), (block(42, 7, 3)[1] >> 8) & 0xff >= 26);
    /// # Ok(()) }
    /// ```
    pub fn with_resolution(self, resolution: MaskResolution) -> Self {
        KeySetting {
            resolution: Some(resolution),
            ..self
        }
    }

    /// The explicit mask resolution, `None` (the default) for the dtype's default.
    pub fn resolution(&self) -> Option<MaskResolution> {
        self.resolution
    }

    /// The resolution a `dtype` call keys at: [`MaskResolution::resolve`] of this setting (the
    /// explicit choice, else the dtype's default). An op with two element types (a norm's `x`
    /// and its stream) resolves for the type of `x`.
    pub fn resolution_for(&self, dtype: DtypeKind) -> MaskResolution {
        MaskResolution::resolve(self.resolution, dtype)
    }

    /// The dropout rate.
    pub fn rate(&self) -> DropRate {
        self.rate
    }

    /// The generator seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The call id of the mask (a different one per dropout site and step).
    pub fn call(&self) -> u64 {
        self.call
    }

    /// The drop probability a `dtype` call actually applies: `threshold / 2^32` (`Bits32`),
    /// `round(p * 2^16) / 2^16` (`Bits16`) or `round(p * 2^8) / 2^8` (`Bits8`), at
    /// [`KeySetting::resolution_for`]`(dtype)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{KeySetting, MaskResolution::*};
    /// use fusedreg::DtypeKind::{Bf16, F32};
    /// # fn main() -> fusedreg::Result<()> {
    /// let keys = KeySetting::new("op", 0.1, 1, 2)?;
    /// assert_eq!(keys.effective_p(F32), keys.rate().effective_p());
    /// assert_eq!(keys.effective_p(Bf16), 6554.0 / 65536.0); // 16-bit keys by default
    /// assert_eq!(keys.with_resolution(Bits16).effective_p(F32), 6554.0 / 65536.0);
    /// assert_eq!(keys.with_resolution(Bits8).effective_p(F32), 26.0 / 256.0);
    /// # Ok(()) }
    /// ```
    pub fn effective_p(&self, dtype: DtypeKind) -> f64 {
        self.keying(dtype).effective_p()
    }

    /// The f32 scale of kept elements of a `dtype` call: `1 / (1 - effective_p(dtype))`
    /// ([`DropRate::scale_at`] at [`KeySetting::resolution_for`]`(dtype)`); 0 for `p = 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{KeySetting, MaskResolution::*};
    /// use fusedreg::DtypeKind::{Bf16, F32};
    /// # fn main() -> fusedreg::Result<()> {
    /// let keys = KeySetting::new("op", 0.2, 1, 2)?;
    /// assert_eq!(keys.scale(F32), 1.25);
    /// // bf16 keys at 16 bits by default: applies 13107 / 65536
    /// assert_eq!(keys.scale(Bf16), (65536.0f64 / (65536.0 - 13107.0)) as f32);
    /// assert_eq!(keys.with_resolution(Bits16).scale(F32), keys.scale(Bf16));
    /// let keys = KeySetting::new("op", 0.1, 1, 2)?;
    /// assert_eq!(keys.with_resolution(Bits16).scale(F32), (65536.0f64 / (65536.0 - 6554.0)) as f32);
    /// assert_eq!(keys.with_resolution(Bits8).scale(F32), (256.0f64 / 230.0) as f32);
    /// assert_eq!(KeySetting::new("op", 1.0, 1, 2)?.scale(F32), 0.0);
    /// # Ok(()) }
    /// ```
    pub fn scale(&self, dtype: DtypeKind) -> f32 {
        self.keying(dtype).scale()
    }

    /// The keying (seed, call, rate and the resolution resolved for `dtype`) of a `dtype` call:
    /// what the CPU reference, the GPU forward and the backward that regenerates its mask all
    /// key with.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::{KeySetting, MaskResolution};
    /// use fusedreg::DtypeKind::Bf16;
    /// # fn main() -> fusedreg::Result<()> {
    /// let keys = KeySetting::new("op", 0.1, 42, 7)?;
    /// let k = keys.keying(Bf16);
    /// assert_eq!((k.seed(), k.call(), k.resolution()), (42, 7, MaskResolution::Bits16));
    /// assert_eq!(k.keeps(9), keys.keeps(Bf16, 9));
    /// # Ok(()) }
    /// ```
    pub fn keying(&self, dtype: DtypeKind) -> Keying {
        Keying::with_rate(self.rate, self.seed, self.call)
            .with_resolution(self.resolution_for(dtype))
    }

    /// Whether element `i` (flat index `row * cols + col`) of a `dtype` call is kept by the
    /// dropout mask (the resolution resolved for `dtype`, as the call does).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::KeySetting;
    /// use fusedreg::philox::mask_word;
    /// use fusedreg::DtypeKind::F32;
    /// # fn main() -> fusedreg::Result<()> {
    /// let keys = KeySetting::new("op", 0.1, 42, 7)?;
    /// let i = 64 + 5; // row 1, column 5 of 64 columns
    /// assert_eq!(keys.keeps(F32, i), keys.rate().keeps(mask_word(42, 7, i))); // 32-bit keys
    /// assert!(KeySetting::new("op", 0.0, 42, 7)?.keeps(F32, 3)); // p = 0 keeps everything
    /// assert!(!KeySetting::new("op", 1.0, 42, 7)?.keeps(F32, 3)); // p = 1 nothing
    /// # Ok(()) }
    /// ```
    pub fn keeps(&self, dtype: DtypeKind, i: u64) -> bool {
        self.keying(dtype).keeps(i)
    }

    /// The keying of an unfused baseline, which keys at 32 bits only (PyTorch has no coarser
    /// keying): 32 bits for every dtype by default, and an error naming `op` for an explicit
    /// other resolution (never run as another one).
    pub(crate) fn keying_bits32(&self, op: &'static str) -> Result<Keying> {
        match self.resolution {
            None | Some(MaskResolution::Bits32) => Ok(self.keying(DtypeKind::F32)),
            Some(r) => Err(Error::invalid(
                op,
                format!(
                    "{r:?} keying is offered by the fused op, not by its unfused baseline (32-bit keys, as PyTorch)"
                ),
            )),
        }
    }
}

/// The methods every dropping op's `Config` shares, over its `rows`, `cols` and `keys` (a
/// [`KeySetting`]) fields: the shape (`rows`, `cols`, `len`, `is_empty`) and the keying, each
/// keying method the [`KeySetting`] method of the same name (documented there);
/// `with_resolution` takes the op's own doc lines (what its kernels offer) as arguments.
macro_rules! config_methods {
    ($($with_resolution_doc:literal)*) => {
        /// Rows.
        pub fn rows(&self) -> usize {
            self.rows
        }

        /// Columns (the length of the bias and of the normalised dimension).
        pub fn cols(&self) -> usize {
            self.cols
        }

        /// Elements, `rows * cols`.
        pub fn len(&self) -> usize {
            self.rows * self.cols
        }

        /// True when there are no elements.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }

        /// The same config keyed at another mask resolution
        /// ([`KeySetting::with_resolution`](crate::dropping::KeySetting::with_resolution)).
        $(#[doc = $with_resolution_doc])*
        pub fn with_resolution(self, resolution: $crate::dropping::MaskResolution) -> Self {
            Self {
                keys: self.keys.with_resolution(resolution),
                ..self
            }
        }

        /// The explicit mask resolution, `None` (the default) for the dtype's default
        /// ([`KeySetting::resolution`](crate::dropping::KeySetting::resolution)).
        pub fn resolution(&self) -> Option<$crate::dropping::MaskResolution> {
            self.keys.resolution()
        }

        /// The resolution a `dtype` call keys at
        /// ([`KeySetting::resolution_for`](crate::dropping::KeySetting::resolution_for)).
        pub fn resolution_for(
            &self,
            dtype: $crate::DtypeKind,
        ) -> $crate::dropping::MaskResolution {
            self.keys.resolution_for(dtype)
        }

        /// The dropout rate ([`KeySetting::rate`](crate::dropping::KeySetting::rate)).
        pub fn rate(&self) -> $crate::dropping::DropRate {
            self.keys.rate()
        }

        /// The generator seed ([`KeySetting::seed`](crate::dropping::KeySetting::seed)).
        pub fn seed(&self) -> u64 {
            self.keys.seed()
        }

        /// The call id of the mask ([`KeySetting::call`](crate::dropping::KeySetting::call)).
        pub fn call(&self) -> u64 {
            self.keys.call()
        }

        /// The drop probability a `dtype` call actually applies
        /// ([`KeySetting::effective_p`](crate::dropping::KeySetting::effective_p)).
        pub fn effective_p(&self, dtype: $crate::DtypeKind) -> f64 {
            self.keys.effective_p(dtype)
        }

        /// The f32 scale of kept elements of a `dtype` call
        /// ([`KeySetting::scale`](crate::dropping::KeySetting::scale)).
        pub fn scale(&self, dtype: $crate::DtypeKind) -> f32 {
            self.keys.scale(dtype)
        }

        /// The keying of a `dtype` call: seed, call, rate and the resolution resolved for
        /// `dtype` ([`KeySetting::keying`](crate::dropping::KeySetting::keying)).
        pub fn keying(&self, dtype: $crate::DtypeKind) -> $crate::dropping::Keying {
            self.keys.keying(dtype)
        }

        /// Whether element `i` (flat index) of a `dtype` call is kept
        /// ([`KeySetting::keeps`](crate::dropping::KeySetting::keeps)).
        pub fn keeps(&self, dtype: $crate::DtypeKind, i: u64) -> bool {
            self.keys.keeps(dtype, i)
        }
    };
}
pub(crate) use config_methods;

/// Length in `u32` words of the 1-bit mask of `n` elements: `ceil(n / 32)`.
///
/// ```
/// use fusedreg::dropping::mask_words;
/// assert_eq!((mask_words(0), mask_words(32), mask_words(33)), (0, 1, 2));
/// ```
pub fn mask_words(n: usize) -> usize {
    n.div_ceil(32)
}

/// Bit `i` of a 1-bit mask (bit `i % 32` of word `i / 32`), or `None` when `i` is past the
/// mask (`i >= 32 * mask.len()`), as [`slice::get`] does.
///
/// ```
/// use fusedreg::dropping::mask_bit;
/// assert_eq!(mask_bit(&[0, 0b100], 34), Some(true));
/// assert_eq!(mask_bit(&[0, 0b100], 33), Some(false));
/// assert_eq!(mask_bit(&[0, 0b100], 64), None);
/// ```
#[inline]
pub fn mask_bit(mask: &[u32], i: usize) -> Option<bool> {
    mask.get(i / 32).map(|w| w >> (i % 32) & 1 == 1)
}

/// Sets bit `i` of a 1-bit mask (the mask starts zeroed: padding bits stay 0).
///
/// Errors: [`Error::InvalidArgument`] when `i` is past the mask (`i >= 32 * mask.len()`; size
/// masks with [`mask_words`]); the mask is not changed.
///
/// ```
/// use fusedreg::dropping::set_mask_bit;
/// # fn main() -> fusedreg::Result<()> {
/// let mut m = [0u32; 2];
/// set_mask_bit(&mut m, 33)?;
/// assert_eq!(m, [0, 2]);
/// assert!(set_mask_bit(&mut m, 64).is_err());
/// # Ok(()) }
/// ```
#[inline]
pub fn set_mask_bit(mask: &mut [u32], i: usize) -> Result<()> {
    let words = mask.len();
    match mask.get_mut(i / 32) {
        Some(w) => {
            *w |= 1 << (i % 32);
            Ok(())
        }
        None => Err(Error::invalid(
            "set_mask_bit",
            format!(
                "bit {i} is past the mask of {words} words ({} bits); size masks with mask_words(n)",
                words as u128 * 32
            ),
        )),
    }
}

/// [`mask_bit`] for the CPU references, whose mask lengths are checked beforehand.
#[inline]
pub(crate) fn bit(mask: &[u32], i: usize) -> bool {
    mask[i / 32] >> (i % 32) & 1 == 1
}

/// [`set_mask_bit`] for the CPU references, whose mask lengths are checked beforehand.
#[inline]
pub(crate) fn set_bit(mask: &mut [u32], i: usize) {
    mask[i / 32] |= 1 << (i % 32);
}

/// The op name in the drop path's errors.
const PATH_OP: &str = "drop_path";

/// A generated drop path (stochastic depth): one keep/drop draw per row (or per group of
/// `rows_per_sample` consecutive rows), keyed by `(seed, call, row / rows_per_sample)` with its
/// own call id, so it is independent of the dropout mask.
///
/// ```
/// use fusedreg::dropping::DropPath;
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
    /// use fusedreg::dropping::DropPath;
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.1, 1000)?;
    /// assert_eq!((path.rate().p(), path.call(), path.rows_per_sample()), (0.1, 1000, 1));
    /// assert!(DropPath::new(-0.5, 1000).is_err());
    /// assert!(DropPath::new(f64::NAN, 1000).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(p_path: f64, call: u64) -> Result<Self> {
        Ok(DropPath {
            rate: DropRate::checked(PATH_OP, p_path)?,
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
    /// use fusedreg::dropping::DropPath;
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
                    PATH_OP,
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
    /// use fusedreg::dropping::DropPath;
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
    /// use fusedreg::dropping::DropPath;
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
    /// use fusedreg::dropping::DropPath;
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
    /// use fusedreg::dropping::DropPath;
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
/// use fusedreg::dropping::{slab_rows, slab_count};
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
/// use fusedreg::dropping::{slab_count, slab_rows};
/// use fusedreg::DtypeKind;
/// assert_eq!(slab_rows(1000, 1024, DtypeKind::F32), 16);
/// assert_eq!(slab_count(1000, 1024, DtypeKind::F32), 63); // ceil(1000 / 16)
/// assert_eq!(slab_count(0, 1024, DtypeKind::F32), 0);
/// ```
pub fn slab_count(rows: usize, cols: usize, dtype: DtypeKind) -> usize {
    rows.div_ceil(slab_rows(rows, cols, dtype))
}

/// Row lanes of the fused backward's dbias partials: each slab's rows are split by
/// `(row - slab_start) % DBIAS_LANES`, each lane sums its rows in order, and the slab's partial
/// is `((lane0 + lane1) + lane2) + lane3`. Must equal `DBIAS_LANES` in `kernels/common/dropping.cuh`.
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

/// Reusable device workspace for the column-gradient partials of a dropping op's GPU backward
/// (one f32 per slab and column for dbias; three for `dropout_add_norm`'s dgamma, dbeta and
/// dbias). Without one a backward allocates its partials stream-ordered per call
/// (`cuMemAllocAsync`); with one they grow once and are reused, so a training loop allocates
/// nothing. One workspace serves every dropping op (it grows to the largest).
///
/// ```
/// let ws = fusedreg::dropping::Workspace::new(); // allocates nothing: no GPU needed
/// assert_eq!(ws.capacity(), 0);
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
    /// use fusedreg::dropping::Workspace;
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
    /// use fusedreg::dropping::Workspace;
    /// // Empty until a GPU backward with dbias sizes it (one f32 per slab and column).
    /// assert_eq!(Workspace::default().capacity(), 0);
    /// ```
    pub fn capacity(&self) -> usize {
        self.partials.as_ref().map_or(0, |p| p.len())
    }

    /// The partials of one backward: `len` f32 in `ws` (grown when too small) or, without a
    /// workspace, in `own`, this call's buffer, which the caller drops after its launches (a
    /// stream-ordered free).
    ///
    /// # Safety
    ///
    /// The memory is uninitialised ([`Handle::scratch`]): the backward must write every partial
    /// before its finishing kernel reads it.
    pub(crate) unsafe fn partials<'a>(
        handle: &Handle,
        op: &'static str,
        ws: Option<&'a mut Workspace>,
        own: &'a mut Option<CudaSlice<f32>>,
        len: usize,
    ) -> Result<&'a mut CudaSlice<f32>> {
        let slot = match ws {
            Some(ws) => &mut ws.partials,
            None => own,
        };
        // SAFETY: the caller's contract (see above).
        unsafe { handle.scratch(op, slot, len) }
    }
}

/// Shape, drop rate and random keys of one dropout call (of any dropping op): everything but
/// the buffers. Validated on construction; the CPU references and the GPU kernels take the same
/// `Config`. Its keying methods (`rate`, `seed`, `call`, `with_resolution`, `resolution`,
/// `resolution_for`, `effective_p`, `scale`, `keying`, `keeps`) are those of its
/// [`KeySetting`], documented there. `cols` is the hidden size, the length of the bias.
///
/// ```
/// use fusedreg::dropping::{Config, DropPath, DropRate, MaskResolution};
/// use fusedreg::philox::mask_word;
/// use fusedreg::DtypeKind::{Bf16, F32};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1024, 4096, 0.1, 42, 7)?.with_drop_path(DropPath::new(0.2, 8)?);
/// assert_eq!(cfg.len(), 1 << 22);
/// assert_eq!(cfg.mask_words(), 1 << 17);
/// assert!(Config::new(0, 4096, 0.1, 42, 7)?.is_empty());
/// assert!(!Config::flat(1, 0.1, 42, 7)?.is_empty());
/// assert!(Config::new(usize::MAX, 2, 0.1, 0, 0).is_err()); // rows * cols overflows
/// assert!(Config::flat(10, 1.5, 0, 0).is_err()); // p outside [0, 1]
/// assert_eq!((cfg.rate(), cfg.seed(), cfg.call()), (DropRate::new(0.1)?, 42, 7));
/// assert_eq!(cfg.keeps(F32, 69), cfg.rate().keeps(mask_word(42, 7, 69)));
/// assert_eq!(cfg.effective_p(Bf16), 6554.0 / 65536.0); // 16-bit keys by default
/// let cfg = cfg.with_resolution(MaskResolution::Bits32);
/// assert_eq!(cfg.resolution(), Some(MaskResolution::Bits32));
/// assert_eq!(cfg.keying(Bf16).resolution(), MaskResolution::Bits32);
/// assert_eq!(cfg.scale(Bf16), cfg.rate().scale());
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    rows: usize,
    cols: usize,
    keys: KeySetting,
    drop_path: Option<DropPath>,
}

/// Checks that a `[rows, cols]` tensor's length fits `usize` and `u64` (the flat index):
/// [`Error::ShapeMismatch`] naming `op` otherwise.
pub(crate) fn check_shape(op: &'static str, rows: usize, cols: usize) -> Result<()> {
    rows.checked_mul(cols)
        .filter(|&n| u64::try_from(n).is_ok())
        .map(|_| ())
        .ok_or_else(|| Error::shape(op, format!("rows * cols = {rows} * {cols} overflows")))
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
    /// use fusedreg::dropping::Config;
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
        Self::keyed(OP, rows, cols, KeySetting::new(OP, p, seed, call)?)
    }

    /// A `[rows, cols]` tensor keyed by `keys` (another op's dropout part), errors naming `op`.
    pub(crate) fn keyed(
        op: &'static str,
        rows: usize,
        cols: usize,
        keys: KeySetting,
    ) -> Result<Self> {
        check_shape(op, rows, cols)?;
        Ok(Config {
            rows,
            cols,
            keys,
            drop_path: None,
        })
    }

    /// A flat tensor of `n` elements (`[1, n]`): for data without bias or row scale.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::Config;
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
    /// use fusedreg::dropout::{cpu, Config, DropPath};
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.5, 8)?;
    /// let cfg = Config::new(2, 4, 0.0, 42, 7)?.with_drop_path(path);
    /// assert_eq!(cfg.drop_path(), Some(path));
    /// let (x, mut y) = ([1.0f32; 8], [0.0f32; 8]);
    /// cpu::forward(&cfg, &x, &mut y, Default::default())?;
    /// assert_eq!(y[..4], [path.row_scale(42, 0); 4]); // row 0 is kept or dropped as a whole
    /// // A caller-supplied row scale is refused:
    /// let opts = cpu::ForwardOptions { rowscale: Some(&[1.0, 1.0]), ..Default::default() };
    /// assert!(cpu::forward(&cfg, &x, &mut y, opts).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_drop_path(self, path: DropPath) -> Self {
        Config {
            drop_path: Some(path),
            ..self
        }
    }

    /// The generated drop path, if any.
    pub fn drop_path(&self) -> Option<DropPath> {
        self.drop_path
    }

    /// Length in `u32` words of the 1-bit mask: `ceil(len / 32)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropping::Config;
    /// # fn main() -> fusedreg::Result<()> {
    /// assert_eq!(Config::flat(32, 0.1, 42, 7)?.mask_words(), 1);
    /// assert_eq!(Config::flat(33, 0.1, 42, 7)?.mask_words(), 2);
    /// assert_eq!(Config::new(0, 8, 0.1, 42, 7)?.mask_words(), 0);
    /// # Ok(()) }
    /// ```
    pub fn mask_words(&self) -> usize {
        mask_words(self.len())
    }

    config_methods!("The kernels of `dropout` implement every resolution.");

    /// The keying of an unfused baseline ([`KeySetting`]'s: 32 bits only, an error for an
    /// explicit other resolution).
    pub(crate) fn keying_bits32(&self, op: &'static str) -> Result<Keying> {
        self.keys.keying_bits32(op)
    }

    pub(crate) fn has_row_scale(&self, given: bool) -> bool {
        given || self.drop_path.is_some()
    }
}

/// The optional buffers of a GPU forward (`dropout::forward` / `forward_inplace`). All default
/// to `None`.
///
/// # Examples
///
/// A drop-path forward that also writes out the row scale it generated:
///
/// ```no_run
/// use fusedreg::dropout::{self as dr, Config, DropPath, ForwardOptions};
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
    /// The residual, `len == rows * cols`: `y = residual + dropout(x + bias)` (not with
    /// `forward_inplace`, where the residual is the output).
    pub residual: Option<CudaView<'a, T>>,
    /// Caller-supplied row scale, `len == rows` (not with a [`DropPath`] in the config).
    pub rowscale: Option<CudaView<'a, f32>>,
    /// Writes the 1-bit keep mask here, `len == cfg.mask_words()`.
    pub mask_out: Option<CudaViewMut<'a, u32>>,
    /// Writes the generated row scale here, `len == rows` (needs a [`DropPath`]).
    pub rowscale_out: Option<CudaViewMut<'a, f32>>,
    /// `dropout` with a residual only: the meter site this call adds each row's
    /// `cos(residual, y)` to (Block Influence, [`crate::redundancy`]; the module docs of
    /// [`crate::dropout`], *Redundancy statistics*). Not with `mask_out`. `None`: nothing is
    /// computed.
    pub redundancy: Option<crate::redundancy::Site<'a>>,
    #[doc(hidden)]
    pub tuning: LaunchTuning,
}

impl<T> Default for ForwardOptions<'_, T> {
    fn default() -> Self {
        ForwardOptions {
            bias: None,
            residual: None,
            rowscale: None,
            mask_out: None,
            rowscale_out: None,
            redundancy: None,
            tuning: LaunchTuning::default(),
        }
    }
}

/// The optional buffers of a GPU backward (`dropout::backward`, and the shared backward of any
/// op whose gradient is `m * dy`). All default to `None`.
///
/// # Examples
///
/// A backward reading the forward's 1-bit mask and the caller's row scale:
///
/// ```no_run
/// use fusedreg::dropout::{self as dr, BackwardOptions, Config};
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
    /// The caller's memory for the dbias partials instead (at least
    /// [`crate::workspace::dropout_backward_size`] bytes; not with `workspace`).
    pub workspace_view: Option<WorkspaceView<'a>>,
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
            workspace_view: None,
            tuning: LaunchTuning::default(),
        }
    }
}

/// Buffer lengths of a forward call, checked the same way on the CPU and the GPU.
pub(crate) struct ForwardLens {
    pub x: usize,
    /// None for an op without a residual.
    pub residual: Option<usize>,
    /// None in place (y is the residual).
    pub y: Option<usize>,
    pub bias: Option<usize>,
    pub rowscale: Option<usize>,
    pub mask_out: Option<usize>,
    pub rowscale_out: Option<usize>,
}

pub(crate) fn check_forward(op: &'static str, cfg: &Config, l: &ForwardLens) -> Result<()> {
    let n = cfg.len();
    check_len(op, "x", l.x, n)?;
    if let Some(r) = l.residual {
        check_len(op, "residual", r, n)?;
    }
    if let Some(y) = l.y {
        check_len(op, "y", y, n)?;
    }
    if let Some(b) = l.bias {
        check_len(op, "bias (one per column)", b, cfg.cols)?;
    }
    check_row_scale(op, cfg, l.rowscale)?;
    if let Some(m) = l.mask_out {
        check_len(op, "mask_out (u32 words)", m, cfg.mask_words())?;
    }
    if let Some(r) = l.rowscale_out {
        if cfg.drop_path.is_none() {
            return Err(Error::invalid(
                op,
                "rowscale_out is written only for a generated drop path (Config::with_drop_path)",
            ));
        }
        check_len(op, "rowscale_out (one per row)", r, cfg.rows)?;
    }
    Ok(())
}

pub(crate) fn check_backward(
    op: &'static str,
    cfg: &Config,
    dy: usize,
    dx: usize,
    rowscale: Option<usize>,
    mask: Option<usize>,
    dbias: Option<usize>,
) -> Result<()> {
    let n = cfg.len();
    check_len(op, "dy", dy, n)?;
    check_len(op, "dx", dx, n)?;
    check_row_scale(op, cfg, rowscale)?;
    if let Some(m) = mask {
        check_len(op, "mask (u32 words)", m, cfg.mask_words())?;
    }
    if let Some(b) = dbias {
        check_len(op, "dbias (one per column)", b, cfg.cols)?;
    }
    Ok(())
}

fn check_row_scale(op: &'static str, cfg: &Config, rowscale: Option<usize>) -> Result<()> {
    if let Some(r) = rowscale {
        if cfg.drop_path.is_some() {
            return Err(Error::invalid(
                op,
                "a caller-supplied rowscale and a generated drop path exclude each other",
            ));
        }
        check_len(op, "rowscale (one per row)", r, cfg.rows)?;
    }
    if let Some(path) = cfg.drop_path {
        if path.rows_per_sample() > 1 && cfg.rows > u32::MAX as usize {
            return Err(Error::invalid(
                op,
                format!(
                    "a per-sample drop path needs fewer than 2^32 rows, got {}",
                    cfg.rows
                ),
            ));
        }
    }
    Ok(())
}

/// The optional buffers of a CPU reference forward (`dropout::cpu::forward` /
/// `forward_inplace`). All default to `None`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 4, 0.0, 1, 2)?; // p = 0: only the row scale acts
/// let (x, r, mut y) = ([1.0f32; 8], [1.0f32; 8], [0.0f32; 8]);
/// let opts = cpu::ForwardOptions {
///     residual: Some(&r),
///     rowscale: Some(&[0.0, 2.0]),
///     ..Default::default()
/// };
/// cpu::forward(&cfg, &x, &mut y, opts)?;
/// assert_eq!(y, [1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0]); // row 0 dropped, row 1 doubled
/// // rowscale_out is written only for a drop path in the config:
/// let mut out = [0.0f32; 2];
/// let opts = cpu::ForwardOptions { rowscale_out: Some(&mut out), ..Default::default() };
/// assert!(cpu::forward(&cfg, &x, &mut y, opts).is_err());
/// # Ok(()) }
/// ```
pub struct CpuForwardOptions<'a, T> {
    /// Bias per column, `len == cols`.
    pub bias: Option<&'a [T]>,
    /// The residual, `len == rows * cols`: `y = residual + dropout(x + bias)` (not with
    /// `forward_inplace`, where the residual is the output).
    pub residual: Option<&'a [T]>,
    /// Caller-supplied row scale, `len == rows` (not with a drop path in the config).
    pub rowscale: Option<&'a [f32]>,
    /// Receives the 1-bit keep mask, `len == cfg.mask_words()` (padding bits zero).
    pub mask_out: Option<&'a mut [u32]>,
    /// Receives the generated row scale, `len == rows` (needs a drop path).
    pub rowscale_out: Option<&'a mut [f32]>,
    /// `dropout` with a residual only: the meter site this call adds each row's
    /// `cos(residual, y)` to ([`crate::redundancy`]; the module docs of [`crate::dropout`],
    /// *Redundancy statistics*). Not with `mask_out`. `None`: nothing is computed.
    pub redundancy: Option<crate::redundancy::cpu::Site<'a>>,
}

impl<T> Default for CpuForwardOptions<'_, T> {
    fn default() -> Self {
        CpuForwardOptions {
            bias: None,
            residual: None,
            rowscale: None,
            mask_out: None,
            rowscale_out: None,
            redundancy: None,
        }
    }
}

/// The optional buffers of a CPU reference backward (`dropout::cpu::backward`). All default to
/// `None`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 3, 0.0, 1, 2)?;
/// let dy = [1.0f32; 6];
/// let (mut dx, mut dbias) = ([0.0f32; 6], [0.0f32; 3]);
/// let opts = cpu::BackwardOptions {
///     rowscale: Some(&[0.5, 2.0]),
///     dbias: Some(&mut dbias),
///     ..Default::default()
/// };
/// cpu::backward(&cfg, &dy, &mut dx, opts)?;
/// assert_eq!((dx, dbias), ([0.5, 0.5, 0.5, 2.0, 2.0, 2.0], [2.5; 3]));
/// # Ok(()) }
/// ```
pub struct CpuBackwardOptions<'a, T> {
    /// The caller-supplied row scale the forward used, `len == rows`.
    pub rowscale: Option<&'a [f32]>,
    /// The forward's 1-bit mask, read instead of regenerating.
    pub mask: Option<&'a [u32]>,
    /// Receives the bias gradient, `len == cols`.
    pub dbias: Option<&'a mut [T]>,
}

impl<T> Default for CpuBackwardOptions<'_, T> {
    fn default() -> Self {
        CpuBackwardOptions {
            rowscale: None,
            mask: None,
            dbias: None,
        }
    }
}

/// The row scale of every row (None: no row scale), the caller's or generated by the drop path.
pub(crate) fn row_scales(
    seed: u64,
    rows: usize,
    given: Option<&[f32]>,
    path: Option<DropPath>,
) -> Option<Vec<f32>> {
    match (given, path) {
        (Some(rs), _) => Some(rs.to_vec()),
        (None, Some(path)) => Some((0..rows as u64).map(|r| path.row_scale(seed, r)).collect()),
        (None, None) => None,
    }
}

/// `rowm = scale * rs` of a row (one f32 multiply), or `scale` without a row scale: the kernels'
/// `stage_rows`.
#[inline]
pub(crate) fn row_multiplier(scale: f32, rs: &Option<Vec<f32>>, row: usize) -> f32 {
    match rs {
        Some(v) => scale * v[row],
        None => scale,
    }
}

/// The CPU dbias of a dropping op's backward, summed in the kernels' order: each row adds
/// into its lane `(row % slab) % DBIAS_LANES` of its slab ([`slab_rows`]); at a slab's end its
/// lanes are folded in lane order (`((lane0 + lane1) + lane2) + lane3`), then added into the
/// totals in slab order (the kernels' partials and their finishing kernel).
pub(crate) struct DbiasSums {
    slab: usize,
    lanes: Vec<Vec<f32>>,
    total: Vec<f32>,
}

impl DbiasSums {
    /// Sums of `width` columns (the op's `cols` with a dbias, 0 without one: then nothing is
    /// allocated and nothing summed) of a `[rows, cols]` problem of element type `dtype`.
    /// Errors: [`Error::HostAlloc`] naming `op` when the scratch cannot be allocated.
    pub(crate) fn new(
        op: &'static str,
        rows: usize,
        cols: usize,
        dtype: DtypeKind,
        width: usize,
    ) -> Result<Self> {
        let mut lanes = Vec::with_capacity(DBIAS_LANES);
        for _ in 0..DBIAS_LANES {
            lanes.push(try_vec(op, "the dbias partials", width, 0.0f32)?);
        }
        Ok(DbiasSums {
            slab: slab_rows(rows, cols, dtype).max(1),
            lanes,
            total: try_vec(op, "the dbias partials", width, 0.0f32)?,
        })
    }

    /// The partials `row` adds into (`width` long).
    pub(crate) fn lane(&mut self, row: usize) -> &mut [f32] {
        &mut self.lanes[(row % self.slab) % DBIAS_LANES]
    }

    /// After `row` (of `rows`): at the end of a slab, fold its lanes in order into the totals.
    pub(crate) fn end_row(&mut self, row: usize, rows: usize) {
        if (row + 1) % self.slab == 0 || row + 1 == rows {
            for (col, t) in self.total.iter_mut().enumerate() {
                let mut slab_sum = self.lanes[0][col];
                for lane in &self.lanes[1..] {
                    slab_sum += lane[col];
                }
                *t += slab_sum;
            }
            self.lanes.iter_mut().for_each(|l| l.fill(0.0));
        }
    }

    /// Writes the totals, rounded to `T`, into `dbias` (when there is one).
    pub(crate) fn finish<T: Dtype>(self, dbias: Option<&mut [T]>) {
        if let Some(db) = dbias {
            for (d, t) in db.iter_mut().zip(&self.total) {
                *d = T::from_f32_rn(*t);
            }
        }
    }
}

/// The CPU reference of the shared backward (`dropout_bwd` in the kernels), on a validated
/// `[rows, cols]` problem with at least one element: `dx = m != 0 ? T(dy * m) : 0` with
/// `m = keep ? rowm : 0`, the keep bits read from `mask` or regenerated from `keying`; dbias the
/// slab / lane sums of the unrounded dx ([`DbiasSums`]), in the kernels' order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_cpu<T: Dtype>(
    rows: usize,
    cols: usize,
    keying: &Keying,
    rs: Option<Vec<f32>>,
    mask: Option<&[u32]>,
    dy: &[T],
    dx: &mut [T],
    dbias: Option<&mut [T]>,
) -> Result<()> {
    let mut bits = keying.keep_bits();
    let scale = keying.scale();
    let mut sums = DbiasSums::new(OP, rows, cols, T::KIND, cols)?;
    for row in 0..rows {
        let rowm = row_multiplier(scale, &rs, row);
        for (col, part) in sums.lane(row).iter_mut().enumerate() {
            let i = row * cols + col;
            let keep = match mask {
                Some(m) => bit(m, i),
                None => bits.get(i as u64),
            };
            let m = if keep { rowm } else { 0.0 };
            let d = if m != 0.0 { dy[i].to_f32() * m } else { 0.0 };
            dx[i] = T::from_f32_rn(d);
            *part += d;
        }
        sums.end_row(row, rows);
    }
    sums.finish(dbias);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keep_bits_match_the_keying_at_the_edges() {
        for p in [0.0, 1.0, 0.1, 0.5] {
            let k = Keying::new("t", p, 5, 6).unwrap();
            let mut bits = k.keep_bits();
            // Out of order on purpose: the cached block must be re-evaluated.
            for i in [7u64, 3, 100, 4, 1 << 40, 5] {
                assert_eq!(bits.get(i), k.keeps(i), "p {p} i {i}");
            }
        }
    }

    /// Each resolution's element-to-random-bits map, written out from the Philox block (not
    /// through `KeepBits`), against `Keying::keeps` on indices that cross blocks and 2^32.
    #[test]
    fn every_resolution_keys_element_i_by_its_slice_of_block_i_over_n() {
        let (seed, call) = (0x1234_5678_9abc_def0, 77);
        let starts = [0u64, 13, (1 << 32) - 9];
        for res in [
            MaskResolution::Bits32,
            MaskResolution::Bits16,
            MaskResolution::Bits8,
        ] {
            for p in [0.1, 0.5, 0.9] {
                let k = Keying::new("t", p, seed, call)
                    .unwrap()
                    .with_resolution(res);
                let t = k.threshold();
                for i in starts.iter().flat_map(|&s| s..s + 40) {
                    let value = match res {
                        MaskResolution::Bits32 => {
                            philox::block(seed, call, i / 4)[(i % 4) as usize]
                        }
                        MaskResolution::Bits16 => {
                            let w = philox::block(seed, call, i / 8)[((i % 8) / 2) as usize];
                            (w >> (16 * (i % 2))) & 0xffff
                        }
                        MaskResolution::Bits8 => {
                            let w = philox::block(seed, call, i / 16)[((i % 16) / 4) as usize];
                            (w >> (8 * (i % 4))) & 0xff
                        }
                    };
                    assert_eq!(k.keeps(i), u64::from(value) >= t, "{res:?} p {p} i {i}");
                }
            }
        }
    }

    /// The 8-bit keying's threshold, effective rate and scale; the rate actually dropped over
    /// many elements matches the effective rate (a binomial 5-sigma band), so the scale makes
    /// the output unbiased.
    #[test]
    fn bits8_rate_and_scale() {
        let r = DropRate::new(0.1).unwrap();
        assert_eq!(r.threshold_at(MaskResolution::Bits8), 26);
        assert_eq!(r.effective_p_at(MaskResolution::Bits8), 26.0 / 256.0);
        assert_eq!(r.scale_at(MaskResolution::Bits8), (256.0f64 / 230.0) as f32);
        assert_eq!(
            DropRate::new(1.0).unwrap().scale_at(MaskResolution::Bits8),
            0.0
        );
        assert_eq!(
            DropRate::new(0.001)
                .unwrap()
                .threshold_at(MaskResolution::Bits8),
            0
        );
        let k = Keying::with_rate(r, 3, 4).with_resolution(MaskResolution::Bits8);
        let n = 1u64 << 20;
        let mut bits = k.keep_bits();
        let dropped = (0..n).filter(|&i| !bits.get(i)).count() as f64;
        let q = k.effective_p();
        let sigma = (n as f64 * q * (1.0 - q)).sqrt();
        assert!(
            (dropped - n as f64 * q).abs() < 5.0 * sigma,
            "dropped {dropped} of {n}"
        );
    }

    #[test]
    fn thresholds_at_the_edges() {
        assert!(DropRate::new(0.0).unwrap().keeps_all());
        assert!(DropRate::new(1.0).unwrap().drops_all());
        assert_eq!(DropRate::new(1.0).unwrap().scale(), 0.0);
        let one = DropRate::new(1.0).unwrap();
        assert!(!one.keeps(u32::MAX));
        let tiny = DropRate::new(1.0 / 256.0).unwrap();
        assert_eq!(tiny.threshold(), 1 << 24);
        assert!(!tiny.keeps((1 << 24) - 1) && tiny.keeps(1 << 24));
        for bad in [-0.0001, 1.0001, f64::NAN, f64::INFINITY] {
            assert!(DropRate::new(bad).is_err(), "p = {bad} accepted");
        }
        assert!(
            (DropRate::new(0.1).unwrap().effective_p() - 0.1).abs() < 1.0 / (1u64 << 33) as f64
        );
    }
}
