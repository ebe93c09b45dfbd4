//! Accuracy of the shared f32 math (`fusedreg::fmath`) against f64, over millions of inputs
//! spread over the whole f32 range (every `STEP`-th bit pattern of both signs) plus the edge
//! cases: zeros, subnormals, the overflow and underflow thresholds, the branch points of each
//! function, infinities and NaN. The bounds asserted here are the ones stated in the module docs.
//!
//! `FUSEDREG_FMATH_STEP=7 cargo test --test fmath accuracy -- --nocapture` sweeps every 7th
//! pattern (the denser sweep the docs mention, about 3 minutes) and prints the worst input of each
//! function.

mod common;

use common::fmath_edge_inputs;
use fusedreg::fmath;

/// Default sweep stride over the 2^32 bit patterns (prime, so every binade and mantissa pattern
/// class is visited): about 4.2 million inputs per function.
const STEP: u64 = 1021;

/// `erf` in f64: `2/sqrt(pi) * exp(-x^2) * sum_n (2x^2)^n x / (1*3*...*(2n+1))`. Every term is
/// positive, so there is no cancellation: relative error about 1e-15 for |x| < 6.
fn erf64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a >= 6.0 {
        return 1f64.copysign(x);
    }
    let two_a2 = 2.0 * a * a;
    let (mut term, mut sum, mut n) = (a, a, 0.0f64);
    loop {
        n += 1.0;
        term *= two_a2 / (2.0 * n + 1.0);
        sum += term;
        if term <= sum * 1e-17 || term == 0.0 {
            break;
        }
    }
    let r = std::f64::consts::FRAC_2_SQRT_PI * (-a * a).exp() * sum;
    r.copysign(x)
}

fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Error of `y` in ulp of the exact result `r` (ulp of a subnormal is 2^-149). Infinite or NaN
/// results must match exactly (0 or infinity).
fn ulp_err(y: f32, r: f64) -> f64 {
    if r.is_nan() {
        return if y.is_nan() { 0.0 } else { f64::INFINITY };
    }
    let max = f64::from(f32::MAX);
    if r.abs() > max {
        // Overflow: anything at or above MAX + half an ulp rounds to inf.
        let limit = max + 2f64.powi(103);
        let want_inf = r.abs() >= limit;
        return if y.is_infinite() == want_inf && (y > 0.0) == (r > 0.0) {
            0.0
        } else if !y.is_infinite() {
            (r - f64::from(y)).abs() / 2f64.powi(104)
        } else {
            1.0
        };
    }
    if y.is_infinite() || y.is_nan() {
        return f64::INFINITY;
    }
    let e = if r == 0.0 {
        -149
    } else {
        (r.abs().log2().floor() as i32 - 23).max(-149)
    };
    (f64::from(y) - r).abs() / 2f64.powi(e)
}

/// A function and its name.
type Named = (&'static str, fn(f32) -> f32);

struct Worst {
    name: &'static str,
    max: f64,
    at: f32,
    count: u64,
}

impl Worst {
    fn new(name: &'static str) -> Self {
        Worst {
            name,
            max: 0.0,
            at: 0.0,
            count: 0,
        }
    }
    fn add(&mut self, x: f32, y: f32, r: f64) {
        let e = ulp_err(y, r);
        self.count += 1;
        // NaN errors (never expected) count as the worst.
        if e > self.max || e.is_nan() {
            self.max = e;
            self.at = x;
        }
    }
    fn report(&self) {
        println!(
            "{}: {} inputs, max error {:.3} ulp at x = {:e} ({:#010x})",
            self.name,
            self.count,
            self.max,
            self.at,
            self.at.to_bits()
        );
    }
    fn check(&self, bound: f64) {
        assert!(
            self.max <= bound,
            "{}: max error {} ulp at x = {:e} ({:#010x}) exceeds the stated {} ulp",
            self.name,
            self.max,
            self.at,
            self.at.to_bits(),
            bound
        );
    }
}

/// The inputs: a strided sweep of all bit patterns plus edge cases around each threshold.
fn inputs() -> Vec<f32> {
    let step = std::env::var("FUSEDREG_FMATH_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(STEP)
        .max(1);
    let mut v: Vec<f32> = (0..1u64 << 32)
        .step_by(step as usize)
        .map(|b| f32::from_bits(b as u32))
        .collect();
    // Each edge case and its 64 neighbours on either side, both signs.
    v.extend(fmath_edge_inputs(64));
    // Dense sweeps where the functions switch branches or round to their limits.
    for (lo, hi) in [
        (0.6f32, 0.65f32),
        (0.95, 1.05),
        (3.9, 4.0),
        (9.0, 9.5),
        (-104.0, -100.0),
    ] {
        let (a, b) = (lo.to_bits(), hi.to_bits());
        let (a, b) = (a.min(b), a.max(b));
        v.extend((a..=b).step_by(17).map(f32::from_bits));
    }
    v
}

#[test]
fn accuracy_against_f64() {
    let xs = inputs();
    let mut w = [
        Worst::new("exp"),
        Worst::new("ln"),
        Worst::new("erf"),
        Worst::new("tanh"),
        Worst::new("sigmoid"),
    ];
    for &x in &xs {
        let d = f64::from(x);
        w[0].add(x, fmath::exp(x), d.exp());
        w[1].add(
            x,
            fmath::ln(x),
            if x == 0.0 { f64::NEG_INFINITY } else { d.ln() },
        );
        w[2].add(x, fmath::erf(x), erf64(d));
        w[3].add(x, fmath::tanh(x), d.tanh());
        w[4].add(x, fmath::sigmoid(x), sigmoid64(d));
    }
    let bounds = [1.0, 1.0, 1.5, 1.5, 2.5];
    for w in &w {
        w.report();
    }
    for (w, b) in w.iter().zip(bounds) {
        w.check(b);
    }
}

#[test]
fn special_values_exactly() {
    let inf = f32::INFINITY;
    let bits = |x: f32| x.to_bits();
    // exp
    assert_eq!(fmath::exp(inf), inf);
    assert_eq!(bits(fmath::exp(-inf)), 0);
    assert_eq!(fmath::exp(0.0), 1.0);
    assert_eq!(fmath::exp(-0.0), 1.0);
    assert_eq!(fmath::exp(88.722_83), f32::from_bits(0x7f7f_ff84));
    assert_eq!(fmath::exp(88.722_84), inf);
    assert_eq!(fmath::exp(f32::MAX), inf);
    assert_eq!(bits(fmath::exp(-f32::MAX)), 0);
    assert_eq!(fmath::exp(f32::from_bits(1)), 1.0);
    assert_eq!(fmath::exp(-f32::from_bits(1)), 1.0);
    assert!(fmath::exp(-103.0) > 0.0 && fmath::exp(-103.0) < f32::MIN_POSITIVE);
    assert_eq!(bits(fmath::exp(-110.0)), 0);
    // ln
    assert_eq!(fmath::ln(inf), inf);
    assert_eq!(fmath::ln(0.0), -inf);
    assert_eq!(fmath::ln(-0.0), -inf);
    assert_eq!(bits(fmath::ln(-inf)), 0x7fc0_0000);
    assert_eq!(bits(fmath::ln(-1e-30)), 0x7fc0_0000);
    assert_eq!(bits(fmath::ln(1.0)), 0);
    assert_eq!(fmath::ln(std::f32::consts::E), 1.0);
    assert!(
        (f64::from(fmath::ln(f32::from_bits(1))) + 149.0 * std::f64::consts::LN_2).abs() < 1e-5
    );
    assert!((f64::from(fmath::ln(f32::MAX)) - f64::from(f32::MAX).ln()).abs() < 1e-5);
    // erf, tanh: odd, signed zeros, limits
    for f in [fmath::erf as fn(f32) -> f32, fmath::tanh] {
        assert_eq!(bits(f(0.0)), 0);
        assert_eq!(bits(f(-0.0)), 0x8000_0000);
        assert_eq!(f(inf), 1.0);
        assert_eq!(f(-inf), -1.0);
        assert_eq!(f(f32::MAX), 1.0);
        for b in (0..0x7f80_0000u32).step_by(999_983) {
            let x = f32::from_bits(b);
            assert_eq!(bits(f(-x)), bits(f(x)) ^ 0x8000_0000, "not odd at {x:e}");
        }
    }
    assert_eq!(fmath::tanh(f32::from_bits(1)), f32::from_bits(1));
    assert!(fmath::erf(f32::from_bits(1)) > 0.0);
    // sigmoid
    assert_eq!(fmath::sigmoid(0.0), 0.5);
    assert_eq!(fmath::sigmoid(inf), 1.0);
    assert_eq!(bits(fmath::sigmoid(-inf)), 0);
    assert_eq!(fmath::sigmoid(200.0), 1.0);
    // NaN in, the same NaN out (payload included).
    let nan = f32::from_bits(0x7fc1_2345);
    let fs: [fn(f32) -> f32; 5] = [
        fmath::exp,
        fmath::ln,
        fmath::erf,
        fmath::tanh,
        fmath::sigmoid,
    ];
    for f in fs {
        assert_eq!(bits(f(nan)), bits(nan));
        assert_eq!(bits(f(-nan)), bits(-nan));
    }
}

#[test]
fn monotone_on_a_dense_sample() {
    // exp, erf, tanh and sigmoid are non-decreasing; a polynomial seam that broke this would show.
    let fs: [Named; 4] = [
        ("exp", fmath::exp),
        ("erf", fmath::erf),
        ("tanh", fmath::tanh),
        ("sigmoid", fmath::sigmoid),
    ];
    for (name, f) in fs {
        // -12 up to -0 (magnitudes descending), then +0 up to 12, every 199th pattern.
        let neg = (0..=12f32.to_bits())
            .rev()
            .step_by(199)
            .map(|b| -f32::from_bits(b));
        let pos = (0..=12f32.to_bits()).step_by(199).map(f32::from_bits);
        let mut prev = f(-12.0);
        for x in neg.chain(pos) {
            let y = f(x);
            assert!(y >= prev, "{name} decreases at {x:e}: {y:e} < {prev:e}");
            prev = y;
        }
    }
}

/// The sweeps of `scripts/emu/cases/fmath.cpp`.
fn emu_sweep(which: u32) -> Vec<f32> {
    if which == 0 {
        (0..1u64 << 32)
            .step_by(9973)
            .map(|b| f32::from_bits(b as u32))
            .collect()
    } else {
        (0..0x0080_0000u32)
            .step_by(3)
            .flat_map(|b| [f32::from_bits(b), f32::from_bits(b | 0x8000_0000)])
            .collect()
    }
}

/// FNV-1a over the bytes, as `fnv` in `scripts/emu/harness.h`.
fn fnv(ys: &[f32]) -> u64 {
    let mut h: u64 = 1_469_598_103_934_665_603;
    for y in ys {
        for b in y.to_bits().to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(1_099_511_628_211);
        }
    }
    h
}

/// The device code under host emulation (`scripts/emu/golden/fmath.txt`, whose hashes the GPU run
/// confirms) against `src/fmath.rs`: the same bits on millions of inputs, without a GPU.
#[test]
fn cpu_matches_the_emulated_device_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/emu/golden/fmath.txt");
    let golden = std::fs::read_to_string(path).expect("scripts/emu/golden/fmath.txt");
    let fs: [Named; 5] = [
        ("exp", fmath::exp),
        ("ln", fmath::ln),
        ("erf", fmath::erf),
        ("tanh", fmath::tanh),
        ("sigmoid", fmath::sigmoid),
    ];
    let mut checked = 0;
    for line in golden.lines().filter(|l| !l.starts_with('#')) {
        // "<name> sweep <which> n <count> | y <hash>"
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w.len(), 8, "unexpected golden line {line:?}");
        let which: u32 = w[2].parse().unwrap();
        let n: usize = w[4].parse().unwrap();
        let want = u64::from_str_radix(w[7], 16).unwrap();
        let f = fs
            .iter()
            .find(|(name, _)| *name == w[0])
            .expect("known function")
            .1;
        let xs = emu_sweep(which);
        assert_eq!(xs.len(), n, "{line}");
        let ys: Vec<f32> = xs.iter().map(|&x| f(x)).collect();
        assert_eq!(
            fnv(&ys),
            want,
            "{} sweep {which}: CPU differs from the emulated device",
            w[0]
        );
        checked += 1;
    }
    assert_eq!(
        checked, 10,
        "golden file should hold 5 functions x 2 sweeps"
    );
}
