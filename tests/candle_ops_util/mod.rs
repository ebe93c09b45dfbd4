//! Helpers shared by the candle adapter's CPU tests (tests/candle*.rs): random data,
//! conversions, dropout's multiplier, and comparisons that name the first bad element.
#![allow(dead_code)] // each test file uses a subset

use candle_core::{DType, Device, Tensor, Var};
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

/// `|a - b| <= tol * scale` elementwise with `scale = 1 + max |b|` of the whole tensor (the
/// reductions of the two sides run in different orders, so errors scale with the operands).
pub fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = 1.0 + b.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}: index {i}: adapter {x} vs plain candle {y} (bound {})",
            tol * scale
        );
    }
}

/// Runs a test body generic over the element type, `$run::<T>(dtype)`, at each dtype the
/// adapter takes (f32, f16, bf16), up to the first error.
#[allow(unused_macros)] // each test file uses a subset
macro_rules! for_each_dtype {
    ($run:ident) => {{
        $run::<f32>(candle_core::DType::F32)?;
        $run::<half::f16>(candle_core::DType::F16)?;
        $run::<half::bf16>(candle_core::DType::BF16)
    }};
}
#[allow(unused_imports)] // each test file uses a subset
pub(crate) use for_each_dtype;

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
/// from fusedreg's keying of a `dtype` call (the resolution resolved for it, as the op does),
/// as a `[rows, cols]` candle tensor.
pub fn multiplier(cfg: &fusedreg::dropout::Config, dtype: DType) -> candle_core::Result<Tensor> {
    let keying = cfg.keying(kind(dtype));
    let scale = keying.scale();
    let row_multiplier = |row: usize| match cfg.drop_path() {
        Some(p) => scale * p.row_scale(cfg.seed(), row as u64),
        None => scale,
    };
    multiplier_of(cfg.rows(), cfg.cols(), row_multiplier, |i| keying.keeps(i))
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

/// Masks are a function of (seed, step, site) only. `forward(site, keys)` runs an op at p = 0.5
/// on fixed inputs of `n` elements: the same keys give the same bits (so a recomputed forward
/// matches); the next step, another site (3 instead of 2) or another seed give another mask
/// (fewer than 3/4 of the elements equal; identical masks would make all equal).
pub fn assert_masks_follow_the_keys(
    n: usize,
    forward: impl Fn(u32, &fusedreg::candle::StepKeys) -> candle_core::Result<Tensor>,
) -> R {
    use fusedreg::candle::StepKeys;
    let keys = StepKeys::new(123, 7);
    let y1 = flat(&forward(2, &keys)?)?;
    let y2 = flat(&forward(2, &keys)?)?;
    assert_eq!(same_bits(&y1, &y2), y1.len(), "same keys");
    for (name, v) in [
        ("next step", forward(2, &keys.next_step()?)?),
        ("other site", forward(3, &keys)?),
        ("other seed", forward(2, &StepKeys::new(124, 7))?),
    ] {
        let same = same_bits(&flat(&v)?, &y1);
        assert!(same < n * 3 / 4, "{name}: {same} of {n} equal");
    }
    Ok(())
}

/// An op on `(x, bias)` with keys (`None`: evaluation), under the checks every such op
/// (`Dropout`, `BiasActDropout`) passes.
pub struct XBiasOp<F>(F);

impl<F> XBiasOp<F>
where
    F: Fn(
        &Tensor,
        Option<&Tensor>,
        Option<&fusedreg::candle::StepKeys>,
    ) -> candle_core::Result<Tensor>,
{
    pub fn new(forward: F) -> Self {
        XBiasOp(forward)
    }

    /// Refuses bad input with an error naming the problem (f32 x of `[4, 8]`), with keys and in
    /// evaluation: x in F64 or in the integer dtype `int_dtype`; a bias in `bias_dtype` (another
    /// float dtype than x's), of `bias_len` (not 8) elements, or of shape `[1, 8]`; a scalar x.
    pub fn refuses_bad_input(&self, int_dtype: DType, bias_dtype: DType, bias_len: usize) -> R {
        let forward = &self.0;
        let dev = &Device::Cpu;
        let keys = fusedreg::candle::StepKeys::new(1, 0);
        let x = Tensor::zeros((4, 8), DType::F32, dev)?;
        for k in [Some(&keys), None] {
            expect_err(forward(&x.to_dtype(DType::F64)?, None, k), "F64");
            let named = format!("{int_dtype:?}"); // "U8", "U32"
            expect_err(forward(&x.to_dtype(int_dtype)?, None, k), &named);
            let b = Tensor::zeros(8, bias_dtype, dev)?;
            expect_err(forward(&x, Some(&b), k), "bias");
            let b = Tensor::zeros(bias_len, DType::F32, dev)?;
            expect_err(forward(&x, Some(&b), k), "bias");
            let b = Tensor::zeros((1, 8), DType::F32, dev)?;
            expect_err(forward(&x, Some(&b), k), "bias");
            let s = Tensor::new(1f32, dev)?;
            expect_err(forward(&s, None, k), "scalar");
        }
        Ok(())
    }

    /// Empty tensors in every dtype, with keys: no rows (`[0, 6]`), no columns (`[4, 0]`) and a
    /// batch dimension of 0 (`[2, 0, 5]`) give y of x's shape, dx of x's shape and a zero dbias.
    pub fn takes_empty_tensors(&self) -> R {
        let dev = &Device::Cpu;
        let keys = fusedreg::candle::StepKeys::new(1, 1);
        for dtype in DTYPES {
            for dims in [&[0usize, 6][..], &[4, 0], &[2, 0, 5]] {
                let x = Var::zeros(dims, dtype, dev)?;
                let cols = *dims.last().unwrap();
                let b = Var::from_tensor(&Tensor::ones(cols, dtype, dev)?)?;
                let y = (self.0)(&x, Some(&b), Some(&keys))?;
                assert_eq!(y.dims(), dims);
                let grads = y.sum_all()?.backward()?;
                assert_eq!(grads.get(&x).unwrap().dims(), dims);
                assert_eq!(flat(grads.get(&b).unwrap())?, vec![0.0; cols]);
            }
        }
        Ok(())
    }

    /// The op at p = 1, on [`p1_input`]: y is +0 everywhere and x gets no gradient.
    pub fn drops_everything(&self) -> R {
        let x = p1_input()?;
        let y = (self.0)(&x, None, Some(&fusedreg::candle::StepKeys::new(1, 1)))?;
        assert!(flat(&y)?.iter().all(|v| v.to_bits() == 0));
        let grads = y.sum_all()?.backward()?;
        assert!(flat(grads.get(&x).unwrap())?.iter().all(|&v| v == 0.0));
        Ok(())
    }

    /// Views, in every dtype: a transposed (non-contiguous) x of `[12, 10]` gives the bits of its
    /// contiguous copy, and the gradients flow back through the copy (dx in x's layout and dbias
    /// equal to the copy's); a contiguous x at a row offset and a bias at element offset 1 are
    /// read in place, with the bits of their copies.
    pub fn reads_views(&self) -> R {
        let forward = &self.0;
        let mut g = rng(8);
        let (rows, cols) = (12, 10);
        let keys = fusedreg::candle::StepKeys::new(9, 0);
        let k = Some(&keys);
        let random = |g: &mut rand::rngs::StdRng, dims: &[usize], dtype: DType| {
            tensor(&data(g, dims.iter().product()), dims)?.to_dtype(dtype)
        };
        for dtype in DTYPES {
            let xt = Var::from_tensor(&random(&mut g, &[cols, rows], dtype)?)?;
            let x = xt.t()?;
            assert!(!x.is_contiguous());
            let b = Var::from_tensor(&random(&mut g, &[cols], dtype)?)?;
            let y = forward(&x, Some(&b), k)?;
            let xc = Var::from_tensor(&x.contiguous()?)?;
            let y_copy = forward(&xc, Some(&b), k)?;
            assert_bits("strided y", &flat(&y)?, &flat(&y_copy)?);
            let (g1, g2) = (y.sum_all()?.backward()?, y_copy.sum_all()?.backward()?);
            let dx = flat(&g1.get(&xt).unwrap().t()?)?;
            assert_bits("strided dx", &dx, &flat(g2.get(&xc).unwrap())?);
            let (db1, db2) = (g1.get(&b).unwrap(), g2.get(&b).unwrap());
            assert_bits("strided dbias", &flat(db1)?, &flat(db2)?);

            let xo = random(&mut g, &[rows + 2, cols], dtype)?.narrow(0, 1, rows)?;
            assert!(xo.is_contiguous());
            let bo = random(&mut g, &[cols + 1], dtype)?.narrow(0, 1, cols)?;
            let y = forward(&xo, Some(&bo), k)?;
            let y_copy = forward(&xo.copy()?, Some(&bo.copy()?), k)?;
            assert_bits("offset views", &flat(&y)?, &flat(&y_copy)?);
        }
        Ok(())
    }
}

/// The f32 input of `[7, 9]` the p = 1 checks run on (rng 7).
pub fn p1_input() -> candle_core::Result<Var> {
    Var::from_tensor(&tensor(&data(&mut rng(7), 63), &[7, 9])?)
}

/// fusedreg's element type of a candle dtype (f32 for anything else: the adapter's f32 path).
pub fn kind(dtype: DType) -> fusedreg::DtypeKind {
    match dtype {
        DType::BF16 => fusedreg::DtypeKind::Bf16,
        DType::F16 => fusedreg::DtypeKind::F16,
        _ => fusedreg::DtypeKind::F32,
    }
}
