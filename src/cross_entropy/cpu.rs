//! The CPU reference: the same operations in the same order as `kernels/cross_entropy.cu` (see
//! the [module docs](super) for the pinned arithmetic), so the kernels match it bit for bit.
//! Targets are checked here: a target outside `[0, V)` that is not the ignore index is an
//! [`Error`].
//!
//! ```
//! use fusedreg::cross_entropy::{cpu, Config, Reduction};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(1, 4)?.reduction(Reduction::Sum);
//! let logits = [0.0f32; 4]; // uniform: loss ln 4, gradient softmax - onehot
//! let mut grad = [f32::NAN; 4];
//! let loss = cpu::forward_backward(&cfg, &logits, &[1i32], None, &mut grad)?;
//! assert!((loss.reduced.unwrap() - 4f32.ln()).abs() < 1e-6);
//! assert_eq!(grad, [0.25, -0.75, 0.25, 0.25]);
//! # Ok(()) }
//! ```

use super::math::{exp, ln};
use super::{
    check_lens, target_class, Config, Consts, Reduction, TargetClass, TargetIndex, GROUP,
    REDUCE_CHUNK, SLOTS,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// What a call returns: the per-row losses, the reduced loss and the count of valid rows.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{cpu, Config, Reduction};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 2)?.reduction(Reduction::None);
/// let loss = cpu::forward(&cfg, &[0.0f32; 4], &[0i64, 1])?;
/// assert_eq!(loss.rows.len(), 2);
/// assert_eq!(loss.reduced, None); // no reduction asked for
/// assert_eq!(loss.n_valid, 2);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Loss {
    /// Loss of every row (0 for ignored rows): what the GPU writes for [`Reduction::None`].
    pub rows: Vec<f32>,
    /// The sum or the mean ([`Reduction::Sum`] / [`Reduction::Mean`]); `None` for
    /// [`Reduction::None`].
    pub reduced: Option<f32>,
    /// Rows whose target is not the ignore index.
    pub n_valid: u64,
}

impl Loss {
    /// The per-row losses `rows` with `cfg`'s reduction applied: the kernels' fixed-order sum,
    /// or its mean over the `n_valid` rows.
    pub(crate) fn reduce(cfg: &Config, rows: Vec<f32>, n_valid: u64) -> Loss {
        let reduced = match cfg.get_reduction() {
            Reduction::None => None,
            Reduction::Sum => Some(ordered_sum(&rows)),
            Reduction::Mean => Some(mean_of(ordered_sum(&rows), n_valid)),
        };
        Loss {
            rows,
            reduced,
            n_valid,
        }
    }
}

/// The factor on row `row`'s gradient: `1 / n_valid` for the mean, 1 for the sum, the row's
/// upstream gradient (1 without one) when nothing is reduced.
pub(crate) fn grad_scale(cfg: &Config, n_valid: u64, upstream: Option<&[f32]>, row: usize) -> f32 {
    match cfg.get_reduction() {
        Reduction::Mean => 1.0f32 / n_valid as f32,
        Reduction::Sum => 1.0,
        Reduction::None => upstream.map_or(1.0, |u| u[row]),
    }
}

/// The running state of one slot (or of a combined row): max, sum of `exp(x - m)`, sum of `x`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct State {
    pub m: f32,
    pub s: f32,
    pub sx: f32,
}

impl State {
    pub(crate) const INIT: State = State {
        m: f32::NEG_INFINITY,
        s: 0.0,
        sx: 0.0,
    };

    /// Folds one group of consecutive logits in (the kernel's `absorb_exact`).
    #[inline]
    pub(crate) fn absorb(&mut self, x: &[f32]) {
        // A NaN anywhere in the group makes its maximum NaN, and a NaN maximum (not only a
        // larger one) replaces the running one, so the NaN reaches `s` (`s·exp(m - NaN)`) even
        // while `m` is still -inf and the sum below is skipped. Without NaN these are the plain
        // `v > gm` and `gm > m` (issue #25: a NaN first in a group used to be dropped).
        let mut gm = x[0];
        for &v in &x[1..] {
            gm = if v > gm || v.is_nan() { v } else { gm };
        }
        if gm > self.m || gm.is_nan() {
            self.s *= exp(self.m - gm);
            self.m = gm;
        }
        if self.m != f32::NEG_INFINITY {
            for &v in x {
                self.s += exp(v - self.m);
            }
        }
        for &v in x {
            self.sx += v;
        }
    }

    /// Combines two states (the kernel's `combine_exact`).
    #[inline]
    pub(crate) fn combine(a: State, b: State) -> State {
        let m = if b.m > a.m { b.m } else { a.m };
        let sa = if a.m == m { a.s } else { a.s * exp(a.m - m) };
        let sb = if b.m == m { b.s } else { b.s * exp(b.m - m) };
        State {
            m,
            s: sa + sb,
            sx: a.sx + b.sx,
        }
    }
}

/// How one math mode evaluates a row: the kernel's `absorb`/`combine` of that mode, its per-row
/// epilogue and its per-element gradient. [`Exact`] is the CPU reference;
/// [`super::fast_model::Fast`] is the arithmetic of the `Math::Fast` kernel over a model of the
/// special-function unit.
pub(crate) trait Mode {
    /// What the gradient of an element needs from its row.
    type Row<'a>: RowGrad
    where
        Self: 'a;
    /// The state of a slot that has seen nothing (an identity of `combine`).
    fn init(&self) -> State;
    fn absorb(&self, st: &mut State, x: &[f32]);
    fn combine(&self, a: State, b: State) -> State;
    /// The row's `lse` from its combined state, and the per-element gradient of the row.
    fn finish(&self, c: &Consts, st: State, scale: f32) -> (f32, Self::Row<'_>);
}

/// The gradient of one element of a row (before rounding to the dtype).
pub(crate) trait RowGrad {
    fn elem(&self, x: f32, is_target: bool) -> f32;
}

/// The CPU reference: [`crate::fmath`]'s `exp` and `ln`, bit for bit with `Math::Exact`.
pub(crate) struct Exact;

/// [`Exact`]'s row: `lse`, `zf = 1 + 2λ·lse`, the scale.
pub(crate) struct ExactRow {
    c: Consts,
    lse: f32,
    zf: f32,
    scale: f32,
}

impl Mode for Exact {
    type Row<'a> = ExactRow;
    fn init(&self) -> State {
        State::INIT
    }
    fn absorb(&self, st: &mut State, x: &[f32]) {
        st.absorb(x);
    }
    fn combine(&self, a: State, b: State) -> State {
        State::combine(a, b)
    }
    /// `lse = m + ln(s)`.
    fn finish(&self, c: &Consts, st: State, scale: f32) -> (f32, ExactRow) {
        let lse = st.m + ln(st.s);
        let row = ExactRow {
            c: *c,
            lse,
            zf: z_factor(c, lse),
            scale,
        };
        (lse, row)
    }
}

impl RowGrad for ExactRow {
    #[inline]
    fn elem(&self, x: f32, is_target: bool) -> f32 {
        grad_elem(&self.c, x, self.lse, self.zf, is_target, self.scale)
    }
}

/// The halving tree over `SLOTS` values: `h = SLOTS/2, …, 1`, value `i` takes value `i + h`.
/// Values from `used` on are the identity and are skipped (see [`row_state`]).
pub(crate) fn tree<V: Copy>(v: &mut [V; SLOTS], used: usize, f: impl Fn(V, V) -> V) -> V {
    let mut h = SLOTS / 2;
    while h >= 1 {
        for i in 0..h.min(used.saturating_sub(h)) {
            v[i] = f(v[i], v[i + h]);
        }
        h /= 2;
    }
    v[0]
}

/// The combined state of one row of logits (widened to f32), in the pinned order.
///
/// The kernel also combines the slots that got no group (rows shorter than `SLOTS` groups) with
/// the others; those are `(-inf, 0, 0)`, and combining with them changes nothing the outputs
/// see (`m` and `s` are kept exactly; `sx` can only turn `-0` into `+0`, and it is used only as
/// `lse - sx / V` or `0 - sx / V`, equal for both zeros), so the reference skips them: short
/// rows cost O(V), not O(SLOTS).
pub(crate) fn row_state(x: &[f32]) -> State {
    row_state_in(&Exact, x)
}

/// [`row_state`] in a math mode.
pub(crate) fn row_state_in<M: Mode>(mode: &M, x: &[f32]) -> State {
    let mut slots = [mode.init(); SLOTS];
    for (g, chunk) in x.chunks(GROUP).enumerate() {
        mode.absorb(&mut slots[g % SLOTS], chunk);
    }
    tree(&mut slots, x.len().div_ceil(GROUP), |a, b| {
        mode.combine(a, b)
    })
}

/// The loss of a valid row from its `lse`, the sum of its logits `sx` and its target's logit
/// (the kernel's per-row epilogue, both modes).
pub(crate) fn row_loss(c: &Consts, lse: f32, sx: f32, x_t: f32) -> f32 {
    let mut loss = 0.0f32;
    if c.conf != 0.0 {
        loss = c.conf * (lse - x_t);
    }
    if c.alpha != 0.0 {
        loss += c.alpha * (lse - sx / c.vocab_f);
    }
    if c.lambda != 0.0 {
        loss += c.lambda * (lse * lse);
    }
    loss
}

/// `1 + 2λ·lse`, or 1 without z-loss.
pub(crate) fn z_factor(c: &Consts, lse: f32) -> f32 {
    if c.lambda != 0.0 {
        1.0 + c.lam2 * lse
    } else {
        1.0
    }
}

/// The gradient of one element (before rounding to the dtype).
#[inline]
pub(crate) fn grad_elem(c: &Consts, x: f32, lse: f32, zf: f32, is_target: bool, scale: f32) -> f32 {
    let mut d = exp(x - lse) * zf - c.eps;
    if is_target {
        d -= c.conf;
    }
    d * scale
}

/// The reduced-loss sum of the kernels: chunks of [`REDUCE_CHUNK`] values, each summed as
/// [`SLOTS`] strided sequential partial sums combined by the halving tree; repeated over the
/// chunk sums until one value is left. 0 for no values.
pub(crate) fn ordered_sum(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let mut cur = values.to_vec();
    loop {
        let next: Vec<f32> = cur
            .chunks(REDUCE_CHUNK)
            .map(|chunk| {
                let mut part = [0.0f32; SLOTS];
                for (i, &v) in chunk.iter().enumerate() {
                    part[i % SLOTS] += v;
                }
                tree(&mut part, SLOTS, |a, b| a + b)
            })
            .collect();
        if next.len() == 1 {
            return next[0];
        }
        cur = next;
    }
}

/// The mean of the kernels: `sum / n_valid` in f32, 0 when no row is valid.
pub(crate) fn mean_of(sum: f32, n_valid: u64) -> f32 {
    if n_valid == 0 {
        0.0
    } else {
        sum / n_valid as f32
    }
}

/// Where the gradient goes.
pub(crate) enum Sink<'a, T> {
    None,
    Separate(&'a mut [T]),
    InPlace,
}

/// Every row's [`TargetClass`] and the count of valid rows (the mean's divisor), or the error of
/// the first target outside `[0, vocab)` that is not the ignore index.
pub(crate) fn target_classes<I: TargetIndex>(
    cfg: &Config,
    targets: &[I],
) -> Result<(Vec<TargetClass>, u64)> {
    let v = cfg.vocab();
    let mut classes = Vec::with_capacity(targets.len());
    for (row, &t) in targets.iter().enumerate() {
        let class = target_class(t.to_i64(), v, cfg.get_ignore_index());
        if class == TargetClass::OutOfRange {
            return Err(Error::invalid(
                super::OP,
                format!(
                    "target {} of row {row} is outside [0, {v}) and not the ignore index {}",
                    t.to_i64(),
                    cfg.get_ignore_index()
                ),
            ));
        }
        classes.push(class);
    }
    let n_valid = classes
        .iter()
        .filter(|c| matches!(c, TargetClass::Valid(_)))
        .count() as u64;
    Ok((classes, n_valid))
}

/// [`check_lens`] for a host call: its loss buffer is its own (the reduction's length), so only
/// the caller's slices are checked.
pub(crate) fn check_host_lens(
    cfg: &Config,
    logits: usize,
    targets: usize,
    grad: Option<usize>,
    upstream: Option<&[f32]>,
) -> Result<()> {
    check_lens(
        cfg,
        logits,
        targets,
        grad,
        cfg.get_reduction().loss_len(cfg.rows()),
        upstream.map(<[f32]>::len),
    )
}

/// A checked host call in `mode` with the gradient into a separate `grad`.
pub(crate) fn run_separate<T: Dtype, I: TargetIndex, M: Mode>(
    mode: &M,
    cfg: &Config,
    logits: &[T],
    targets: &[I],
    upstream: Option<&[f32]>,
    grad: &mut [T],
) -> Result<Loss> {
    check_host_lens(cfg, logits.len(), targets.len(), Some(grad.len()), upstream)?;
    let logits = &mut Shared(logits, cfg.vocab());
    run(mode, cfg, logits, targets, upstream, Sink::Separate(grad))
}

/// A checked host call in `mode` with the gradient written over the logits.
pub(crate) fn run_inplace<T: Dtype, I: TargetIndex, M: Mode>(
    mode: &M,
    cfg: &Config,
    logits: &mut [T],
    targets: &[I],
    upstream: Option<&[f32]>,
) -> Result<Loss> {
    check_host_lens(cfg, logits.len(), targets.len(), None, upstream)?;
    let v = cfg.vocab();
    run(
        mode,
        cfg,
        &mut Exclusive(logits, v),
        targets,
        upstream,
        Sink::InPlace,
    )
}

pub(crate) fn run<T: Dtype, I: TargetIndex, M: Mode>(
    mode: &M,
    cfg: &Config,
    logits: &mut dyn LogitsRows<T>,
    targets: &[I],
    upstream: Option<&[f32]>,
    mut sink: Sink<'_, T>,
) -> Result<Loss> {
    let v = cfg.vocab();
    let c = cfg.consts();
    // Targets first: a bad one is an error before anything is written, and the mean's scale
    // needs the count of valid rows.
    let (classes, n_valid) = target_classes(cfg, targets)?;
    let mut rows = vec![0.0f32; cfg.rows()];
    let mut xs = vec![0.0f32; v];
    for (row, class) in classes.iter().enumerate() {
        let Some(t) = (match *class {
            TargetClass::Valid(t) => Some(t),
            _ => None,
        }) else {
            match &mut sink {
                Sink::None => {}
                Sink::Separate(g) => g[row * v..(row + 1) * v].fill(T::from_f32_rn(0.0)),
                Sink::InPlace => logits.row_mut(row).fill(T::from_f32_rn(0.0)),
            }
            continue;
        };
        for (d, s) in xs.iter_mut().zip(logits.row(row)) {
            *d = s.to_f32();
        }
        let st = row_state_in(mode, &xs);
        let scale = grad_scale(cfg, n_valid, upstream, row);
        let (lse, g) = mode.finish(&c, st, scale);
        rows[row] = row_loss(&c, lse, st.sx, xs[t]);
        let out: &mut [T] = match &mut sink {
            Sink::None => continue,
            Sink::Separate(g) => &mut g[row * v..(row + 1) * v],
            Sink::InPlace => logits.row_mut(row),
        };
        for (j, (o, &x)) in out.iter_mut().zip(&xs).enumerate() {
            *o = T::from_f32_rn(g.elem(x, j == t));
        }
    }
    Ok(Loss::reduce(cfg, rows, n_valid))
}

/// Row access to the logits, shared or exclusive.
pub(crate) trait LogitsRows<T> {
    fn row(&self, r: usize) -> &[T];
    fn row_mut(&mut self, r: usize) -> &mut [T];
}

pub(crate) struct Shared<'a, T>(pub &'a [T], pub usize);
impl<T> LogitsRows<T> for Shared<'_, T> {
    fn row(&self, r: usize) -> &[T] {
        &self.0[r * self.1..(r + 1) * self.1]
    }
    fn row_mut(&mut self, _: usize) -> &mut [T] {
        unreachable!("shared logits are never written")
    }
}

pub(crate) struct Exclusive<'a, T>(pub &'a mut [T], pub usize);
impl<T> LogitsRows<T> for Exclusive<'_, T> {
    fn row(&self, r: usize) -> &[T] {
        &self.0[r * self.1..(r + 1) * self.1]
    }
    fn row_mut(&mut self, r: usize) -> &mut [T] {
        &mut self.0[r * self.1..(r + 1) * self.1]
    }
}

/// Loss only (no gradient).
///
/// Errors: [`Error::ShapeMismatch`] for lengths that disagree with
/// the config; [`Error::InvalidArgument`] for a target outside
/// `[0, V)` that is not the ignore index.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1, 2)?;
/// let loss = cpu::forward(&cfg, &[0.0f32, 0.0], &[0i32])?;
/// assert!((loss.reduced.unwrap() - 2f32.ln()).abs() < 1e-6);
/// assert!(cpu::forward(&cfg, &[0.0f32, 0.0], &[2i32]).is_err()); // target out of range
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype, I: TargetIndex>(
    cfg: &Config,
    logits: &[T],
    targets: &[I],
) -> Result<Loss> {
    check_host_lens(cfg, logits.len(), targets.len(), None, None)?;
    let logits = &mut Shared(logits, cfg.vocab());
    run(&Exact, cfg, logits, targets, None, Sink::None)
}

/// Loss and the gradient into a separate buffer `grad` (`rows * vocab`). `upstream` (per-row
/// f32, only with [`Reduction::None`]) scales each row's gradient; `None` means 1.
///
/// Errors: as [`forward`], plus an upstream gradient with a reduction other than `None`.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{cpu, Config, Reduction};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 2)?.reduction(Reduction::None);
/// let mut grad = [0.0f32; 4];
/// cpu::forward_backward(&cfg, &[0.0f32; 4], &[0i32, 1], Some(&[1.0, 2.0]), &mut grad)?;
/// assert_eq!(grad, [-0.5, 0.5, 1.0, -1.0]); // row 1 scaled by its own upstream gradient
/// # Ok(()) }
/// ```
pub fn forward_backward<T: Dtype, I: TargetIndex>(
    cfg: &Config,
    logits: &[T],
    targets: &[I],
    upstream: Option<&[f32]>,
    grad: &mut [T],
) -> Result<Loss> {
    run_separate(&Exact, cfg, logits, targets, upstream, grad)
}

/// Loss, with the gradient written over the logits.
///
/// Errors: as [`forward_backward`]; nothing is written when the input is refused.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1, 2)?.label_smoothing(0.2)?;
/// let mut logits = [0.0f32, 0.0];
/// cpu::forward_backward_inplace(&cfg, &mut logits, &[0i64], None)?;
/// // softmax 0.5 - (1 - 0.2) - 0.2 / 2 at the target, 0.5 - 0.1 elsewhere
/// assert_eq!(logits, [0.5 - 0.1 - 0.8, 0.5 - 0.1]);
/// # Ok(()) }
/// ```
pub fn forward_backward_inplace<T: Dtype, I: TargetIndex>(
    cfg: &Config,
    logits: &mut [T],
    targets: &[I],
    upstream: Option<&[f32]>,
) -> Result<Loss> {
    run_inplace(&Exact, cfg, logits, targets, upstream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_sum_is_chunked() {
        let v: Vec<f32> = (0..REDUCE_CHUNK * 2 + 3).map(|i| (i % 7) as f32).collect();
        let exact: f64 = v.iter().map(|&x| f64::from(x)).sum();
        assert_eq!(f64::from(ordered_sum(&v)), exact);
        assert_eq!(ordered_sum(&[]), 0.0);
        assert_eq!(ordered_sum(&[3.5]), 3.5);
    }

    #[test]
    fn state_handles_minus_infinity() {
        let mut s = State::INIT;
        s.absorb(&[f32::NEG_INFINITY; 3]);
        assert_eq!((s.m, s.s), (f32::NEG_INFINITY, 0.0));
        s.absorb(&[0.0, f32::NEG_INFINITY]);
        assert_eq!((s.m, s.s), (0.0, 1.0));
        let c = State::combine(State::INIT, s);
        assert_eq!((c.m, c.s), (0.0, 1.0));
    }
}
