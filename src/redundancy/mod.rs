//! Block-influence statistics measured inside the fused residual add: which sub-blocks of a
//! transformer are redundant.
//!
//! ShortGPT (Men et al. 2024) ranks layers by **Block Influence**, `BI = 1 - E[cos(r, s)]` over
//! tokens, where `r` is the residual stream entering a sub-block's add and `s = r + f(...)` the
//! stream after it: a sub-block whose output barely turns the stream (cos close to 1, BI close
//! to 0) changes little and is the first candidate for removal. Measuring it usually takes a
//! second pass over the model with hooks that read both streams again. fusedreg's residual ops
//! already hold `r` and `s` in registers while they reduce each row, so they can measure it on
//! the way: [`crate::dropout_add_norm`] (the pre-norm entry) accumulates, per call site,
//! `sum over rows of cos(r_row, s_row)` and the row count from three more row sums (`r·s`,
//! `|r|²`, `|s|²`: three fused multiply-adds per element, no extra bytes).
//!
//! # How to read BI
//!
//! `BI = 1 - mean cos` lies in `[0, 2]`. Near 0: the sub-block hardly changes the direction of
//! the stream (removing it costs little, if the stream's length does not matter downstream).
//! Larger: the sub-block turns the stream. BI is a ranking, not a loss: compare sub-blocks of
//! one model measured on the same text. Measure it in evaluation (no dropout, no drop path):
//! in training a dropped element or a dropped row (drop path) leaves `s = r` there, which pulls
//! cos towards 1.
//!
//! # The pinned statistic (CPU and GPU agree bit for bit)
//!
//! Each op computes `dot = r·s`, `rr = |r|²`, `ss = |s|²` of a row in f32 in a documented order
//! (the op's module docs), then [`row_cos`] decides the row's fate:
//!
//! * **Non-finite** when `dot`, `rr` or `ss` is NaN or infinite (an infinity or NaN in either
//!   stream, or squares that overflow f32: values near `1.8e19`): counted in
//!   [`SiteStats::nonfinite`], and the site's BI is then NaN: the statistic is undefined for such
//!   a stream, and hiding the rows would report a number that is not the model's.
//! * **Excluded** when `rr == 0` or `ss == 0`: the cosine of a zero vector is undefined. Such rows
//!   are not counted at all (neither sum nor count). We exclude rather than count them as cos 1
//!   or 0: the first sub-block of a model has no residual (`r = 0` on every row), and either
//!   convention would give it a BI that says nothing about it (0 would call it the most redundant
//!   of all); exclusion leaves it without a BI ([`SiteStats::bi`] is `None`). A row whose `s` is
//!   exactly zero (the sub-block cancelled the stream) is equally excluded.
//! * Otherwise `cos = dot / (sqrt(rr) * sqrt(ss))` (correctly rounded f32 square roots, product
//!   and quotient), clamped to `[-1, 1]` (rounding can push it just past 1), is **quantised**
//!   to the integer `q = round_ties_even(cos * 2^32)` ([`quantize`]) and added to
//!   [`SiteStats::cos_sum`], and [`SiteStats::rows`] grows by one.
//!
//! The accumulators are integers, so the sum over rows is exact and does not depend on the
//! order in which rows, blocks or calls finish: the kernels add per-block integer totals with
//! integer atomics (deterministic: integer addition is associative; no float atomics), and the
//! CPU reference ([`cpu::Redundancy`]) gets the same integers. Quantising at `2^-32` moves a
//! row's cosine by at most `2^-33`, far below the f32 cosine's own rounding. `cos_sum` cannot
//! wrap while `rows < 2^31` (each `|q| <= 2^32`); reading a site with more rows since its last
//! reset is an [`Error::InvalidArgument`] (reset more often).
//!
//! # Accuracy
//!
//! Against a plain f64 recomputation from the same stored streams, a row's f32 cosine is within
//! `(2 k + 6) * 2^-24` where `k` bounds the relative error of the op's row sums in units of
//! `2^-24` (see the op: [`crate::dropout_add_norm::cpu::norm_stats_chain`] for
//! `dropout_add_norm`, [`crate::dropout_add_norm::cpu::stats_chain`] for `dropout`'s residual
//! forward; at 4096 columns `k` is 22 for dropout, 29 for RMSNorm and 89 for LayerNorm, a cosine
//! within `1.1e-5`); the mean over rows, and so BI, is within
//! that plus `2^-33`. The tests check this on random data.
//!
//! # The meters
//!
//! [`Redundancy`] (GPU) owns `3 * sites` u64 accumulators on the device; pass
//! [`Redundancy::site`] in an op's arguments and the kernel adds that call's rows to that site
//! on the device, with no host synchronisation. [`Redundancy::stats`] and [`Redundancy::bi`]
//! read every site back with one small copy (`24 * sites` bytes). [`cpu::Redundancy`] is the
//! same meter for the CPU references.
//!
//! ```
//! use fusedreg::dropout_add_norm::{cpu, Config, Norm};
//! use fusedreg::redundancy;
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(2, 4, Norm::LayerNorm, 1e-5)?;
//! let meter = redundancy::cpu::Redundancy::new(1)?;
//! let r = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]; // the stream before the add
//! let x = [0.0f32, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]; // the sub-block's output
//! let gamma = [1.0f32; 4];
//! let (mut out, mut s, mut mean, mut rstd) = ([0f32; 8], [0f32; 8], [0f32; 2], [0f32; 2]);
//! let args = cpu::ForwardArgs {
//!     residual: Some(&r),
//!     redundancy: Some(meter.site(0)?),
//!     ..cpu::ForwardArgs::new(&x, &gamma)
//! };
//! cpu::forward(&cfg, args, cpu::ForwardOut { out: &mut out, s: &mut s, mean: &mut mean, rstd: &mut rstd })?;
//! // Row 0 turned by 45 degrees (cos = 0.7071), row 1 unchanged (cos = 1).
//! let bi = meter.bi()?[0].unwrap();
//! assert!((bi - (1.0 - (0.5f64.sqrt() + 1.0) / 2.0)).abs() < 1e-6);
//! assert_eq!(meter.stats()?[0].rows, 2);
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};

pub mod cpu;
mod gpu;

pub use gpu::{Redundancy, Site};

/// The name used in errors.
pub(crate) const OP: &str = "redundancy";

/// `2^32`: one row's cosine is stored as the integer `round(cos * 2^32)`.
pub const COS_SCALE: f64 = 4_294_967_296.0;

/// Rows a site may accumulate between resets (`2^31 - 1`): below this `cos_sum` cannot wrap.
pub const MAX_ROWS: u64 = (1 << 31) - 1;

/// u64 words per site on the device: `cos_sum` (two's complement), `rows`, `nonfinite`.
pub const WORDS_PER_SITE: usize = 3;

/// What one row adds to its site (see the [module docs](self)).
///
/// ```
/// use fusedreg::redundancy::{row_cos, RowCos};
/// assert_eq!(row_cos(2.0, 4.0, 1.0), RowCos::Cos(1.0));
/// assert_eq!(row_cos(0.0, 0.0, 1.0), RowCos::Excluded);
/// assert_eq!(row_cos(f32::NAN, 1.0, 1.0), RowCos::NonFinite);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowCos {
    /// `r` or `s` is the zero vector: not counted.
    Excluded,
    /// A NaN or infinity in the row's sums: counted in `nonfinite`.
    NonFinite,
    /// The clamped cosine, in `[-1, 1]`.
    Cos(f32),
}

/// The pinned per-row finish: the row's fate from its f32 sums `dot = r·s`, `rr = |r|²`,
/// `ss = |s|²`. The kernels do exactly these operations (`__fsqrt_rn`, `__fmul_rn`,
/// `__fdiv_rn`, then `fminf(fmaxf(c, -1), 1)`).
///
/// ```
/// use fusedreg::redundancy::{row_cos, RowCos};
/// // Orthogonal rows, opposite rows, and a cosine that rounding pushes past 1 (clamped).
/// assert_eq!(row_cos(0.0, 1.0, 1.0), RowCos::Cos(0.0));
/// assert_eq!(row_cos(-3.0, 1.0, 9.0), RowCos::Cos(-1.0));
/// assert_eq!(row_cos(1.0000001, 1.0, 1.0), RowCos::Cos(1.0));
/// assert_eq!(row_cos(1.0, f32::INFINITY, 1.0), RowCos::NonFinite);
/// assert_eq!(row_cos(0.0, 1.0, 0.0), RowCos::Excluded);
/// ```
pub fn row_cos(dot: f32, rr: f32, ss: f32) -> RowCos {
    if !(dot.is_finite() && rr.is_finite() && ss.is_finite()) {
        return RowCos::NonFinite;
    }
    if rr == 0.0 || ss == 0.0 {
        return RowCos::Excluded;
    }
    let c = dot / (rr.sqrt() * ss.sqrt());
    RowCos::Cos(c.clamp(-1.0, 1.0))
}

/// A cosine in `[-1, 1]` as the integer the accumulators hold: `round_ties_even(cos * 2^32)`
/// (the multiply is exact; `__float2ll_rn` on the device).
///
/// ```
/// use fusedreg::redundancy::quantize;
/// assert_eq!(quantize(1.0), 1 << 32);
/// assert_eq!(quantize(-0.5), -(1 << 31));
/// assert_eq!(quantize(1.5e-10), 1); // 0.644 rounds to 1
/// ```
pub fn quantize(cos: f32) -> i64 {
    (cos * COS_SCALE as f32).round_ties_even() as i64
}

/// One site's accumulators since its last reset.
///
/// ```
/// use fusedreg::redundancy::{RowCos, SiteStats};
/// let mut s = SiteStats::default();
/// assert_eq!(s.bi(), None); // no rows yet
/// s.add(RowCos::Cos(1.0));
/// s.add(RowCos::Cos(0.0));
/// s.add(RowCos::Excluded);
/// assert_eq!((s.rows, s.bi()), (2, Some(0.5)));
/// s.add(RowCos::NonFinite);
/// assert!(s.bi().unwrap().is_nan());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    /// Sum over counted rows of [`quantize`]`(cos)`.
    pub cos_sum: i64,
    /// Rows counted in `cos_sum`.
    pub rows: u64,
    /// Rows whose sums were NaN or infinite.
    pub nonfinite: u64,
}

impl SiteStats {
    /// Adds one row (wrapping integer adds, as the device's atomics).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::{RowCos, SiteStats};
    /// let mut s = SiteStats::default();
    /// s.add(RowCos::Cos(0.5));
    /// assert_eq!((s.cos_sum, s.rows, s.nonfinite), (1 << 31, 1, 0));
    /// ```
    pub fn add(&mut self, row: RowCos) {
        match row {
            RowCos::Excluded => {}
            RowCos::NonFinite => self.nonfinite = self.nonfinite.wrapping_add(1),
            RowCos::Cos(c) => {
                self.cos_sum = self.cos_sum.wrapping_add(quantize(c));
                self.rows = self.rows.wrapping_add(1);
            }
        }
    }

    /// The mean cosine over the counted rows: `None` without counted rows, NaN when a row was
    /// non-finite.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::SiteStats;
    /// let s = SiteStats { cos_sum: 3 << 31, rows: 2, nonfinite: 0 };
    /// assert_eq!(s.mean_cos(), Some(0.75));
    /// ```
    pub fn mean_cos(&self) -> Option<f64> {
        if self.nonfinite > 0 {
            return Some(f64::NAN);
        }
        (self.rows > 0).then(|| self.cos_sum as f64 / COS_SCALE / self.rows as f64)
    }

    /// Block Influence, `1 - mean cos` (in `[0, 2]`): `None` without counted rows, NaN when a
    /// row was non-finite.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::SiteStats;
    /// let s = SiteStats { cos_sum: 3 << 31, rows: 2, nonfinite: 0 };
    /// assert_eq!(s.bi(), Some(0.25));
    /// ```
    pub fn bi(&self) -> Option<f64> {
        self.mean_cos().map(|c| 1.0 - c)
    }

    /// From a site's [`WORDS_PER_SITE`] words as the device (and the C ABI's caller-owned
    /// accumulators) hold them: `cos_sum` (two's complement), `rows`, `nonfinite`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::SiteStats;
    /// let s = SiteStats { cos_sum: -5, rows: 7, nonfinite: 1 };
    /// assert_eq!(SiteStats::from_words(s.to_words()), s);
    /// ```
    pub fn from_words(w: [u64; WORDS_PER_SITE]) -> Self {
        SiteStats {
            cos_sum: w[0] as i64,
            rows: w[1],
            nonfinite: w[2],
        }
    }

    /// The site's words, the inverse of [`from_words`](Self::from_words).
    ///
    /// # Examples
    ///
    /// See [`from_words`](Self::from_words).
    pub fn to_words(&self) -> [u64; WORDS_PER_SITE] {
        [self.cos_sum as u64, self.rows, self.nonfinite]
    }

    /// Errors when the site has seen too many rows for `cos_sum` to be trusted.
    pub(crate) fn checked(self, site: usize) -> Result<Self> {
        if self.rows > MAX_ROWS {
            return Err(Error::invalid(
                OP,
                format!(
                    "site {site} accumulated {} rows since its last reset; more than {MAX_ROWS} \
                     may wrap its cosine sum: reset the meter more often",
                    self.rows
                ),
            ));
        }
        Ok(self)
    }
}

/// Checks a meter's site count at construction.
pub(crate) fn check_sites(sites: usize) -> Result<()> {
    if sites == 0 {
        return Err(Error::invalid(
            OP,
            "a meter needs at least one site (one per residual add you measure)",
        ));
    }
    if sites > u32::MAX as usize {
        return Err(Error::invalid(
            OP,
            format!("{sites} sites: at most 2^32 - 1"),
        ));
    }
    Ok(())
}

/// Checks a site index against the meter.
pub(crate) fn check_site(site: usize, sites: usize) -> Result<()> {
    if site < sites {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            format!("site {site} does not exist: the meter has {sites} sites (0..{sites})"),
        ))
    }
}

/// Checks the length of a caller's output slice for per-site values.
pub(crate) fn check_out_len(len: usize, sites: usize) -> Result<()> {
    crate::error::check_len(OP, "per-site output (one per site)", len, sites)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_is_exact_scaling_then_nearest_even() {
        for c in [1.0f32, -1.0, 0.5, 0.1, -0.3, 1e-12, 2.5 / COS_SCALE as f32] {
            let want = (f64::from(c) * COS_SCALE).round_ties_even() as i64;
            assert_eq!(quantize(c), want, "{c}");
        }
        assert_eq!(quantize(2.5 / COS_SCALE as f32), 2);
        assert_eq!(quantize(3.5 / COS_SCALE as f32), 4);
    }

    #[test]
    fn sums_near_the_limit_do_not_wrap() {
        let s = SiteStats {
            cos_sum: (MAX_ROWS as i64) << 32,
            rows: MAX_ROWS,
            nonfinite: 0,
        };
        assert_eq!(s.checked(0).unwrap().bi(), Some(0.0));
        let over = SiteStats {
            rows: MAX_ROWS + 1,
            ..s
        };
        assert!(over.checked(3).unwrap_err().to_string().contains("site 3"));
    }

    #[test]
    fn words_round_trip_negative_sums() {
        let s = SiteStats {
            cos_sum: -5,
            rows: 7,
            nonfinite: 1,
        };
        let w = [s.cos_sum as u64, s.rows, s.nonfinite];
        assert_eq!(SiteStats::from_words(w), s);
        assert_eq!(s.to_words(), w);
    }
}
