//! [`BiasActDropout`]: `y = dropout(act(x + bias))` on candle tensors, with autograd, through
//! [`crate::bias_act_dropout`].

use candle_core::{Result, Shape, Tensor};

use super::shell::{
    self, cpu_out, packed_len, split_parts, unpack, CpuInputs, CpuOut, Elem, Op, Pass,
};
use super::site::{site_methods, Site};
use super::StepKeys;
use crate::bias_act_dropout::{cpu, Activation, Config, Preact};
use crate::Math;
#[cfg(feature = "candle-cuda")]
use {
    super::shell::{CudaInputs, CudaOut},
    crate::Handle,
};

const OP: &str = "candle::BiasActDropout";

/// The feed-forward site of a transformer block: bias add, activation and dropout in one pass,
///
/// ```text
/// h = x + bias[col]          (no bias: h = x)
/// y = keep(i) ? act(h) / (1 - p) : 0
/// ```
///
/// with `act` any [`Activation`] (GELU erf, GELU tanh, SiLU, ReLU). `x` is `[..., cols]` (rows =
/// the product of the leading dimensions; cols = the FFN width), `bias` is `[cols]`; f32, f16 or
/// bf16, both the same, on one device. The arithmetic is that of [`crate::bias_act_dropout`]
/// (all in f32, rounded once), so the CPU device gives the bits of
/// [`crate::bias_act_dropout::cpu`] and the CUDA device the kernels' (the same bits).
///
/// Gradients come from one fused backward: `dx = keep ? dy / (1 - p) * act'(h) : 0` and `dbias` =
/// the column sums of `dx` in the deterministic slab order of the op. The mask is regenerated
/// from the [`StepKeys`] and the site (random stream 0), so nothing is stored for it.
///
/// # Why the backward recomputes `h` ([`Preact::X`])
///
/// The backward needs the pre-activation `h = x + bias`. The adapter uses [`Preact::X`]: the
/// fused backward reads `x` and `bias` and recomputes `h` (one f32 add per element, free next to
/// the memory traffic). This stores nothing extra: candle's graph already holds `x` and `bias`,
/// the inputs of the op's node, until the backward. [`Preact::H`] would make the forward also
/// write `h` (one more tensor of `x`'s size, written and then held until the backward, while
/// `x` stays held by the graph anyway), and in f16/bf16 it would compute `act'` at the rounded
/// `h` rather than the exact one.
///
/// # Examples
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use fusedreg::bias_act_dropout::Activation;
/// use fusedreg::candle::{BiasActDropout, StepKeys};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Var::randn(0f32, 1.0, (2, 8, 64), &dev)?; // the first FFN matmul's output
/// let b = Var::zeros(64, candle_core::DType::F32, &dev)?;
/// let site = BiasActDropout::new(Activation::GeluTanh, 0.1, 4)?;
/// let keys = StepKeys::new(42, 0);
/// let y = site.forward(&x, Some(&b), Some(&keys))?;
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(&x).unwrap().dims(), &[2, 8, 64]);
/// assert_eq!(grads.get(&b).unwrap().dims(), &[64]);
/// // Evaluation (no keys): act(x + bias), nothing dropped.
/// let y_eval = site.forward(&x, Some(&b), None)?.flatten_all()?.to_vec1::<f32>()?;
/// let xv = x.flatten_all()?.to_vec1::<f32>()?;
/// assert!(xv.iter().zip(&y_eval).all(|(&h, &y)| y == Activation::GeluTanh.forward(h)));
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasActDropout {
    act: Activation,
    site: Site,
    /// `None`: the op's default for the activation ([`Activation::default_math`]).
    math: Option<Math>,
}

impl BiasActDropout {
    /// A site applying `act`, then dropping with probability `p` (in `[0, 1]`), numbered `site`
    /// (`< 2^24`, unique among the model's dropout sites).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// use fusedreg::candle::BiasActDropout;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = BiasActDropout::new(Activation::Silu, 0.1, 2)?;
    /// assert_eq!((site.act(), site.p(), site.site()), (Activation::Silu, 0.1, 2));
    /// assert!(BiasActDropout::new(Activation::Relu, 1.5, 0).is_err());
    /// assert!(BiasActDropout::new(Activation::Relu, f64::NAN, 0).is_err());
    /// assert!(BiasActDropout::new(Activation::Relu, 0.1, 1 << 24).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(act: Activation, p: f64, site: u32) -> Result<Self> {
        Ok(BiasActDropout {
            act,
            site: Site::new(p, site)?,
            math: None,
        })
    }

    site_methods!();

    /// The same site with the activation evaluated in `math` mode: [`Math::Fast`] (the op's
    /// default for GELU and SiLU: approximate, within the bound in the
    /// [op's docs](crate::bias_act_dropout)) or [`Math::Exact`] (bit for bit equal to the CPU
    /// reference on every device). On candle's CPU device both run the CPU reference of that
    /// mode.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// use fusedreg::candle::BiasActDropout;
    /// use fusedreg::Math;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = BiasActDropout::new(Activation::GeluTanh, 0.1, 2)?;
    /// assert_eq!(site.math(), Math::Fast); // the op's default for GELU
    /// assert_eq!(site.with_math(Math::Exact).math(), Math::Exact);
    /// assert_eq!(BiasActDropout::new(Activation::Relu, 0.1, 2)?.math(), Math::Exact);
    /// # Ok(()) }
    /// ```
    pub fn with_math(self, math: Math) -> Self {
        BiasActDropout {
            math: Some(math),
            ..self
        }
    }

    /// The math mode calls use (default: [`Activation::default_math`] of the activation).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// use fusedreg::Math;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = fusedreg::candle::BiasActDropout::new(Activation::Silu, 0.1, 0)?;
    /// assert_eq!(site.math(), Activation::Silu.default_math());
    /// # Ok(()) }
    /// ```
    pub fn math(&self) -> Math {
        self.math.unwrap_or_else(|| self.act.default_math())
    }

    /// The activation.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = fusedreg::candle::BiasActDropout::new(Activation::GeluErf, 0.1, 0)?;
    /// assert_eq!(site.act(), Activation::GeluErf);
    /// # Ok(()) }
    /// ```
    pub fn act(&self) -> Activation {
        self.act
    }

    /// The [`Config`] a call on a `[rows, cols]` tensor uses: with `keys`, the site's rate and
    /// call id of that step; without (evaluation), p = 0. Use it to reproduce a mask
    /// (`cfg.keeps(dtype, i)`).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// use fusedreg::candle::{BiasActDropout, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let keys = StepKeys::new(42, 3);
    /// let site = BiasActDropout::new(Activation::Relu, 0.1, 7)?;
    /// let cfg = site.config(4, 16, Some(&keys))?;
    /// assert_eq!((cfg.seed(), cfg.call(), cfg.act()), (42, keys.call(7, 0)?, Activation::Relu));
    /// assert_eq!(site.config(4, 16, None)?.rate().p(), 0.0);
    /// assert_eq!(site.config(4, 16, None)?.math(), site.math());
    /// # Ok(()) }
    /// ```
    pub fn config(&self, rows: usize, cols: usize, keys: Option<&StepKeys>) -> Result<Config> {
        let (p, seed, call) = match self.site.draw(keys)? {
            None => (0.0, 0, 0),
            Some(d) => (d.p, d.seed, d.call),
        };
        Ok(Config::new(rows, cols, self.act, p, seed, call)?.with_math(self.math()))
    }

    /// `dropout(act(x + bias))` with the mask of `keys` (training), or `act(x + bias)` without
    /// keys (evaluation). Non-contiguous inputs are copied first.
    ///
    /// Errors: a dtype other than f32/f16/bf16, `x` and `bias` of different dtypes or devices, a
    /// scalar `x`, a bias that is not `[cols]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use fusedreg::bias_act_dropout::Activation;
    /// use fusedreg::candle::{BiasActDropout, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let x = Tensor::new(&[[1.0f32, -2.0, 3.0, -4.0]], &dev)?;
    /// let b = Tensor::full(0.5f32, 4, &dev)?;
    /// let site = BiasActDropout::new(Activation::Relu, 0.5, 0)?;
    /// let y = site.forward(&x, Some(&b), Some(&StepKeys::new(1, 0)))?.to_vec2::<f32>()?;
    /// for (y, h) in y[0].iter().zip([1.5f32, -1.5, 3.5, -3.5]) {
    ///     assert!(*y == 0.0 || *y == 2.0 * h.max(0.0)); // dropped, or relu(h) / 0.5
    /// }
    /// // Wrong bias shape, wrong dtype: errors, not panics.
    /// assert!(site.forward(&x, Some(&x), None).is_err());
    /// assert!(site.forward(&x.to_dtype(DType::F64)?, None, None).is_err());
    /// # Ok(()) }
    /// ```
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        keys: Option<&StepKeys>,
    ) -> Result<Tensor> {
        shell::check_tensor(OP, "x", x, x)?;
        let (rows, cols) = shell::rows_cols(OP, "x", x)?;
        shell::check_per_column(OP, "bias", bias, x, cols)?;
        let cfg = self.config(rows, cols, keys)?;
        Op(Fwd { cfg }).apply(&[Some(x), bias].into_iter().flatten().collect::<Vec<_>>())
    }
}

/// The forward pass on `(x, [bias])`: y, x's shape.
#[derive(Clone, Copy, Debug)]
struct Fwd {
    cfg: Config,
}

impl Pass for Fwd {
    const NAME: &'static str = "fusedreg-bias-act-dropout";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let x = ins.slice::<T>(0, "x")?;
        let bias = ins.opt_slice(1, "bias")?;
        let mut y = vec![T::default(); self.cfg.len()];
        cpu::forward(&self.cfg, x, bias, &mut y, None)?;
        Ok(cpu_out(y, ins.shape(0)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        let x = ins.view::<T>(0, "x")?;
        let bias = ins.opt_view(1, "bias")?;
        let n = self.cfg.len();
        // SAFETY: the forward writes every element of y (a dropped element gets +0).
        let mut y = unsafe { ins.alloc::<T>(n)? };
        crate::bias_act_dropout::forward(h, &self.cfg, &x, bias, &mut y.slice_mut(..n), None)?;
        Ok(ins.out(y, ins.shape(0)))
    }

    /// `(dx, dbias)` from one fused backward ([`Preact::X`]: `h` recomputed from the forward's
    /// own inputs `x` and `bias`, which candle's graph holds).
    fn bwd(&self, ins: &[&Tensor], _y: &Tensor, dy: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut args = vec![dy];
        args.extend_from_slice(ins);
        let packed = Op(Bwd { cfg: self.cfg }).apply_no_bwd(&args)?;
        let cols = (ins.len() > 1).then(|| Shape::from(self.cfg.cols()));
        let [dx, db] = unpack(&packed, [Some(ins[0].shape().clone()), cols])?;
        Ok(vec![dx, db])
    }
}

/// The backward pass on `(dy, x, [bias])`: dx, then dbias when there is a bias, packed in one
/// buffer (split by [`unpack`]: views, no copy).
#[derive(Clone, Copy, Debug)]
struct Bwd {
    cfg: Config,
}

impl Bwd {
    /// The packed parts' lengths: dx, dbias (0 without a bias).
    fn lens(&self, dbias: bool) -> Result<(usize, usize, usize)> {
        let (n, nb) = (self.cfg.len(), if dbias { self.cfg.cols() } else { 0 });
        Ok((n, nb, packed_len(Self::NAME, &[n, nb])?))
    }
}

impl Pass for Bwd {
    const NAME: &'static str = "fusedreg-bias-act-dropout-bwd";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let dy = ins.slice::<T>(0, "dy")?;
        let x = ins.slice(1, "x")?;
        let bias = ins.opt_slice(2, "bias")?;
        let (n, nb, total) = self.lens(bias.is_some())?;
        let mut out = vec![T::default(); total];
        {
            split_parts!(out.as_mut_slice() => dx: n, db: nb);
            let pre = Preact::X { x, bias };
            cpu::backward(&self.cfg, dy, pre, dx, bias.is_some().then_some(db))?;
        }
        Ok(cpu_out(out, total))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        let dy = ins.view::<T>(0, "dy")?;
        let x = ins.view(1, "x")?;
        let bias = ins.opt_view(2, "bias")?;
        let with_dbias = bias.is_some();
        let (n, nb, total) = self.lens(with_dbias)?;
        // SAFETY: the backward writes every dx element, and dbias when asked (also when rows is 0).
        let mut out = unsafe { ins.alloc::<T>(total)? };
        {
            split_parts!(out.slice_mut(..) => dx: n, db: nb);
            let pre = Preact::X { x, bias };
            let db = with_dbias.then_some(db);
            crate::bias_act_dropout::backward(h, &self.cfg, &dy, pre, &mut dx, db)?;
        }
        Ok(ins.out(out, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::shell::assert_fails_with;
    use candle_core::{DType, Device};

    fn cfg(rows: usize, cols: usize) -> Config {
        Config::new(rows, cols, Activation::GeluErf, 0.1, 1, 2).unwrap()
    }

    /// The custom ops refuse strided layouts (the public `forward` copies before reaching them).
    #[test]
    fn custom_op_refuses_non_contiguous() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?.t()?; // [6, 4], strided
        let cfg = cfg(6, 4);
        assert_fails_with(x.apply_op1_no_bwd(&Op(Fwd { cfg })), "not contiguous");
        let dy = Tensor::zeros((6, 4), DType::F32, &dev)?;
        assert_fails_with(dy.apply_op2_no_bwd(&x, &Op(Bwd { cfg })), "not contiguous");
        Ok(())
    }

    /// Storage of another dtype than the first argument's is refused by the op itself.
    #[test]
    fn custom_op_refuses_mixed_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let b = Tensor::zeros(3, DType::BF16, &dev)?;
        let cfg = cfg(2, 3);
        assert_fails_with(x.apply_op2_no_bwd(&b, &Op(Fwd { cfg })), "dtype");
        assert_fails_with(x.apply_op3_no_bwd(&x, &b, &Op(Bwd { cfg })), "dtype");
        let x64 = Tensor::zeros((2, 3), DType::F64, &dev)?;
        assert_fails_with(x64.apply_op2_no_bwd(&x64, &Op(Bwd { cfg })), "F64");
        Ok(())
    }
}
