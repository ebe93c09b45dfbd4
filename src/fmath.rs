//! Bit-exact f32 transcendentals shared by the kernels and the CPU references.
//!
//! CUDA's `expf`, `logf`, `erff` and `tanhf` are not the functions of any CPU libm: their results
//! differ in the last bits, so an op that used them could only be compared with a tolerance. This
//! module and `kernels/common/fmath.cuh` implement [`exp`], [`ln`], [`erf`], [`tanh`] and
//! [`sigmoid`] as the *same sequence of IEEE-754 binary32 operations* on both sides: range
//! reduction with integer bit manipulation, polynomials evaluated by Horner's rule with explicit
//! fused multiply-adds (`f32::mul_add` here, `__fmaf_rn` there), every other add, multiply and
//! divide written out and rounded to nearest even (`__fadd_rn`, `__fmul_rn`, `__fdiv_rn` on the
//! device; the kernels are built with `--fmad=false` and no fast math, subnormals kept). Every step
//! is correctly rounded on both sides, so the results are equal bit for bit, including on
//! subnormal inputs and outputs. A GPU test (`tests/gpu/fmath.rs`) checks this over a sweep of the
//! whole f32 range.
//!
//! The module is public because integration tests and the GPU tests compare against it, and
//! because it is useful by itself: a caller who needs a CPU value equal to what a fusedreg kernel
//! computed can call it. No libm is used anywhere, so the results do not depend on the platform.
//!
//! # Accuracy (measured against f64, in ulp of the f32 result)
//!
//! Measured by `tests/fmath.rs` over every 1021st f32 bit pattern (4.4 million inputs: both signs,
//! all binades, subnormals) plus dense sweeps around every threshold and branch point (the bounds
//! below are asserted there), and once over every 7th (614 million inputs) and every 61st pattern (71
//! million); "seen" is the largest error of those runs:
//!
//! | function | max error | domain notes |
//! | --- | --- | --- |
//! | [`exp`] | 1 ulp (0.93 seen) | `+inf` from 88.72284 (`x >= 89` short-cut); gradual underflow to 0 below -103.97 |
//! | [`ln`] | 1 ulp (0.84 seen) | `ln(±0) = -inf`, `ln(x < 0) = NaN`, `ln(+inf) = +inf`, subnormal inputs scaled exactly |
//! | [`erf`] | 1.5 ulp (1.37 seen) | odd; `erf(±0) = ±0`; `±1` from `|x| >= 4` |
//! | [`tanh`] | 1.5 ulp (1.37 seen) | odd; `tanh(±0) = ±0`; `tanh(x) = x` below 2^-12; `±1` from `|x| >= 9.5` |
//! | [`sigmoid`] | 2.5 ulp (2.47 seen) | 0 at `-inf` (subnormal results kept), 1 at `+inf` |
//!
//! (ulp of a subnormal result is 2^-149.) NaN inputs are returned unchanged, payload and all; a
//! NaN produced from a non-NaN input (only `ln` of a negative number) is the canonical quiet
//! `0x7fc0_0000` on both sides.
//!
//! # Algorithms
//!
//! * `exp`: `k = round(x / ln 2)` (by adding 1.5 * 2^23 in one fma, so no rounding mode or
//!   library call is involved), `r = x - k ln2_hi - k ln2_lo` (Cody–Waite, two fmas; `ln2_hi` has
//!   16 significant bits so the first step is exact), `e^r` by the degree-7 Taylor polynomial on
//!   `|r| <= 0.35` (truncation error below 0.05 ulp), then `* 2^k` built from the exponent bits,
//!   in two steps where `2^k` alone is not a normal float (the first step is exact, so a subnormal
//!   result is rounded once).
//! * `ln`: the fdlibm / musl `logf` reduction `x = 2^k (1 + f)`, `sqrt(1/2) <= 1 + f < sqrt(2)`,
//!   `s = f / (2 + f)` and its degree-4 polynomial in `s^2`; subnormal inputs are scaled by 2^25
//!   first.
//! * `erf`: for `|x| < 1`, `x * (c0_hi + (c0_lo + x^2 P(x^2)))` (P of degree 7, `c0 = 2/sqrt(pi)`
//!   as two floats); for `1 <= |x| < 4`,
//!   `1 - exp(Q(|x| - 2) - x^2)` where `Q` (degree 9) fits `ln(erfc(a)) + a^2`; `|x| - 2` is exact
//!   on that interval (Sterbenz) and `Q - x^2` is one fma.
//! * `tanh`: for `|x| < 0.625`, `x + x * (x^2 * P(x^2))` (degree 7); above,
//!   `1 - 2 / (exp(2|x|) + 1)` with the sign copied.
//! * `sigmoid`: `1 / (1 + exp(-x))`; `exp(x)` below -20, where `1 + e^x` rounds to 1.
//!
//! The polynomial coefficients are Chebyshev fits in 50-digit arithmetic rounded to f32, made by
//! `scripts/fmath_fit.py` (mpmath); they are written below as bit patterns so that the Rust and the
//! CUDA tables are the same numbers by construction.
//!
//! ```
//! use fusedreg::fmath;
//! assert_eq!(fmath::exp(0.0), 1.0);
//! assert_eq!(fmath::ln(1.0), 0.0);
//! assert_eq!(fmath::erf(-0.0).to_bits(), (-0.0f32).to_bits());
//! assert!((fmath::tanh(0.5) - 0.5f64.tanh() as f32).abs() <= 1e-7);
//! assert_eq!(fmath::exp(100.0), f32::INFINITY);
//! ```

pub mod gpu;

/// `log2(e)` rounded to f32.
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
/// `1.5 * 2^23`: adding it rounds a float of magnitude below 2^22 to an integer (ties to even).
const SHIFT: f32 = f32::from_bits(0x4b40_0000);
/// `ln 2` with 16 significant bits, so `k * LN2_HI` is exact for `|k| < 256`.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
/// `ln 2 - LN2_HI` rounded to f32.
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// Taylor coefficients `1/n!` of `e^r`, n = 7 down to 2 (then two fmas with 1).
const EXP_P: [f32; 6] = [
    f32::from_bits(0x3950_0d01), // 1/5040
    f32::from_bits(0x3ab6_0b61), // 1/720
    f32::from_bits(0x3c08_8889), // 1/120
    f32::from_bits(0x3d2a_aaab), // 1/24
    f32::from_bits(0x3e2a_aaab), // 1/6
    0.5,
];
/// `2^127` and `2^-64`, the fixed halves of a scale that is not a normal float.
const TWO_P127: f32 = f32::from_bits(0x7f00_0000);
const TWO_M64: f32 = f32::from_bits(0x1f80_0000);

/// fdlibm/musl `logf`: `ln 2` split so that `k * LN2_HI_LOG` is exact for |k| <= 128 (17 significant bits).
const LN2_HI_LOG: f32 = f32::from_bits(0x3f31_7180);
const LN2_LO_LOG: f32 = f32::from_bits(0x3717_f7d1);
const LG1: f32 = f32::from_bits(0x3f2a_aaaa); // 0.66666662693
const LG2: f32 = f32::from_bits(0x3ecc_ce13); // 0.40000972152
const LG3: f32 = f32::from_bits(0x3e91_e9ee); // 0.28498786688
const LG4: f32 = f32::from_bits(0x3e78_9e26); // 0.24279078841

/// `(erf(x) / x - 2/sqrt(pi)) / x^2` as a polynomial in `x^2` on `|x| < 1`, highest degree
/// first; `2/sqrt(pi)` itself is added as the pair `ERF_C0_HI + ERF_C0_LO`.
const ERF_SMALL: [f32; 8] = [
    f32::from_bits(0x358e_20d6),
    f32::from_bits(0xb769_5c29),
    f32::from_bits(0x38fa_bf4e),
    f32::from_bits(0xba5f_f0ac),
    f32::from_bits(0x3bab_2c46),
    f32::from_bits(0xbcdc_165d),
    f32::from_bits(0x3de7_1790),
    f32::from_bits(0xbec0_93a3),
];
/// `2/sqrt(pi)` rounded to f32, and the rest.
const ERF_C0_HI: f32 = f32::from_bits(0x3f90_6ebb);
const ERF_C0_LO: f32 = f32::from_bits(0xb37b_d649);
/// `ln(erfc(a)) + a^2` as a polynomial in `u = a - 2` on `1 <= a < 4`, highest degree first.
const ERF_LARGE: [f32; 10] = [
    f32::from_bits(0xb3a2_d63c),
    f32::from_bits(0x3603_5199),
    f32::from_bits(0xb7a8_5cfd),
    f32::from_bits(0x390d_470f),
    f32::from_bits(0xba40_140c),
    f32::from_bits(0x3b6a_0bf4),
    f32::from_bits(0xbc86_e1d3),
    f32::from_bits(0x3d9c_2874),
    f32::from_bits(0xbed6_192c),
    f32::from_bits(0xbfae_b665),
];
/// `(tanh(x) - x) / x^3` as a polynomial in `x^2` on `|x| < 0.625`, highest degree first.
const TANH_SMALL: [f32; 8] = [
    f32::from_bits(0x39a9_ffd6),
    f32::from_bits(0xbaab_4529),
    f32::from_bits(0x3b68_5f4c),
    f32::from_bits(0xbc11_14a9),
    f32::from_bits(0x3cb3_25f7),
    f32::from_bits(0xbd5d_0dc7),
    f32::from_bits(0x3e08_8888),
    f32::from_bits(0xbeaa_aaab), // -1/3
];

const SIGN: u32 = 0x8000_0000;

/// Horner's rule with one fma per coefficient, highest degree first.
#[inline(always)]
fn horner(t: f32, c: &[f32]) -> f32 {
    let mut p = c[0];
    for &k in &c[1..] {
        p = p.mul_add(t, k);
    }
    p
}

/// `|x|` by clearing the sign bit.
#[inline(always)]
fn abs(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & !SIGN)
}

/// `r` (non-negative) with the sign bit of `x`.
#[inline(always)]
fn with_sign_of(r: f32, x: f32) -> f32 {
    f32::from_bits(r.to_bits() | (x.to_bits() & SIGN))
}

/// `e^x`, bit-exact with `fr_exp` in `kernels/common/fmath.cuh` (see the [module docs](self)).
///
/// # Examples
///
/// ```
/// use fusedreg::fmath::exp;
/// assert_eq!(exp(1.0), std::f32::consts::E);
/// assert_eq!(exp(f32::NEG_INFINITY), 0.0);
/// assert_eq!(exp(-103.0), f32::from_bits(0x0000_0001)); // gradual underflow: e^-103 = 1.33 x 2^-149
/// assert!(exp(f32::NAN).is_nan());
/// ```
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x >= 89.0 {
        return f32::INFINITY;
    }
    if x < -104.0 {
        return 0.0;
    }
    // |x / ln 2| < 151: j = 1.5 * 2^23 + k exactly, so k sits in the low mantissa bits.
    let j = x.mul_add(LOG2E, SHIFT);
    let k = j.to_bits() as i32 - SHIFT.to_bits() as i32;
    let kf = j - SHIFT;
    let r = kf.mul_add(-LN2_HI, x);
    let r = kf.mul_add(-LN2_LO, r);
    let p = horner(r, &EXP_P);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    scale2(p, k)
}

/// `p * 2^k` for `p` in about [0.7, 1.42] and `k` in [-150, 128], rounded once.
#[inline(always)]
fn scale2(p: f32, k: i32) -> f32 {
    if k > 127 {
        // k == 128 (x < 89): 2^128 is not a float; the second multiply may overflow to inf.
        (p * TWO_P127) * 2.0
    } else if k < -126 {
        // p * 2^(k + 64) is a normal float (exact), the second multiply rounds once.
        (p * f32::from_bits(((k + 64 + 127) as u32) << 23)) * TWO_M64
    } else {
        p * f32::from_bits(((k + 127) as u32) << 23)
    }
}

/// Natural logarithm, bit-exact with `fr_log` in `kernels/common/fmath.cuh`.
///
/// # Examples
///
/// ```
/// use fusedreg::fmath::ln;
/// assert_eq!(ln(1.0), 0.0);
/// assert_eq!(ln(0.0), f32::NEG_INFINITY);
/// assert_eq!(ln(-0.0), f32::NEG_INFINITY);
/// assert_eq!(ln(-1.0).to_bits(), 0x7fc0_0000);
/// assert!((ln(f32::from_bits(1)) - (-103.27893)).abs() < 1e-4); // smallest subnormal
/// ```
#[inline]
pub fn ln(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let mut ix = x.to_bits();
    let mut k: i32 = 0;
    if ix < 0x0080_0000 || ix >> 31 != 0 {
        if ix << 1 == 0 {
            return f32::NEG_INFINITY;
        }
        if ix >> 31 != 0 {
            return f32::from_bits(0x7fc0_0000);
        }
        // Subnormal: scale into the normal range (exact).
        k = -25;
        ix = (x * f32::from_bits(0x4c00_0000)).to_bits(); // 2^25
    } else if ix >= 0x7f80_0000 {
        return x; // +inf
    }
    // Reduce x into [sqrt(2)/2, sqrt(2)): the exponent moves into k.
    ix += 0x3f80_0000 - 0x3f35_04f3;
    k += (ix >> 23) as i32 - 0x7f;
    ix = (ix & 0x007f_ffff) + 0x3f35_04f3;
    let f = f32::from_bits(ix) - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * w.mul_add(LG4, LG2);
    let t2 = z * w.mul_add(LG3, LG1);
    let r = t2 + t1;
    let hfsq = (0.5 * f) * f;
    let dk = k as f32;
    let a = s.mul_add(hfsq + r, dk * LN2_LO_LOG);
    ((a - hfsq) + f) + dk * LN2_HI_LOG
}

/// The error function, bit-exact with `fr_erf` in `kernels/common/fmath.cuh`.
///
/// # Examples
///
/// ```
/// use fusedreg::fmath::erf;
/// assert_eq!(erf(0.0), 0.0);
/// assert_eq!(erf(5.0), 1.0);
/// assert_eq!(erf(-5.0), -1.0);
/// assert!((erf(0.5) - 0.520_499_9).abs() < 1e-7);
/// ```
#[inline]
pub fn erf(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = abs(x);
    if a >= 4.0 {
        return with_sign_of(1.0, x);
    }
    if a < 1.0 {
        if a == 0.0 {
            return x; // keeps the sign of zero (the sum below would give +0 for -0)
        }
        // x * (C0_HI + (C0_LO + z * P(z))): the constant term in two parts, so its rounding
        // does not cost half an ulp everywhere.
        let z = x * x;
        let t = horner(z, &ERF_SMALL).mul_add(z, ERF_C0_LO);
        return x.mul_add(ERF_C0_HI, x * t);
    }
    let q = horner(a - 2.0, &ERF_LARGE);
    let e = exp((-a).mul_add(a, q));
    with_sign_of(1.0 - e, x)
}

/// The hyperbolic tangent, bit-exact with `fr_tanh` in `kernels/common/fmath.cuh`.
///
/// # Examples
///
/// ```
/// use fusedreg::fmath::tanh;
/// assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
/// assert_eq!(tanh(1e-5), 1e-5);
/// assert_eq!(tanh(20.0), 1.0);
/// assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
/// assert!((tanh(1.0) - 0.761_594_2).abs() < 1e-7);
/// ```
#[inline]
pub fn tanh(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let a = abs(x);
    if a >= 9.5 {
        return with_sign_of(1.0, x);
    }
    if a < f32::from_bits(0x3980_0000) {
        // |x| < 2^-12: tanh(x) rounds to x (also keeps -0 and subnormals as they are).
        return x;
    }
    if a < 0.625 {
        let z = x * x;
        let q = z * horner(z, &TANH_SMALL);
        return x.mul_add(q, x);
    }
    let e = exp(a + a);
    let r = 1.0 - 2.0 / (e + 1.0);
    with_sign_of(r, x)
}

/// The logistic function `1 / (1 + e^-x)`, bit-exact with `fr_sigmoid` in
/// `kernels/common/fmath.cuh`.
///
/// # Examples
///
/// ```
/// use fusedreg::fmath::sigmoid;
/// assert_eq!(sigmoid(0.0), 0.5);
/// assert_eq!(sigmoid(f32::INFINITY), 1.0);
/// assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
/// assert!((sigmoid(2.0) - 0.880_797_1).abs() < 1e-7);
/// ```
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < -20.0 {
        // 1 + e^x rounds to 1 here, so sigmoid(x) is e^x; this keeps the subnormal results
        // that 1 / (1 + e^-x) would lose once e^-x overflows (x < -88.72).
        return exp(x);
    }
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_what_they_claim() {
        assert_eq!(LOG2E, std::f32::consts::LOG2_E);
        assert_eq!(LN2_HI.to_bits() & 0xff, 0);
        assert_eq!(LN2_HI_LOG.to_bits() & 0x7f, 0); // 17 significant bits: k * LN2_HI_LOG exact for |k| <= 128
        assert!((f64::from(LN2_HI) + f64::from(LN2_LO) - std::f64::consts::LN_2).abs() < 1e-13);
        assert!(
            // musl's split: the f32 low part carries ln 2 to about 2^-40.
            (f64::from(LN2_HI_LOG) + f64::from(LN2_LO_LOG) - std::f64::consts::LN_2).abs() < 1e-12
        );
        assert_eq!(TWO_P127, 2f32.powi(127));
        assert_eq!(TWO_M64, 2f32.powi(-64));
        assert_eq!(ERF_C0_HI, std::f32::consts::FRAC_2_SQRT_PI);
        let c0 = 2.0 / std::f64::consts::PI.sqrt();
        assert!((f64::from(ERF_C0_HI) + f64::from(ERF_C0_LO) - c0).abs() <= 6e-8 * 2f64.powi(-24));
        assert_eq!(TANH_SMALL[7], -1.0 / 3.0);
    }
}
