//! CPU reference of the global norm: a bit-exact mirror of the kernels' f32 partials and f64
//! reductions (see the [module docs](super) for the order), plus a plain f64 norm for the true
//! value.
//!
//! ```
//! use fusedreg::global_norm::cpu;
//! let g: Vec<f32> = (0..100_000).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
//! let v = cpu::global_norm(&[&g[..]], None, 1.0).unwrap();
//! let exact = cpu::norm_f64(&[&g[..]]);
//! assert!((v.norm as f64 - exact).abs() <= 1e-6 * exact);
//! assert_eq!(v.coef, 1.0);
//! ```

use super::NormValues;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::multi_tensor::Layout;

/// Threads per block of the partials kernel; the within-chunk tree depends on it.
///
/// ```
/// use fusedreg::global_norm::cpu::{chunk_partial, NORM_THREADS};
/// assert_eq!(NORM_THREADS, 512);
/// // One f32 vector of 4 elements per thread: 2048 ones fill every lane exactly once.
/// assert_eq!(chunk_partial(&vec![1.0f32; 4 * NORM_THREADS]), 2048.0);
/// ```
pub const NORM_THREADS: usize = 512;
/// Threads of the single-block f64 reduction; its order depends on it.
///
/// ```
/// use fusedreg::global_norm::cpu::{reduce, REDUCE_THREADS};
/// assert_eq!(REDUCE_THREADS, 1024);
/// // More partials than threads: thread i adds partials i, i + 1024, ...
/// assert_eq!(reduce(&vec![0.5f32; 3 * REDUCE_THREADS]), 1536.0);
/// ```
pub const REDUCE_THREADS: usize = 1024;

/// Folds `s[0..2*first]` pairwise: `s[i] += s[i + off]` for `off = first, first/2, ..., 1`.
fn fold_f32(s: &mut [f32], first: usize) {
    let mut off = first;
    while off > 0 {
        for i in 0..off {
            s[i] += s[i + off];
        }
        off /= 2;
    }
}

/// The f32 sum of squares of one chunk (at most 65,536 elements), in the kernel's exact order.
///
/// ```
/// use fusedreg::global_norm::cpu::chunk_partial;
/// assert_eq!(chunk_partial(&[3.0f32, 4.0]), 25.0);
/// assert_eq!(chunk_partial::<f32>(&[]), 0.0);
/// ```
pub fn chunk_partial<G: Dtype>(chunk: &[G]) -> f32 {
    let w = 16 / G::KIND.size();
    let n = chunk.len();
    let nvec = n / w;
    let mut thread_sums = [0f32; NORM_THREADS];
    for (t, sum) in thread_sums.iter_mut().enumerate() {
        let mut acc = [0f32; 8];
        let mut vi = t;
        while vi < nvec {
            for (j, a) in acc.iter_mut().enumerate().take(w) {
                let x = chunk[vi * w + j].to_f32();
                *a = x.mul_add(x, *a);
            }
            vi += NORM_THREADS;
        }
        if t == nvec % NORM_THREADS {
            for (j, a) in acc.iter_mut().enumerate().take(w) {
                if nvec * w + j < n {
                    let x = chunk[nvec * w + j].to_f32();
                    *a = x.mul_add(x, *a);
                }
            }
        }
        fold_f32(&mut acc, w / 2);
        *sum = acc[0];
    }
    let mut warp_sums = [0f32; 32];
    for (w, ws) in warp_sums.iter_mut().take(NORM_THREADS / 32).enumerate() {
        let mut s = [0f32; 32];
        s.copy_from_slice(&thread_sums[w * 32..w * 32 + 32]);
        fold_f32(&mut s, 16);
        *ws = s[0];
    }
    fold_f32(&mut warp_sums, NORM_THREADS / 64);
    warp_sums[0]
}

/// Per-chunk partials of a list of gradients, in the set's global chunk order.
///
/// ```
/// use fusedreg::global_norm::cpu::partials;
/// use fusedreg::multi_tensor::CHUNK;
/// // A tensor of CHUNK + 2 elements has two chunks; an empty one has none.
/// let a = vec![1.0f32; CHUNK as usize + 2];
/// let b = vec![3.0f32];
/// assert_eq!(partials::<f32>(&[&a[..], &[], &b[..]]).unwrap(), vec![65536.0, 2.0, 9.0]);
/// assert!(partials::<f32>(&[]).is_err()); // no tensors
/// ```
pub fn partials<G: Dtype>(grads: &[&[G]]) -> Result<Vec<f32>> {
    let lens: Vec<u64> = grads.iter().map(|g| g.len() as u64).collect();
    let layout = Layout::new(&lens)?;
    Ok(partials_with(&layout, |c| {
        let r = layout.chunk(c);
        let start = r.start as usize;
        chunk_partial(&grads[r.tensor][start..start + r.len])
    }))
}

/// Partials from a per-chunk function (lets tests evaluate chunks of tensors too large to hold).
///
/// ```
/// use fusedreg::global_norm::cpu::{partials_with, reduce};
/// use fusedreg::multi_tensor::Layout;
/// // 2^33 elements, all 0.5, without allocating them: a chunk's partial is len * 0.25.
/// let layout = Layout::new(&[1u64 << 33]).unwrap();
/// let p = partials_with(&layout, |c| layout.chunk(c).len as f32 * 0.25);
/// assert_eq!(p.len(), 1 << 17);
/// assert_eq!(reduce(&p), (1u64 << 31) as f64);
/// ```
pub fn partials_with(layout: &Layout, mut f: impl FnMut(usize) -> f32) -> Vec<f32> {
    (0..layout.num_chunks()).map(&mut f).collect()
}

/// The f64 sum of the partials in the reduce kernel's order.
///
/// ```
/// use fusedreg::global_norm::cpu::reduce;
/// assert_eq!(reduce(&[1.0, 2.0, 3.0]), 6.0);
/// assert_eq!(reduce(&[]), 0.0);
/// ```
pub fn reduce(partials: &[f32]) -> f64 {
    let mut sh = vec![0f64; REDUCE_THREADS];
    for (t, s) in sh.iter_mut().enumerate() {
        let mut acc = 0f64;
        let mut i = t;
        while i < partials.len() {
            acc += f64::from(partials[i]);
            i += REDUCE_THREADS;
        }
        *s = acc;
    }
    let mut off = REDUCE_THREADS / 2;
    while off > 0 {
        for i in 0..off {
            sh[i] += sh[i + off];
        }
        off /= 2;
    }
    sh[0]
}

/// Per-tensor sums of squares (f64) and norms (f32) from the partials, in the per-tensor
/// kernel's order. Zero-size tensors get 0.
///
/// # Panics
/// When `partials` is shorter than `layout.num_chunks()`.
///
/// # Examples
///
/// ```
/// use fusedreg::global_norm::cpu::{partials, per_tensor};
/// use fusedreg::multi_tensor::Layout;
/// let (a, b) = (vec![3.0f32, 4.0], vec![1.0f32; 9]);
/// let layout = Layout::new(&[2, 0, 9]).unwrap();
/// let p = partials::<f32>(&[&a[..], &[], &b[..]]).unwrap();
/// let (sums, norms) = per_tensor(&layout, &p);
/// assert_eq!(sums, vec![25.0, 0.0, 9.0]);
/// assert_eq!(norms, vec![5.0, 0.0, 3.0]);
/// ```
pub fn per_tensor(layout: &Layout, partials: &[f32]) -> (Vec<f64>, Vec<f32>) {
    let mut sums = Vec::with_capacity(layout.num_tensors());
    let mut norms = Vec::with_capacity(layout.num_tensors());
    for t in 0..layout.num_tensors() {
        let mut lanes = [0f64; 32];
        for (k, c) in layout.chunks(t).enumerate() {
            lanes[k % 32] += f64::from(partials[c]);
        }
        let mut off = 16;
        while off > 0 {
            for i in 0..off {
                lanes[i] += lanes[i + off];
            }
            off /= 2;
        }
        sums.push(lanes[0]);
        norms.push(lanes[0].sqrt() as f32);
    }
    (sums, norms)
}

/// Stage C: norm, clip coefficient, grad scale and flag from a (possibly all-reduced) sum of
/// squares, exactly as `finalize_into` in the kernel.
///
/// ```
/// use fusedreg::global_norm::cpu::finalize;
/// let v = finalize(4.0, Some(1.0), 1.0);
/// assert_eq!(v.norm, 2.0);
/// assert_eq!(v.coef, 1.0 / (2.0 + 1e-6));
/// let v = finalize(f64::NAN, Some(1.0), 1.0);
/// assert_eq!(v.nonfinite, 1);
/// ```
pub fn finalize(sumsq: f64, max_norm: Option<f32>, loss_scale: f32) -> NormValues {
    let norm = (sumsq.sqrt() / f64::from(loss_scale)) as f32;
    let coef = match max_norm {
        Some(m) => 1f32.min(m / (norm + 1e-6)),
        None => 1.0,
    };
    NormValues {
        sumsq,
        norm,
        coef,
        grad_scale: coef / loss_scale,
        nonfinite: u32::from(!norm.is_finite()),
    }
}

/// All stages: what [`super::GlobalNorm::compute`] writes, bit for bit.
///
/// ```
/// use fusedreg::global_norm::cpu::global_norm;
/// use half::bf16;
/// let g = vec![bf16::from_f32(0.5); 16]; // norm 2
/// let v = global_norm(&[&g[..]], Some(1.0), 1.0).unwrap();
/// assert_eq!((v.norm, v.coef), (2.0, 1.0 / (2.0 + 1e-6)));
/// let v = global_norm(&[&g[..]], None, 1.0).unwrap(); // no clipping
/// assert_eq!((v.norm, v.coef), (2.0, 1.0));
/// assert!(global_norm(&[&g[..]], Some(-1.0), 1.0).is_err());
/// ```
pub fn global_norm<G: Dtype>(
    grads: &[&[G]],
    max_norm: Option<f32>,
    loss_scale: f32,
) -> Result<NormValues> {
    super::check_max_norm(max_norm)?;
    super::check_loss_scale(loss_scale)?;
    Ok(finalize(reduce(&partials(grads)?), max_norm, loss_scale))
}

/// The true norm, `sqrt(sum x^2)` accumulated in f64 in index order.
///
/// ```
/// use fusedreg::global_norm::cpu::norm_f64;
/// let (a, b) = (vec![3.0f32], vec![4.0f32, 12.0]);
/// assert_eq!(norm_f64(&[&a[..], &b[..]]), 13.0);
/// ```
pub fn norm_f64<G: Dtype>(grads: &[&[G]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|x| {
            let x = f64::from(x.to_f32());
            x * x
        })
        .sum::<f64>()
        .sqrt()
}

/// The scale pass on one gradient: `g = round(g * scale)` in f32, nothing when `scale` is 1.
///
/// ```
/// use fusedreg::global_norm::cpu::{finalize, scale};
/// use half::f16;
/// let mut g = vec![f16::from_f32(3.0), f16::from_f32(-4.0)];
/// let v = finalize(25.0, Some(2.5), 1.0); // norm 5, clipped to 2.5
/// scale(&mut g, v.grad_scale);
/// assert_eq!(g, vec![f16::from_f32(1.5), f16::from_f32(-2.0)]);
/// ```
pub fn scale<G: Dtype>(grad: &mut [G], scale: f32) {
    if scale == 1.0 {
        return;
    }
    for g in grad {
        *g = G::from_f32_rn(g.to_f32() * scale);
    }
}
