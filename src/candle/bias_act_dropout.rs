//! [`BiasActDropout`]: `y = dropout(act(x + bias))` on candle tensors, with autograd, through
//! [`crate::bias_act_dropout`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::storage::{check_tensor, cpu_out, cpu_slice, dispatch, rows_cols, Elem};
use super::{check_site, wrap, StepKeys};
use crate::bias_act_dropout::{cpu, Activation, Config, Preact};
use crate::dropping::DropRate;
use crate::error::Error;
use crate::Math;

const OP: &str = "candle::BiasActDropout";
const FWD: &str = "fusedreg-bias-act-dropout";
const BWD: &str = "fusedreg-bias-act-dropout-bwd";

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
    rate: DropRate,
    site: u32,
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
    pub fn new(act: Activation, p: f64, site: u32) -> candle_core::Result<Self> {
        check_site(site)?;
        let rate = DropRate::new(p)?;
        Ok(BiasActDropout {
            act,
            rate,
            site,
            math: None,
        })
    }

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

    /// The drop probability.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(fusedreg::candle::BiasActDropout::new(Activation::Relu, 0.25, 1)?.p(), 0.25);
    /// # Ok(()) }
    /// ```
    pub fn p(&self) -> f64 {
        self.rate.p()
    }

    /// The site number.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::bias_act_dropout::Activation;
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(fusedreg::candle::BiasActDropout::new(Activation::Relu, 0.25, 9)?.site(), 9);
    /// # Ok(()) }
    /// ```
    pub fn site(&self) -> u32 {
        self.site
    }

    /// The [`Config`] a call on a `[rows, cols]` tensor uses: with `keys`, the site's rate and
    /// call id of that step; without (evaluation), p = 0. Use it to reproduce a mask
    /// (`cfg.keeps(i)`).
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
    pub fn config(
        &self,
        rows: usize,
        cols: usize,
        keys: Option<&StepKeys>,
    ) -> candle_core::Result<Config> {
        let (p, seed, call) = match keys {
            None => (0.0, 0, 0),
            Some(k) => (self.rate.p(), k.seed(), k.call(self.site, 0)?),
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
    ) -> candle_core::Result<Tensor> {
        check_tensor(OP, "x", x, x)?;
        let (rows, cols) = rows_cols(OP, "x", x)?;
        if let Some(b) = bias {
            check_tensor(OP, "bias", b, x)?;
            if b.dims() != [cols] {
                return Err(wrap(Error::shape(
                    OP,
                    format!("bias is {:?}, expected [{cols}] (one per column)", b.dims()),
                )));
            }
        }
        let op = Fwd {
            cfg: self.config(rows, cols, keys)?,
        };
        let x = x.contiguous()?;
        match bias {
            None => x.apply_op1(op),
            Some(b) => x.apply_op2(&b.contiguous()?, op),
        }
    }
}

/// The forward custom op: (x) or (x, bias).
#[derive(Clone, Copy, Debug)]
struct Fwd {
    cfg: Config,
}

fn fwd_cpu<T: Elem>(
    cfg: &Config,
    (sx, lx): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = cpu_slice::<T>(FWD, "x", sx, lx)?;
    let b = bias
        .map(|(s, l)| cpu_slice::<T>(FWD, "bias", s, l))
        .transpose()?;
    let mut y = vec![T::default(); cfg.len()];
    cpu::forward(cfg, x, b, &mut y, None)?;
    Ok(cpu_out(y, lx.shape().clone()))
}

#[cfg(feature = "candle-cuda")]
fn fwd_cuda<T: Elem>(
    cfg: &Config,
    (sx, lx): (&candle_core::CudaStorage, &Layout),
    bias: Option<(&candle_core::CudaStorage, &Layout)>,
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use super::storage::{cuda_alloc, cuda_handle, cuda_view};
    let dev = &sx.device;
    let h = cuda_handle(dev)?;
    let x = cuda_view::<T>(FWD, "x", sx, lx)?;
    let b = bias
        .map(|(s, l)| cuda_view::<T>(FWD, "bias", s, l))
        .transpose()?;
    // SAFETY: the forward writes every element of y (a dropped element gets +0).
    let mut y = unsafe { cuda_alloc::<T>(dev, cfg.len())? };
    crate::bias_act_dropout::forward(&h, cfg, &x, b, &mut y.slice_mut(..cfg.len()), None)?;
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()),
        lx.shape().clone(),
    ))
}

impl CustomOp1 for Fwd {
    fn name(&self) -> &'static str {
        FWD
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(FWD, s.dtype(), fwd_cpu(&self.cfg, (s, l), None))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(FWD, s.dtype(), fwd_cuda(&self.cfg, (s, l), None))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (dx, _) = backward(&self.cfg, x, None, dy)?;
        Ok(Some(dx))
    }
}

impl CustomOp2 for Fwd {
    fn name(&self) -> &'static str {
        FWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(
            FWD,
            s1.dtype(),
            fwd_cpu(&self.cfg, (s1, l1), Some((s2, l2)))
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(
            FWD,
            s1.dtype(),
            fwd_cuda(&self.cfg, (s1, l1), Some((s2, l2)))
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dbias) = backward(&self.cfg, x, Some(bias), dy)?;
        Ok((Some(dx), dbias))
    }
}

/// `(dx, dbias)` from one fused backward ([`Preact::X`]: `h` recomputed from the forward's own
/// inputs `x` and `bias`, which candle's graph holds). With a bias the op writes dx and dbias
/// into one `[rows + 1, cols]` buffer (dbias last), split here with `narrow` (views, no copy).
fn backward(
    cfg: &Config,
    x: &Tensor,
    bias: Option<&Tensor>,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    // The forward's inputs were made contiguous before the op; these are no-ops then.
    let x = x.contiguous()?;
    let op = Bwd { cfg: *cfg };
    let Some(b) = bias else {
        return Ok((dy.apply_op2_no_bwd(&x, &op)?, None));
    };
    let out = dy.apply_op3_no_bwd(&x, &b.contiguous()?, &op)?;
    let rows = cfg.rows();
    let dx = out.narrow(0, 0, rows)?.reshape(x.shape())?;
    let db = out.narrow(0, rows, 1)?.reshape(cfg.cols())?;
    Ok((dx, Some(db)))
}

/// The backward custom op: (dy, x) -> dx (dy's shape), or (dy, x, bias) -> `[rows + 1, cols]` =
/// dx then dbias. It has no backward of its own (no second derivatives through this op).
#[derive(Clone, Copy, Debug)]
struct Bwd {
    cfg: Config,
}

impl Bwd {
    /// Elements and shape of the output; `dbias` when the bias gradient is packed after dx.
    fn out_shape(&self, dy: &Layout, dbias: bool) -> candle_core::Result<(usize, Shape)> {
        let (n, cols) = (self.cfg.len(), self.cfg.cols());
        if !dbias {
            return Ok((n, dy.shape().clone()));
        }
        let rows1 = self.cfg.rows().checked_add(1);
        let total = n.checked_add(cols);
        match (rows1, total) {
            (Some(rows1), Some(total)) => Ok((total, Shape::from((rows1, cols)))),
            _ => Err(wrap(Error::shape(BWD, "rows + 1 overflows"))),
        }
    }
}

fn bwd_cpu<T: Elem>(
    op: &Bwd,
    (sdy, ldy): (&CpuStorage, &Layout),
    (sx, lx): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let dy = cpu_slice::<T>(BWD, "dy", sdy, ldy)?;
    let x = cpu_slice::<T>(BWD, "x", sx, lx)?;
    let b = bias
        .map(|(s, l)| cpu_slice::<T>(BWD, "bias", s, l))
        .transpose()?;
    let (total, shape) = op.out_shape(ldy, b.is_some())?;
    let mut out = vec![T::default(); total];
    let (dx, db) = out.split_at_mut(op.cfg.len());
    let pre = Preact::X { x, bias: b };
    cpu::backward(&op.cfg, dy, pre, dx, b.is_some().then_some(db))?;
    Ok(cpu_out(out, shape))
}

#[cfg(feature = "candle-cuda")]
fn bwd_cuda<T: Elem>(
    op: &Bwd,
    (sdy, ldy): (&candle_core::CudaStorage, &Layout),
    (sx, lx): (&candle_core::CudaStorage, &Layout),
    bias: Option<(&candle_core::CudaStorage, &Layout)>,
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use super::storage::{cuda_alloc, cuda_handle, cuda_view};
    let dev = &sdy.device;
    let h = cuda_handle(dev)?;
    let dy = cuda_view::<T>(BWD, "dy", sdy, ldy)?;
    let x = cuda_view::<T>(BWD, "x", sx, lx)?;
    let b = bias
        .map(|(s, l)| cuda_view::<T>(BWD, "bias", s, l))
        .transpose()?;
    let with_dbias = b.is_some();
    let (total, shape) = op.out_shape(ldy, with_dbias)?;
    let n = op.cfg.len();
    // SAFETY: the backward writes every dx element, and dbias when asked (also when rows is 0).
    let mut out = unsafe { cuda_alloc::<T>(dev, total)? };
    {
        let (mut dx, mut db) = out.split_at_mut(n);
        let db = db.slice_mut(..total - n);
        let pre = Preact::X { x, bias: b };
        crate::bias_act_dropout::backward(
            &h,
            &op.cfg,
            &dy,
            pre,
            &mut dx,
            with_dbias.then_some(db),
        )?;
    }
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
        shape,
    ))
}

impl CustomOp2 for Bwd {
    fn name(&self) -> &'static str {
        BWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(BWD, s1.dtype(), bwd_cpu(self, (s1, l1), (s2, l2), None))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(BWD, s1.dtype(), bwd_cuda(self, (s1, l1), (s2, l2), None))
    }
}

impl CustomOp3 for Bwd {
    fn name(&self) -> &'static str {
        BWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(
            BWD,
            s1.dtype(),
            bwd_cpu(self, (s1, l1), (s2, l2), Some((s3, l3)))
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(
            BWD,
            s1.dtype(),
            bwd_cuda(self, (s1, l1), (s2, l2), Some((s3, l3)))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn cfg(rows: usize, cols: usize) -> Config {
        Config::new(rows, cols, Activation::GeluErf, 0.1, 1, 2).unwrap()
    }

    /// The custom ops refuse strided layouts (the public `forward` copies before reaching them).
    #[test]
    fn custom_op_refuses_non_contiguous() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?.t()?; // [6, 4], strided
        let cfg = cfg(6, 4);
        let err = x.apply_op1_no_bwd(&Fwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
        let dy = Tensor::zeros((6, 4), DType::F32, &dev)?;
        let err = dy.apply_op2_no_bwd(&x, &Bwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
        Ok(())
    }

    /// Storage of another dtype than the first argument's is refused by the op itself.
    #[test]
    fn custom_op_refuses_mixed_dtypes() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let b = Tensor::zeros(3, DType::BF16, &dev)?;
        let cfg = cfg(2, 3);
        let err = x.apply_op2_no_bwd(&b, &Fwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        let err = x.apply_op3_no_bwd(&x, &b, &Bwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        let x64 = Tensor::zeros((2, 3), DType::F64, &dev)?;
        let err = x64.apply_op2_no_bwd(&x64, &Bwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("F64"), "{err}");
        Ok(())
    }
}
