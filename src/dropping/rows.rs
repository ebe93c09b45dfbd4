//! The row reductions' fixed order, shared by the ops that reduce rows in their kernels
//! (`dropout_add_norm`'s norm and statistics, `dropout`'s residual statistics): groups of
//! [`GROUP`] elements, [`row_partials`] partials per row, the partials combined by a fixed tree.
//! The CPU side of that order lives here so both ops (and their tests) sum exactly as the
//! kernels do; `fusedreg::dropout_add_norm` re-exports these under their public names.

/// Elements per group of the row reductions (and per thread visit in the kernels).
pub const GROUP: usize = 8;

/// Partials per row of the row reductions, `P`: the smallest power of two `>= ceil(cols / 8)`,
/// clamped to `32 ..= 256`. A function of `cols` only (see the module docs); the kernels run one
/// thread per partial.
///
/// ```
/// use fusedreg::dropout_add_norm::row_partials;
/// assert_eq!(row_partials(1), 32);
/// assert_eq!(row_partials(1024), 128);
/// assert_eq!(row_partials(1025), 256);
/// assert_eq!(row_partials(16384), 256);
/// ```
pub fn row_partials(cols: usize) -> usize {
    cols.div_ceil(GROUP).next_power_of_two().clamp(32, 256)
}

/// The row reduction of the module docs: `f(j)` for `j in 0..cols` summed in the order fixed by
/// [`row_partials`]`(cols)`. Public so tests and other references can reuse the exact order.
///
/// ```
/// use fusedreg::dropout_add_norm::cpu::row_sum;
/// assert_eq!(row_sum(1000, |j| j as f32), 499_500.0);
/// // Groups of 8 go to different partials: [1e8, 1 x 7] and [-1e8, 1 x 7]. In f32 `1e8 + 1`
/// // is 1e8, so each partial loses its ones and the tree adds 1e8 and -1e8; a left-to-right
/// // sum would give 7.
/// let v: Vec<f32> = (0..16).map(|j| if j == 0 { 1e8 } else if j == 8 { -1e8 } else { 1.0 }).collect();
/// assert_eq!(row_sum(16, |j| v[j]), 0.0);
/// assert_eq!(v.iter().sum::<f32>(), 7.0);
/// ```
pub fn row_sum(cols: usize, f: impl Fn(usize) -> f32) -> f32 {
    let p = row_partials(cols);
    let groups = cols.div_ceil(GROUP);
    let mut part = vec![0.0f32; p];
    for (q, acc) in part.iter_mut().enumerate() {
        let mut g = q;
        while g < groups {
            for j in g * GROUP..((g + 1) * GROUP).min(cols) {
                *acc += f(j);
            }
            g += p;
        }
    }
    combine_partials(&mut part)
}

/// The partials of a row reduction combined: each run of 32 by the tree `a[l] += a[l + o]` for
/// `o = 16, 8, 4, 2, 1`, then the runs' results left to right.
fn combine_partials(part: &mut [f32]) -> f32 {
    let mut total = 0.0f32;
    for (w, warp) in part.chunks_mut(32).enumerate() {
        let mut o = 16;
        while o > 0 {
            for l in 0..o {
                warp[l] += warp[l + o];
            }
            o /= 2;
        }
        total = if w == 0 { warp[0] } else { total + warp[0] };
    }
    total
}

/// The redundancy statistics of one row, `[r·s, |r|², |s|²]`, in the order of the module docs:
/// each group of 8 elements gives `g = fma(a, b, g)` from `+0.0` over its elements in order;
/// partial `q` is the sequential f32 sum from `+0.0` of its groups' `g` (groups `q, q + P, ...`
/// in increasing order, `P = `[`row_partials`]`(cols)`); the partials are combined as
/// [`row_sum`]'s. `r(j)` is the stream before the add (0 without a residual), `s(j)` the stored
/// stream after it, both as f32. `dropout`'s residual forward measures with all three;
/// `dropout_add_norm` sums the first two ([`stat_sums2`]) and takes `|s|²` from its norm
/// ([`norm_ss`](crate::dropout_add_norm::cpu::norm_ss)).
///
/// ```
/// use fusedreg::dropout_add_norm::cpu::stat_sums;
/// let (r, s) = ([1.0f32, 2.0, 0.0], [2.0f32, 0.0, 1.0]);
/// assert_eq!(stat_sums(3, |j| r[j], |j| s[j]), [2.0, 5.0, 5.0]);
/// ```
pub fn stat_sums(cols: usize, r: impl Fn(usize) -> f32, s: impl Fn(usize) -> f32) -> [f32; 3] {
    term_sums(cols, r, s)
}

/// [`stat_sums`]' first two, `[r·s, |r|²]`, in the same order: what `dropout_add_norm`'s forward
/// sums for its statistics.
///
/// ```
/// use fusedreg::dropout_add_norm::cpu::{stat_sums, stat_sums2};
/// let (r, s) = ([1.0f32, 2.0, 0.0], [2.0f32, 0.0, 1.0]);
/// assert_eq!(stat_sums2(3, |j| r[j], |j| s[j]), [2.0, 5.0]);
/// ```
pub fn stat_sums2(cols: usize, r: impl Fn(usize) -> f32, s: impl Fn(usize) -> f32) -> [f32; 2] {
    term_sums(cols, r, s)
}

/// The first `K` of `r·s`, `|r|²`, `|s|²` (K = 2 or 3), in [`stat_sums`]' order.
fn term_sums<const K: usize>(
    cols: usize,
    r: impl Fn(usize) -> f32,
    s: impl Fn(usize) -> f32,
) -> [f32; K] {
    let p = row_partials(cols);
    let groups = cols.div_ceil(GROUP);
    let mut part: [Vec<f32>; K] = std::array::from_fn(|_| vec![0.0f32; p]);
    for q in 0..p {
        let mut g = q;
        while g < groups {
            let mut gs = [0.0f32; K];
            for j in g * GROUP..((g + 1) * GROUP).min(cols) {
                let (rj, sj) = (r(j), s(j));
                gs[0] = rj.mul_add(sj, gs[0]);
                gs[1] = rj.mul_add(rj, gs[1]);
                if K == 3 {
                    gs[K - 1] = sj.mul_add(sj, gs[K - 1]);
                }
            }
            for (pk, gk) in part.iter_mut().zip(gs) {
                pk[q] += gk;
            }
            g += p;
        }
    }
    part.each_mut().map(|p| combine_partials(p))
}
