//! [`Dropout`] and [`DropoutResidual`]: `y = [residual +] rowscale * dropout(x + bias)` on candle
//! tensors, with autograd, through [`crate::dropout`] (one op: the residual is optional there and
//! here; the two types are its two call shapes).

use candle_core::{Result, Shape, Tensor};

use super::redundancy::BlockInfluence;
use super::shell::{
    self, cpu_out, packed_len, split_parts, unpack, CpuInputs, CpuOut, Elem, Op, Pass,
};
use super::site::{site_methods, Site};
use super::StepKeys;
use crate::dropout::{cpu, Config};
#[cfg(feature = "candle-cuda")]
use {
    super::shell::{CudaInputs, CudaOut},
    crate::Handle,
};

/// One plain dropout site of a model (the embedding output, a LoRA input, materialised attention
/// probabilities, ...), with an optional bias added first and an optional drop path:
///
/// ```text
/// y = rowscale[row] * keep(i) * (x + bias[col]) / (1 - p)
/// ```
///
/// `x` is `[..., cols]` (rows = the product of the leading dimensions), `bias` is `[cols]`; f32,
/// f16 or bf16, both the same, on one device. The arithmetic, the mask and the drop path are
/// those of [`crate::dropout`] (`t = x + b` in f32, times the multiplier, rounded once; a dropped
/// element is `+0`), so the CPU device gives the bits of [`crate::dropout::cpu`] and the CUDA
/// device the kernels' (the same bits). Gradients, from one fused backward:
/// `dx = rowscale * keep * dy / (1 - p)` and `dbias` = the column sums of `dx` in the
/// deterministic order of [`crate::dropout::slab_rows`]. Masks come from the [`StepKeys`] and the
/// site (random stream 0: element mask, 1: drop path), so nothing is stored for the backward
/// (see the [module docs](super)), unlike `candle_nn::ops::dropout`, which keeps a mask in x's
/// dtype. [`DropoutResidual`] is the same op with a residual added.
///
/// # Examples
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use fusedreg::candle::{Dropout, StepKeys};
/// use fusedreg::DtypeKind;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Var::randn(0f32, 1.0, (2, 8, 32), &dev)?; // e.g. token + position embeddings
/// let site = Dropout::new(0.1, 0)?;
/// let keys = StepKeys::new(42, 0);
/// let y = site.forward(&x, None, Some(&keys))?;
/// // The mask is reproducible from the keys: the config names it.
/// let cfg = site.config(16, 32, Some(&keys))?;
/// let (yv, xv) = (y.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
/// for i in 0..yv.len() {
///     let want = if cfg.keeps(DtypeKind::F32, i as u64) { xv[i] * cfg.scale(DtypeKind::F32) } else { 0.0 };
///     assert_eq!(yv[i], want);
/// }
/// let grads = y.sum_all()?.backward()?;
/// assert_eq!(grads.get(&x).unwrap().dims(), &[2, 8, 32]);
/// // Evaluation (no keys): y = x exactly.
/// let y_eval = site.forward(&x, None, None)?;
/// assert_eq!(y_eval.flatten_all()?.to_vec1::<f32>()?, xv);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    site: Site,
}

/// One bias + dropout + residual-add site of a model (e.g. a transformer block's attention or MLP
/// output joining the residual stream), optionally with a drop path (stochastic depth):
///
/// ```text
/// y = residual + rowscale[row] * keep(i) * (x + bias[col]) / (1 - p)
/// ```
///
/// [`Dropout`] with a residual: `x` and `residual` have one shape `[..., cols]`, `bias` is
/// `[cols]`; f32, f16 or bf16, all the same, on one device. The arithmetic is that of
/// [`crate::dropout`] with a residual (`fma(x + b, m, r)` in f32, rounded once), so the CPU
/// device gives the bits of [`crate::dropout::cpu`] and the CUDA device the kernels' (the same
/// bits). Gradients: `dx = rowscale * keep * dy / (1 - p)`, `dresidual = dy` (the same tensor,
/// not a copy), `dbias` = the column sums of `dx` in the deterministic order of
/// [`crate::dropout::slab_rows`]. Masks come from the [`StepKeys`] and the site, as for
/// [`Dropout`].
///
/// # Examples
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use fusedreg::candle::{DropoutResidual, StepKeys};
/// use fusedreg::DtypeKind;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // [batch 2, seq 8, hidden 32]; drop path draws once per sample (8 rows).
/// let x = Var::randn(0f32, 1.0, (2, 8, 32), &dev)?;
/// let stream = Tensor::randn(0f32, 1.0, (2, 8, 32), &dev)?;
/// let site = DropoutResidual::new(0.1, 5)?.with_drop_path(0.2, 8)?;
/// let keys = StepKeys::new(42, 0);
/// let y = site.forward(&x, &stream, None, Some(&keys))?;
/// // The mask is reproducible from the keys: the config names it.
/// let cfg = site.config(16, 32, Some(&keys))?;
/// let (yv, sv) = (y.flatten_all()?.to_vec1::<f32>()?, stream.flatten_all()?.to_vec1::<f32>()?);
/// let rs0 = cfg.drop_path().unwrap().row_scale(keys.seed(), 0);
/// assert_eq!(yv[0] == sv[0], rs0 == 0.0 || !cfg.keeps(DtypeKind::F32, 0)); // dropped: the residual's bits
/// // Evaluation (no keys): y = x + residual exactly, nothing dropped.
/// let y_eval = site.forward(&x, &stream, None, None)?;
/// let exact = (x.as_tensor() + &stream)?;
/// assert_eq!(y_eval.flatten_all()?.to_vec1::<f32>()?, exact.flatten_all()?.to_vec1::<f32>()?);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutResidual {
    site: Site,
}

/// The constructor, site accessors and config of both site types (`$ty`: the type's name, for
/// the doc examples): one definition, documented and tested once per type.
macro_rules! site_type_methods {
    ($ty:ident) => {
        /// A site dropping elements with probability `p` (in `[0, 1]`), numbered `site`
        /// (`< 2^24`, unique among the model's dropout sites).
        ///
        /// # Examples
        ///
        /// ```
        #[doc = concat!("use fusedreg::candle::", stringify!($ty), ";")]
        /// # fn main() -> candle_core::Result<()> {
        #[doc = concat!("let site = ", stringify!($ty), "::new(0.1, 0)?;")]
        /// assert_eq!((site.p(), site.site(), site.drop_path()), (0.1, 0, None));
        #[doc = concat!("let other = ", stringify!($ty), "::new(0.25, 9)?;")]
        /// assert_eq!((other.p(), other.site()), (0.25, 9));
        #[doc = concat!("assert!(", stringify!($ty), "::new(1.5, 0).is_err());")]
        #[doc = concat!("assert!(", stringify!($ty), "::new(f64::NAN, 0).is_err());")]
        #[doc = concat!("assert!(", stringify!($ty), "::new(0.1, 1 << 24).is_err());")]
        /// // A drop path (p_path 0: none; rows_per_sample 0 or a negative rate: errors).
        /// assert_eq!(site.with_drop_path(0.2, 128)?.drop_path(), Some((0.2, 128)));
        /// assert_eq!(site.with_drop_path(0.5, 4)?.drop_path(), Some((0.5, 4)));
        /// assert_eq!(site.with_drop_path(0.0, 128)?.drop_path(), None);
        /// assert!(site.with_drop_path(0.2, 0).is_err());
        /// assert!(site.with_drop_path(-0.2, 1).is_err());
        /// # Ok(()) }
        /// ```
        pub fn new(p: f64, site: u32) -> Result<Self> {
            Ok($ty {
                site: Site::new(p, site)?,
            })
        }

        site_methods!(drop_path);

        /// The [`Config`] a call on a `[rows, cols]` tensor uses: with `keys`, the site's rates
        /// and call ids of that step; without (evaluation), p = 0 and no drop path. Use it to
        /// reproduce a mask (`cfg.keeps(dtype, i)`, `cfg.drop_path().unwrap().row_scale(seed,
        /// row)`).
        ///
        /// # Examples
        ///
        /// ```
        #[doc = concat!("use fusedreg::candle::{", stringify!($ty), ", StepKeys};")]
        /// # fn main() -> candle_core::Result<()> {
        /// let keys = StepKeys::new(42, 3);
        #[doc = concat!("let site = ", stringify!($ty), "::new(0.1, 7)?;")]
        /// let cfg = site.with_drop_path(0.2, 4)?.config(8, 16, Some(&keys))?;
        /// assert_eq!((cfg.seed(), cfg.call()), (42, keys.call(7, 0)?));
        /// assert_eq!(cfg.drop_path().unwrap().call(), keys.call(7, 1)?);
        /// let eval = site.config(8, 16, None)?;
        /// assert_eq!(eval.rate().p(), 0.0);
        /// assert!(eval.drop_path().is_none());
        /// # Ok(()) }
        /// ```
        pub fn config(&self, rows: usize, cols: usize, keys: Option<&StepKeys>) -> Result<Config> {
            config(&self.site, rows, cols, keys)
        }
    };
}

impl Dropout {
    site_type_methods!(Dropout);

    /// `rowscale * dropout(x + bias)` with the masks of `keys` (training), or `x + bias` without
    /// keys (evaluation: `x` itself, not a copy, when there is no bias; otherwise the sum rounded
    /// once, as candle's `broadcast_add`). Non-contiguous inputs are copied first.
    ///
    /// Errors: a dtype other than f32/f16/bf16, `x` and `bias` of different dtypes or devices, a
    /// scalar `x`, a bias that is not `[cols]`, a per-sample drop path on 2^32 rows or more.
    ///
    /// # Examples
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use fusedreg::candle::{Dropout, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let x = Tensor::ones((3, 4), DType::F32, &dev)?;
    /// let b = Tensor::full(0.5f32, 4, &dev)?;
    /// let keys = StepKeys::new(1, 0);
    /// let site = Dropout::new(0.5, 0)?;
    /// let y = site.forward(&x, Some(&b), Some(&keys))?.flatten_all()?.to_vec1::<f32>()?;
    /// assert!(y.iter().all(|&v| v == 0.0 || v == 3.0)); // dropped, or (1 + 0.5) / 0.5
    /// // Wrong bias shape, wrong dtype: errors, not panics.
    /// assert!(site.forward(&x, Some(&x), Some(&keys)).is_err());
    /// assert!(site.forward(&x.to_dtype(DType::F64)?, None, Some(&keys)).is_err());
    /// # Ok(()) }
    /// ```
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        keys: Option<&StepKeys>,
    ) -> Result<Tensor> {
        forward("candle::Dropout", &self.site, x, None, bias, keys, None)
    }
}

impl DropoutResidual {
    site_type_methods!(DropoutResidual);

    /// `residual + rowscale * dropout(x + bias)` with the masks of `keys` (training), or
    /// `x + bias + residual` without keys (evaluation). Non-contiguous inputs are copied first.
    ///
    /// Errors: a dtype other than f32/f16/bf16, arguments of different dtypes or devices, `x` and
    /// `residual` of different shapes, a scalar `x`, a bias that is not `[cols]`, a per-sample
    /// drop path on 2^32 rows or more.
    ///
    /// # Examples
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use fusedreg::candle::{DropoutResidual, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let x = Tensor::ones((3, 4), DType::F32, &dev)?;
    /// let r = Tensor::zeros((3, 4), DType::F32, &dev)?;
    /// let b = Tensor::full(0.5f32, 4, &dev)?;
    /// let keys = StepKeys::new(1, 0);
    /// let site = DropoutResidual::new(0.5, 0)?;
    /// let y = site.forward(&x, &r, Some(&b), Some(&keys))?.flatten_all()?.to_vec1::<f32>()?;
    /// assert!(y.iter().all(|&v| v == 0.0 || v == 3.0)); // dropped, or (1 + 0.5) / 0.5
    /// // Wrong bias shape, wrong dtype: errors, not panics.
    /// assert!(site.forward(&x, &r, Some(&r), Some(&keys)).is_err());
    /// let x64 = x.to_dtype(DType::F64)?;
    /// assert!(site.forward(&x64, &r.to_dtype(DType::F64)?, None, Some(&keys)).is_err());
    /// # Ok(()) }
    /// ```
    pub fn forward(
        &self,
        x: &Tensor,
        residual: &Tensor,
        bias: Option<&Tensor>,
        keys: Option<&StepKeys>,
    ) -> Result<Tensor> {
        forward(RES_OP, &self.site, x, Some(residual), bias, keys, None)
    }

    /// This site with every forward's rows' `cos(residual, y)` added to `meter`'s site `site`
    /// (Block Influence of the sub-block whose output `x` this add ends, see
    /// [`BlockInfluence`]). The outputs and gradients are those of [`forward`](Self::forward).
    ///
    /// Errors: `site` not below the meter's sites. A forward on another device than the
    /// meter's is an error.
    ///
    /// # Examples
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use fusedreg::candle::{BlockInfluence, DropoutResidual};
    /// # fn main() -> candle_core::Result<()> {
    /// let (dev, meter) = (Device::Cpu, BlockInfluence::new(1, &Device::Cpu)?);
    /// let site = DropoutResidual::new(0.1, 0)?;
    /// let r = Tensor::randn(0f32, 1.0, (3, 16), &dev)?;
    /// let y = site.measured(&meter, 0)?.forward(&r, &r, None, None)?; // y = 2r: cos 1
    /// assert_eq!(meter.stats()?[0].rows, 3);
    /// assert!(meter.bi()?[0].unwrap().abs() < 1e-6);
    /// assert!(site.measured(&meter, 1).is_err());
    /// # let _ = y;
    /// # Ok(()) }
    /// ```
    pub fn measured<'m>(
        &'m self,
        meter: &'m BlockInfluence,
        site: usize,
    ) -> Result<MeasuredResidual<'m>> {
        meter.check_site(site)?;
        Ok(MeasuredResidual {
            op: self,
            meter,
            site,
        })
    }
}

/// The name of [`DropoutResidual`] in errors.
const RES_OP: &str = "candle::DropoutResidual";

/// A [`DropoutResidual`] site measured by a [`BlockInfluence`] meter
/// ([`DropoutResidual::measured`]).
#[derive(Clone, Copy, Debug)]
pub struct MeasuredResidual<'m> {
    op: &'m DropoutResidual,
    meter: &'m BlockInfluence,
    site: usize,
}

impl MeasuredResidual<'_> {
    /// [`DropoutResidual::forward`], adding the rows' `cos(residual, y)` to the meter's site.
    pub fn forward(
        &self,
        x: &Tensor,
        residual: &Tensor,
        bias: Option<&Tensor>,
        keys: Option<&StepKeys>,
    ) -> Result<Tensor> {
        let meter = Some((self.meter.clone(), self.site));
        forward(RES_OP, &self.op.site, x, Some(residual), bias, keys, meter)
    }
}

/// The op's [`Config`] at a site: with `keys`, that step's rates and call ids; without, p = 0.
fn config(site: &Site, rows: usize, cols: usize, keys: Option<&StepKeys>) -> Result<Config> {
    let Some(d) = site.draw(keys)? else {
        return Ok(Config::new(rows, cols, 0.0, 0, 0)?);
    };
    let cfg = Config::new(rows, cols, d.p, d.seed, d.call)?;
    Ok(match d.path {
        None => cfg,
        Some(path) => cfg.with_drop_path(path),
    })
}

/// Both types' forward: the checks, the evaluation shortcut, then [`Fwd`] on
/// `(x, [residual], [bias])`.
fn forward(
    op: &'static str,
    site: &Site,
    x: &Tensor,
    residual: Option<&Tensor>,
    bias: Option<&Tensor>,
    keys: Option<&StepKeys>,
    meter: Option<(BlockInfluence, usize)>,
) -> Result<Tensor> {
    shell::check_tensor(op, "x", x, x)?;
    shell::check_same_shape(op, "residual", residual, x)?;
    let (rows, cols) = shell::rows_cols(op, "x", x)?;
    shell::check_per_column(op, "bias", bias, x, cols)?;
    if keys.is_none() && bias.is_none() && residual.is_none() {
        // Evaluation without a bias is the identity: no pass over the data at all.
        return Ok(x.clone());
    }
    let cfg = config(site, rows, cols, keys)?;
    let ins: Vec<&Tensor> = [Some(x), residual, bias].into_iter().flatten().collect();
    Op(Fwd {
        cfg,
        residual: residual.is_some(),
        meter,
    })
    .apply(&ins)
}

/// The forward pass on `(x, [residual], [bias])`: y, x's shape.
#[derive(Clone, Debug)]
struct Fwd {
    cfg: Config,
    residual: bool,
    /// The Block Influence meter and site the forward adds its rows to (with a residual).
    meter: Option<(BlockInfluence, usize)>,
}

impl Fwd {
    /// The input index of the bias (after x and the residual, if any).
    fn bias_at(&self) -> usize {
        1 + usize::from(self.residual)
    }
}

impl Pass for Fwd {
    const NAME: &'static str = "fusedreg-dropout";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let x = ins.slice::<T>(0, "x")?;
        let residual = self
            .residual
            .then(|| ins.slice(1, "residual"))
            .transpose()?;
        let bias = ins.opt_slice(self.bias_at(), "bias")?;
        let meter = self.meter.as_ref().map(|(m, site)| (m.lock(), *site));
        let redundancy = meter
            .as_ref()
            .map(|(m, site)| m.cpu_site(RES_OP, *site))
            .transpose()?;
        let mut y = vec![T::default(); self.cfg.len()];
        let opts = cpu::ForwardOptions {
            bias,
            residual,
            redundancy,
            ..Default::default()
        };
        cpu::forward(&self.cfg, x, &mut y, opts)?;
        Ok(cpu_out(y, ins.shape(0)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        let x = ins.view::<T>(0, "x")?;
        let residual = self.residual.then(|| ins.view(1, "residual")).transpose()?;
        let bias = ins.opt_view(self.bias_at(), "bias")?;
        let n = self.cfg.len();
        // SAFETY: the out-of-place forward writes every element of y (a dropped element or row
        // gets +0, or the residual's bits).
        let mut y = unsafe { ins.alloc::<T>(n)? };
        let mut meter = self.meter.as_ref().map(|(m, site)| (m.lock(), *site));
        let redundancy = meter
            .as_mut()
            .map(|(m, site)| m.cuda_site(RES_OP, *site))
            .transpose()?;
        let opts = crate::dropout::ForwardOptions {
            bias,
            residual,
            redundancy,
            ..Default::default()
        };
        crate::dropout::forward(h, &self.cfg, &x, &mut y.slice_mut(..n), opts)?;
        Ok(ins.out(y, ins.shape(0)))
    }

    fn bwd(&self, ins: &[&Tensor], _y: &Tensor, dy: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let dbias = ins.len() > self.bias_at();
        let bwd = Bwd {
            cfg: self.cfg,
            dbias,
        };
        let packed = Op(bwd).apply_no_bwd(&[dy])?;
        let cols = dbias.then(|| Shape::from(self.cfg.cols()));
        let [dx, db] = unpack(&packed, [Some(ins[0].shape().clone()), cols])?;
        // dresidual = dy: the same tensor, not a copy.
        let dresidual = self.residual.then(|| Some(dy.clone()));
        Ok([Some(dx), dresidual, Some(db)]
            .into_iter()
            .flatten()
            .collect())
    }
}

/// The backward pass on dy: dx, then dbias when asked, packed in one buffer (split by
/// [`unpack`]: views, no copy). The mask is regenerated from the config's keys; nothing was
/// stored by the forward.
#[derive(Clone, Copy, Debug)]
struct Bwd {
    cfg: Config,
    dbias: bool,
}

impl Bwd {
    /// The packed parts' lengths: dx, dbias (0 when not asked).
    fn lens(&self) -> [usize; 2] {
        [self.cfg.len(), if self.dbias { self.cfg.cols() } else { 0 }]
    }
}

impl Pass for Bwd {
    const NAME: &'static str = "fusedreg-dropout-bwd";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let dy = ins.slice::<T>(0, "dy")?;
        let [n, nb] = self.lens();
        let total = packed_len(Self::NAME, &[n, nb])?;
        let mut out = vec![T::default(); total];
        {
            split_parts!(out.as_mut_slice() => dx: n, db: nb);
            let opts = cpu::BackwardOptions {
                dbias: self.dbias.then_some(db),
                ..Default::default()
            };
            cpu::backward(&self.cfg, dy, dx, opts)?;
        }
        Ok(cpu_out(out, total))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        let dy = ins.view::<T>(0, "dy")?;
        let [n, nb] = self.lens();
        let total = packed_len(Self::NAME, &[n, nb])?;
        // SAFETY: the backward writes every dx element, and dbias (also when rows is 0: a memset).
        let mut out = unsafe { ins.alloc::<T>(total)? };
        {
            split_parts!(out.slice_mut(..) => dx: n, db: nb);
            let opts = crate::dropout::BackwardOptions {
                dbias: self.dbias.then_some(db),
                ..Default::default()
            };
            crate::dropout::backward(h, &self.cfg, &dy, &mut dx, opts)?;
        }
        Ok(ins.out(out, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::shell::assert_fails_with;
    use candle_core::{DType, Device};

    /// The passes refuse strided layouts (the public `forward` copies before reaching them).
    #[test]
    fn custom_op_refuses_non_contiguous() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?.t()?; // [6, 4], strided
        let r = Tensor::zeros((6, 4), DType::F32, &dev)?;
        let cfg = Config::new(6, 4, 0.1, 1, 2)?;
        for residual in [false, true] {
            let fwd = Op(Fwd {
                cfg,
                residual,
                meter: None,
            });
            assert_fails_with(x.apply_op2_no_bwd(&r, &fwd), "not contiguous");
        }
        assert_fails_with(
            x.apply_op1_no_bwd(&Op(Fwd {
                cfg,
                residual: false,
                meter: None,
            })),
            "not contiguous",
        );
        let bwd = Op(Bwd { cfg, dbias: true });
        assert_fails_with(x.apply_op1_no_bwd(&bwd), "not contiguous");
        Ok(())
    }

    /// Storage of another dtype than the first argument's is refused by the pass itself.
    #[test]
    fn custom_op_refuses_mixed_dtypes() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let r = Tensor::zeros((2, 3), DType::BF16, &dev)?;
        let b = Tensor::zeros(3, DType::BF16, &dev)?;
        let cfg = Config::new(2, 3, 0.1, 1, 2)?;
        let fwd = Op(Fwd {
            cfg,
            residual: true,
            meter: None,
        });
        assert_fails_with(x.apply_op2_no_bwd(&r, &fwd), "dtype");
        let fwd = Op(Fwd {
            cfg,
            residual: false,
            meter: None,
        });
        assert_fails_with(x.apply_op2_no_bwd(&b, &fwd), "dtype");
        let x64 = Tensor::zeros((2, 3), DType::F64, &dev)?;
        let bwd = Op(Bwd { cfg, dbias: false });
        assert_fails_with(x64.apply_op1_no_bwd(&bwd), "F64");
        Ok(())
    }
}
