//! [`CrossEntropy`]: PyTorch's `F.cross_entropy(logits, targets, label_smoothing=α,
//! ignore_index=i)` (mean over the rows that are not ignored) on candle tensors, with autograd,
//! through [`crate::cross_entropy`].
//!
//! # Where the gradient comes from: recomputed in the backward
//!
//! The forward op computes the loss only (each row of logits read once). The backward op runs
//! fusedreg's fused loss-and-gradient pass once more, with the upstream gradient folded into its
//! per-row scale (`Reduction::None` with `upstream[row] = d_loss * (1 / n_valid)`), so the gradient
//! is written once, already scaled, and rounded once.
//!
//! The alternative, computing the gradient in the forward and keeping it in the op object until
//! the backward (as Liger-Kernel does in place), holds one logits-sized buffer between forward
//! and backward (the largest activation of a language model) and still needs a pass over it in
//! the backward to multiply by the upstream gradient, which is only known then: 3 + 2 passes
//! over `[rows, vocab]` against 1 + 3 here, and no memory held. The price is that the
//! forward's softmax statistics are recomputed (one extra read of the logits, not a write).
//!
//! With `d_loss = 1` (`loss.backward()`) the gradient has exactly the bits of
//! [`crate::cross_entropy::cpu::forward_backward`] with [`Reduction::Mean`].

use candle_core::{DType, Result, Tensor};

use super::shell::{self, cpu_out, CpuInputs, CpuOut, Elem, Op, Pass};
use crate::cross_entropy::{cpu, Config, Reduction};
use crate::error::Error;
use crate::Math;
#[cfg(feature = "candle-cuda")]
use {
    super::shell::{CudaInputs, CudaOut},
    crate::Handle,
};

const OP: &str = "candle::CrossEntropy";

/// Mean cross-entropy of `logits` `[..., vocab]` (f32, f16 or bf16) against class indices
/// `targets` `[...]` (u32 or i64), with optional label smoothing `α` and an ignore index (rows
/// whose target equals it count neither in the loss nor in the mean; -100 by default, as in
/// PyTorch):
///
/// ```text
/// loss_row = (1 - α)·(lse - x[t]) + α·(lse - mean(x))      lse = logsumexp of the row
/// loss     = sum of loss_row over valid rows / n_valid      (0 when no row is valid)
/// ```
///
/// The loss is an f32 scalar tensor; its gradient flows into `logits`. The forward computes the
/// loss only (one read of the logits); the backward runs the fused loss-and-gradient pass with
/// the upstream gradient folded into its per-row scale (`d_loss / n_valid`), so no logits-sized
/// buffer is held between forward and backward and the gradient is rounded once. With
/// `loss.backward()` (`d_loss = 1`) it has the bits of fusedreg's [`Reduction::Mean`] gradient. The arithmetic and the reduction order are those
/// of [`crate::cross_entropy`], so the CPU device gives the bits of
/// [`crate::cross_entropy::cpu`] and the CUDA device the kernels' (the same bits).
///
/// # Examples
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use fusedreg::candle::CrossEntropy;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::randn(0f32, 1.0, (2, 5, 11), &dev)?; // [batch, seq, vocab]
/// let targets = Tensor::new(&[[1u32, 2, 3, 4, 5], [6, 7, 8, 9, 10]], &dev)?;
/// let loss = CrossEntropy::new().with_label_smoothing(0.1)?.forward(&logits, &targets)?;
/// assert_eq!(loss.dims(), &[] as &[usize]);
/// let grads = loss.backward()?;
/// let g = grads.get(&logits).unwrap();
/// // Each row's gradient sums to 0 (softmax minus a distribution), scaled by 1 / 10 rows.
/// let row_sums = g.sum(2)?.flatten_all()?.to_vec1::<f32>()?;
/// assert!(row_sums.iter().all(|s| s.abs() < 1e-6));
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropy {
    alpha: f64,
    ignore_index: i64,
    /// Out-of-range targets are an error (on CUDA: one 4-byte read-back per forward).
    check_targets: bool,
    /// `None`: the op's default ([`Config::math`] of a new config).
    math: Option<Math>,
}

impl Default for CrossEntropy {
    /// No label smoothing, ignore index -100.
    ///
    /// ```
    /// use fusedreg::candle::CrossEntropy;
    /// assert_eq!(CrossEntropy::default(), CrossEntropy::new());
    /// ```
    fn default() -> Self {
        CrossEntropy {
            alpha: 0.0,
            ignore_index: -100,
            check_targets: true,
            math: None,
        }
    }
}

impl CrossEntropy {
    /// Plain cross-entropy: no label smoothing, ignore index -100 (PyTorch's defaults).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::CrossEntropy;
    /// let ce = CrossEntropy::new();
    /// assert_eq!((ce.label_smoothing(), ce.ignore_index()), (0.0, -100));
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Label smoothing `alpha` in `[0, 1]`: the target distribution is `(1 - α)·onehot + α/V`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::CrossEntropy;
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(CrossEntropy::new().with_label_smoothing(0.1)?.label_smoothing(), 0.1);
    /// assert!(CrossEntropy::new().with_label_smoothing(1.5).is_err());
    /// assert!(CrossEntropy::new().with_label_smoothing(f64::NAN).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_label_smoothing(self, alpha: f64) -> Result<Self> {
        // The op's own check.
        Config::new(0, 1).and_then(|c| c.label_smoothing(alpha))?;
        Ok(CrossEntropy { alpha, ..self })
    }

    /// Rows whose target is `ignore_index` are skipped (loss and gradient 0, not counted in the
    /// mean). Any value; with u32 targets only values in `0..2^32` can match.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::CrossEntropy;
    /// assert_eq!(CrossEntropy::new().with_ignore_index(0).ignore_index(), 0);
    /// ```
    pub fn with_ignore_index(self, ignore_index: i64) -> Self {
        CrossEntropy {
            ignore_index,
            ..self
        }
    }

    /// Skips the out-of-range target check on the CUDA device, so the forward never waits for
    /// the device: a target outside `[0, vocab)` that is not the ignore index then counts as an
    /// ignored row (loss and gradient 0, not in the mean) instead of failing the call. For
    /// training loops whose targets are known to be valid (e.g. byte or token ids from the
    /// model's own tokenizer). The CPU device always checks (it costs nothing there).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::CrossEntropy;
    /// assert!(CrossEntropy::new().checks_targets());
    /// assert!(!CrossEntropy::new().without_target_check().checks_targets());
    /// ```
    pub fn without_target_check(self) -> Self {
        CrossEntropy {
            check_targets: false,
            ..self
        }
    }

    /// The same loss with the CUDA kernel's `exp` and `log` in `math` mode: [`Math::Fast`] (the
    /// op's default: within the bound in the [op's docs](crate::cross_entropy)) or
    /// [`Math::Exact`] (bit for bit equal to the CPU reference). On candle's CPU device the CPU
    /// reference runs, which is the exact arithmetic in either mode.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::CrossEntropy;
    /// use fusedreg::Math;
    /// assert_eq!(CrossEntropy::new().math(), Math::Fast);
    /// assert_eq!(CrossEntropy::new().with_math(Math::Exact).math(), Math::Exact);
    /// ```
    pub fn with_math(self, math: Math) -> Self {
        CrossEntropy {
            math: Some(math),
            ..self
        }
    }

    /// The math mode of the CUDA kernel (default: the op's, [`Math::Fast`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::Math;
    /// assert_eq!(fusedreg::candle::CrossEntropy::new().math(), Math::Fast);
    /// ```
    pub fn math(&self) -> Math {
        // A 1 x 1 config is always valid; it holds the op's default.
        self.math
            .unwrap_or_else(|| Config::new(1, 1).map_or(Math::Fast, |c| c.math()))
    }

    /// Whether an out-of-range target is an error on the CUDA device (the default; see
    /// [`CrossEntropy::without_target_check`]).
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(fusedreg::candle::CrossEntropy::default().checks_targets());
    /// ```
    pub fn checks_targets(&self) -> bool {
        self.check_targets
    }

    /// The label smoothing.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(fusedreg::candle::CrossEntropy::new().label_smoothing(), 0.0);
    /// ```
    pub fn label_smoothing(&self) -> f64 {
        self.alpha
    }

    /// The ignore index.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(fusedreg::candle::CrossEntropy::new().ignore_index(), -100);
    /// ```
    pub fn ignore_index(&self) -> i64 {
        self.ignore_index
    }

    /// The [`Config`] of a call on `rows` rows of `vocab` logits (mean reduction): to call
    /// [`crate::cross_entropy::cpu`] directly with the same settings.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::CrossEntropy;
    /// use fusedreg::cross_entropy::Reduction;
    /// # fn main() -> candle_core::Result<()> {
    /// let cfg = CrossEntropy::new().with_ignore_index(7).config(4, 100)?;
    /// assert_eq!((cfg.rows(), cfg.vocab(), cfg.get_ignore_index()), (4, 100, 7));
    /// assert_eq!(cfg.get_reduction(), Reduction::Mean);
    /// assert_eq!(cfg.math(), CrossEntropy::new().math());
    /// assert!(CrossEntropy::new().config(4, 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn config(&self, rows: usize, vocab: usize) -> Result<Config> {
        Ok(Config::new(rows, vocab)
            .and_then(|c| c.label_smoothing(self.alpha))?
            .ignore_index(self.ignore_index)
            .reduction(Reduction::Mean)
            .with_math(self.math()))
    }

    /// The mean loss (an f32 scalar) of `logits` `[..., vocab]` against `targets` `[...]` (the
    /// logits' leading dimensions). Non-contiguous inputs are copied first; u32 targets are
    /// widened to i64 (one `rows`-sized copy).
    ///
    /// Errors: logits of a dtype other than f32/f16/bf16 or a scalar; targets of a dtype other
    /// than u32/i64 (floats included) or of the wrong shape; arguments on different devices; an
    /// empty vocabulary or one above 2^24; a target outside `[0, vocab)` that is not the ignore
    /// index (on the CUDA device this check reads a flag back from the device, one 4-byte copy
    /// that waits for the op; [`CrossEntropy::without_target_check`] turns it off).
    ///
    /// # Examples
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use fusedreg::candle::CrossEntropy;
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let logits = Tensor::zeros((3, 4), DType::F32, &dev)?;
    /// let targets = Tensor::new(&[0i64, -100, 3], &dev)?;
    /// let loss: f32 = CrossEntropy::new().forward(&logits, &targets)?.to_scalar()?;
    /// assert!((loss - 4f32.ln()).abs() < 1e-6); // uniform over 4 classes, 2 valid rows
    /// // Out-of-range targets, float targets, wrong shapes: errors.
    /// let bad = Tensor::new(&[0i64, 4, 1], &dev)?;
    /// let err = CrossEntropy::new().forward(&logits, &bad).unwrap_err();
    /// assert!(err.to_string().contains("outside [0, 4)"), "{err}");
    /// assert!(CrossEntropy::new().forward(&logits, &targets.to_dtype(DType::F32)?).is_err());
    /// assert!(CrossEntropy::new().forward(&logits, &Tensor::new(&[0i64, 1], &dev)?).is_err());
    /// # Ok(()) }
    /// ```
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        shell::check_tensor(OP, "logits", logits, logits)?;
        if !matches!(targets.dtype(), DType::U32 | DType::I64) {
            return Err(Error::invalid(
                OP,
                format!(
                    "targets have dtype {:?}: class indices must be u32 or i64",
                    targets.dtype()
                ),
            )
            .into());
        }
        shell::check_device(OP, "targets", targets, logits)?;
        let (rows, vocab) = shell::rows_cols(OP, "logits", logits)?;
        let lead = &logits.dims()[..logits.rank() - 1];
        if targets.dims() != lead {
            return Err(Error::shape(
                OP,
                format!(
                    "targets are {:?}, expected {lead:?} (the logits {:?} without the vocabulary)",
                    targets.dims(),
                    logits.dims()
                ),
            )
            .into());
        }
        let cfg = self.config(rows, vocab)?;
        let logits = logits.reshape((rows, vocab))?;
        let targets = targets.to_dtype(DType::I64)?.reshape(rows)?;
        let check = self.check_targets;
        Op(Fwd { cfg, check }).apply(&[&logits, &targets])
    }
}

/// The forward pass on (logits `[rows, vocab]`, targets i64 `[rows]`): the mean loss, f32 `[]`.
#[derive(Clone, Copy, Debug)]
struct Fwd {
    cfg: Config,
    /// CUDA: read the out-of-range flag back (a wait) and fail on it. (The CPU always checks.)
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    check: bool,
}

impl Pass for Fwd {
    const NAME: &'static str = "fusedreg-cross-entropy";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let logits = ins.slice::<T>(0, "logits")?;
        let targets = ins.slice::<i64>(1, "targets")?;
        let loss = cpu::forward(&self.cfg, logits, targets)?;
        let mean = loss
            .reduced
            .ok_or_else(|| Error::invalid(Self::NAME, "no reduced loss"))?;
        Ok(cpu_out(vec![mean], ()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        use crate::cross_entropy::Outputs;
        let (dev, cfg) = (ins.device(), &self.cfg);
        let logits = ins.view::<T>(0, "logits")?;
        let targets = ins.view::<i64>(1, "targets")?;
        // SAFETY: the forward writes the loss (0 with no valid rows).
        let mut loss = unsafe { ins.alloc::<f32>(1)? };
        let mut flag = if self.check {
            Some(dev.alloc_zeros::<u32>(1)?)
        } else {
            None
        };
        let out = Outputs {
            invalid_target: flag.as_mut().map(|f| f.as_view_mut()),
            ..Outputs::new(loss.slice_mut(..1))
        };
        crate::cross_entropy::forward(h, cfg, &logits, &targets, out)?;
        // The kernel cannot fail on a bad target; it raises this flag. Reading it waits for the op.
        let bad_target = match &flag {
            Some(f) => dev.clone_dtoh(f)?[0] != 0,
            None => false,
        };
        if bad_target {
            return Err(Error::invalid(
                crate::cross_entropy::OP,
                format!(
                    "a target is outside [0, {}) and not the ignore index {}",
                    cfg.vocab(),
                    cfg.get_ignore_index()
                ),
            )
            .into());
        }
        Ok(ins.out(loss, ()))
    }

    fn bwd(&self, ins: &[&Tensor], _loss: &Tensor, d_loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (logits, targets) = (ins[0], ins[1]);
        // upstream = d_loss * (1 / n_valid) per row, on the device: the same f32 operations as
        // the mean's own scale (`1 / n_valid as f32`), so d_loss = 1 gives its bits. n_valid
        // counts what the kernels count: rows whose target is not the ignore index and lies in
        // [0, vocab) (an out-of-range row, possible without the target check, is neither in the
        // loss nor in the mean). Counted in i64 (exact) and rounded once to f32 like the op's;
        // max(1) only matters when no row is valid, and then every gradient row is zero anyway.
        let vocab = i64::try_from(self.cfg.vocab())
            .map_err(|_| Error::shape(Bwd::NAME, "vocabulary above i64::MAX"))?;
        let valid =
            (targets.ne(self.cfg.get_ignore_index())? * targets.ge(0i64)? * targets.lt(vocab)?)?;
        let n_valid = valid
            .to_dtype(DType::I64)?
            .sum_all()?
            .to_dtype(DType::F32)?
            .maximum(1f32)?;
        let scale = (n_valid.recip()? * d_loss.to_dtype(DType::F32)?)?;
        let upstream = scale.broadcast_as(self.cfg.rows())?;
        let bwd = Bwd {
            cfg: self.cfg.reduction(Reduction::None),
        };
        let d_logits = Op(bwd).apply_no_bwd(&[logits, targets, &upstream])?;
        Ok(vec![Some(d_logits)])
    }
}

/// The backward pass on (logits, targets, upstream f32 `[rows]`): the gradient of the logits.
#[derive(Clone, Copy, Debug)]
struct Bwd {
    /// The forward's config with `Reduction::None` (the per-row upstream carries the mean).
    cfg: Config,
}

impl Pass for Bwd {
    const NAME: &'static str = "fusedreg-cross-entropy-bwd";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let logits = ins.slice::<T>(0, "logits")?;
        let targets = ins.slice::<i64>(1, "targets")?;
        let upstream = ins.slice::<f32>(2, "upstream")?;
        let mut grad = vec![T::default(); self.cfg.len()];
        cpu::forward_backward(&self.cfg, logits, targets, Some(upstream), &mut grad)?;
        Ok(cpu_out(grad, ins.shape(0)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        use crate::cross_entropy::Outputs;
        let cfg = &self.cfg;
        let logits = ins.view::<T>(0, "logits")?;
        let targets = ins.view::<i64>(1, "targets")?;
        let upstream = ins.view::<f32>(2, "upstream")?;
        let n = cfg.len();
        // SAFETY: the pass writes every gradient element (ignored rows get zeros) and every
        // per-row loss.
        let mut grad = unsafe { ins.alloc::<T>(n)? };
        // SAFETY: as above (the per-row losses are scratch here).
        let mut rows = unsafe { ins.alloc::<f32>(cfg.rows())? };
        let out = Outputs {
            upstream: Some(upstream),
            ..Outputs::new(rows.slice_mut(..cfg.rows()))
        };
        let mut g = grad.slice_mut(..n);
        crate::cross_entropy::forward_backward(h, cfg, &logits, &targets, &mut g, out)?;
        Ok(ins.out(grad, ins.shape(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::shell::assert_fails_with;
    use candle_core::Device;

    /// The custom op refuses strided logits and targets of another dtype than i64 (the public
    /// `forward` copies and widens before reaching it).
    #[test]
    fn custom_op_refuses_strided_logits_and_u32_targets() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 1.0, (4, 6), &dev)?.t()?; // [6, 4], strided
        let targets = Tensor::zeros(6, DType::I64, &dev)?;
        let cfg = Config::new(6, 4)?;
        let fwd = Op(Fwd { cfg, check: true });
        assert_fails_with(logits.apply_op2_no_bwd(&targets, &fwd), "not contiguous");
        let logits = logits.contiguous()?;
        let t32 = Tensor::zeros(6, DType::U32, &dev)?;
        assert_fails_with(logits.apply_op2_no_bwd(&t32, &fwd), "I64");
        Ok(())
    }
}
