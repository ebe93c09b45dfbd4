//! Helpers shared by the candle adapter's CPU tests (tests/candle*.rs): random data,
//! conversions, dropout's multiplier, and comparisons that name the first bad element.
#![allow(dead_code)] // each test file uses a subset

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

pub type R = candle_core::Result<()>;

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Random f32 data (never all zeros): mostly in [-3, 3], every fifth element times 100, a few
/// exact zeros mixed in.
pub fn data(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    data_with_outliers(rng, n, 100.0)
}

/// [`data`] with every fifth element times `outlier` instead of 100.
pub fn data_with_outliers(rng: &mut rand::rngs::StdRng, n: usize, outlier: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if i % 97 == 13 {
                0.0
            } else {
                let u: f32 = rng.random_range(-3.0..3.0);
                u * if i % 5 == 0 { outlier } else { 1.0 }
            }
        })
        .collect()
}

pub fn tensor(v: &[f32], dims: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_slice(v, dims, &Device::Cpu)
}

pub fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Equal values, elementwise (bit for bit except that +0 and -0 count as equal: candle's
/// `w * 0` keeps w's sign where the fused ops write +0).
pub fn assert_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits() || x == y,
            "{what}: index {i}: adapter {x} vs reference {y}"
        );
    }
}

/// Equal bits, elementwise (-0 and +0 differ).
pub fn assert_same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "{what}: index {i}: adapter {x} vs reference {y}"
        );
    }
}

/// `|a - b| <= rel * |b| + abs` elementwise, naming the first bad index.
pub fn assert_near(what: &str, a: &[f32], b: &[f32], rel: f32, abs: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * y.abs() + abs,
            "{what}: index {i}: adapter {x} vs reference {y} (bound {rel} * |ref| + {abs})"
        );
    }
}

/// The three dtypes the adapter takes.
pub const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// One unit in the last place relative to the value, of `dtype`'s significand: the most two
/// roundings of nearly equal f32 values to `dtype` can differ by, relatively.
pub fn ulp(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 2f32.powi(-10),
        DType::BF16 => 2f32.powi(-7),
        _ => 2f32.powi(-23),
    }
}

/// Asserts `res` is an error whose message contains `needle`.
pub fn expect_err(res: candle_core::Result<Tensor>, needle: &str) {
    let e = res.expect_err(needle).to_string();
    assert!(
        e.contains(needle),
        "error {e:?} does not mention {needle:?}"
    );
}

/// How many elements of `a` and `b` have equal bits.
pub fn same_bits(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() == y.to_bits())
        .count()
}

/// `g` as it arrives in candle's gradient store: candle accumulates every gradient onto a zero
/// tensor (`zeros + g`), and that add is not the identity on every bit pattern: `+0 + -0 = +0`,
/// and candle's AVX bf16 add converts with `vcvtneps2bf16`, which flushes subnormals to zero.
/// Reference gradients go through the same add before a bit-for-bit comparison.
pub fn as_candle_grad(g: &Tensor) -> candle_core::Result<Tensor> {
    g.zeros_like()?.add(g)
}

/// The multiplier of every element as the op defines it (`keep ? scale * rowscale : 0`, f32),
/// from fusedreg's keying, as a `[rows, cols]` candle tensor.
pub fn multiplier(cfg: &fusedreg::dropout::Config) -> candle_core::Result<Tensor> {
    let scale = cfg.rate().scale();
    let row_multiplier = |row: usize| match cfg.drop_path() {
        Some(p) => scale * p.row_scale(cfg.seed(), row as u64),
        None => scale,
    };
    multiplier_of(cfg.rows(), cfg.cols(), row_multiplier, |i| cfg.keeps(i))
}

/// `keeps(i) ? row_multiplier(row) : 0` for every element `i` of a `[rows, cols]` tensor.
pub fn multiplier_of(
    rows: usize,
    cols: usize,
    row_multiplier: impl Fn(usize) -> f32,
    keeps: impl Fn(u64) -> bool,
) -> candle_core::Result<Tensor> {
    let mut m = Vec::with_capacity(rows * cols);
    for row in 0..rows {
        let rowm = row_multiplier(row);
        for col in 0..cols {
            m.push(if keeps((row * cols + col) as u64) {
                rowm
            } else {
                0.0
            });
        }
    }
    tensor(&m, &[rows, cols])
}
