//! [`DropoutResidual`]: `y = residual + rowscale * dropout(x + bias)` on candle tensors, with
//! autograd, through [`crate::dropout`] with a residual.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::storage::{check_tensor, cpu_out, cpu_slice, dispatch, rows_cols, Elem};
use super::{check_site, wrap, StepKeys};
use crate::dropout::{cpu, Config, DropPath};
use crate::dropping::DropRate;
use crate::error::Error;

const OP: &str = "candle::DropoutResidual";
const FWD: &str = "fusedreg-dropout-residual";
const BWD: &str = "fusedreg-dropout-residual-bwd";

/// One bias + dropout + residual-add site of a model (e.g. a transformer block's attention or MLP
/// output joining the residual stream), optionally with a drop path (stochastic depth):
///
/// ```text
/// y = residual + rowscale[row] * keep(i) * (x + bias[col]) / (1 - p)
/// ```
///
/// `x` and `residual` have one shape `[..., cols]` (rows = the product of the leading
/// dimensions), `bias` is `[cols]`; f32, f16 or bf16, all the same, on one device. The arithmetic,
/// the mask and the drop path are those of [`crate::dropout`] with a residual (`fma(x + b, m, r)` in
/// f32, rounded once), so the CPU device gives the bits of [`crate::dropout::cpu`] and
/// the CUDA device the kernels' (the same bits). Gradients: `dx = rowscale * keep * dy / (1 - p)`,
/// `dresidual = dy` (the same tensor, not a copy), `dbias` = the column sums of `dx` in the
/// deterministic order of [`crate::dropout::slab_rows`]. Masks come from the
/// [`StepKeys`] and the site (random stream 0: element mask, 1: drop path), so nothing is stored
/// for the backward (see the [module docs](super)).
///
/// # Examples
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use fusedreg::candle::{DropoutResidual, StepKeys};
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
/// assert_eq!(yv[0] == sv[0], rs0 == 0.0 || !cfg.keeps(0)); // dropped: the residual's bits
/// // Evaluation (no keys): y = x + residual exactly, nothing dropped.
/// let y_eval = site.forward(&x, &stream, None, None)?;
/// let exact = (x.as_tensor() + &stream)?;
/// assert_eq!(y_eval.flatten_all()?.to_vec1::<f32>()?, exact.flatten_all()?.to_vec1::<f32>()?);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutResidual {
    rate: DropRate,
    site: u32,
    /// (rate, rows per sample); None when there is no drop path or its rate is 0.
    drop_path: Option<(DropRate, usize)>,
}

impl DropoutResidual {
    /// A site dropping elements with probability `p` (in `[0, 1]`), numbered `site`
    /// (`< 2^24`, unique among the model's dropout sites).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutResidual;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = DropoutResidual::new(0.1, 0)?;
    /// assert_eq!((site.p(), site.site(), site.drop_path()), (0.1, 0, None));
    /// assert!(DropoutResidual::new(1.5, 0).is_err());
    /// assert!(DropoutResidual::new(f64::NAN, 0).is_err());
    /// assert!(DropoutResidual::new(0.1, 1 << 24).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(p: f64, site: u32) -> candle_core::Result<Self> {
        check_site(site)?;
        let rate = DropRate::new(p)?;
        Ok(DropoutResidual {
            rate,
            site,
            drop_path: None,
        })
    }

    /// Adds a drop path: whole samples of `rows_per_sample` consecutive rows (the sequence length
    /// of a `[batch, seq, hidden]` tensor; 1 for per-row) are dropped with probability `p_path`,
    /// kept ones scaled by `1 / (1 - p_path)`. `p_path = 0` means no drop path.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutResidual;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = DropoutResidual::new(0.1, 0)?.with_drop_path(0.2, 128)?;
    /// assert_eq!(site.drop_path(), Some((0.2, 128)));
    /// assert_eq!(DropoutResidual::new(0.1, 0)?.with_drop_path(0.0, 128)?.drop_path(), None);
    /// assert!(DropoutResidual::new(0.1, 0)?.with_drop_path(0.2, 0).is_err());
    /// assert!(DropoutResidual::new(0.1, 0)?.with_drop_path(-0.2, 1).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_drop_path(self, p_path: f64, rows_per_sample: usize) -> candle_core::Result<Self> {
        // Validates both through the op's own checks.
        let path = DropPath::new(p_path, 0).and_then(|p| p.per_sample(rows_per_sample))?;
        Ok(DropoutResidual {
            drop_path: (p_path > 0.0).then_some((path.rate(), rows_per_sample)),
            ..self
        })
    }

    /// The element drop probability.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(fusedreg::candle::DropoutResidual::new(0.25, 1)?.p(), 0.25);
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
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(fusedreg::candle::DropoutResidual::new(0.25, 9)?.site(), 9);
    /// # Ok(()) }
    /// ```
    pub fn site(&self) -> u32 {
        self.site
    }

    /// The drop path's `(p_path, rows_per_sample)`, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutResidual;
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(DropoutResidual::new(0.1, 0)?.with_drop_path(0.5, 4)?.drop_path(), Some((0.5, 4)));
    /// # Ok(()) }
    /// ```
    pub fn drop_path(&self) -> Option<(f64, usize)> {
        self.drop_path.map(|(r, n)| (r.p(), n))
    }

    /// The [`Config`] a call on a `[rows, cols]` tensor uses: with `keys`, the site's rates and
    /// call ids of that step; without (evaluation), p = 0 and no drop path. Use it to reproduce a
    /// mask (`cfg.keeps(i)`, `cfg.drop_path().unwrap().row_scale(seed, row)`).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::{DropoutResidual, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let keys = StepKeys::new(42, 3);
    /// let cfg = DropoutResidual::new(0.1, 7)?.config(4, 16, Some(&keys))?;
    /// assert_eq!((cfg.seed(), cfg.call()), (42, keys.call(7, 0)?));
    /// let eval = DropoutResidual::new(0.1, 7)?.config(4, 16, None)?;
    /// assert_eq!(eval.rate().p(), 0.0);
    /// # Ok(()) }
    /// ```
    pub fn config(
        &self,
        rows: usize,
        cols: usize,
        keys: Option<&StepKeys>,
    ) -> candle_core::Result<Config> {
        let Some(keys) = keys else {
            return Config::new(rows, cols, 0.0, 0, 0).map_err(wrap);
        };
        let call = keys.call(self.site, 0)?;
        let cfg = Config::new(rows, cols, self.rate.p(), keys.seed(), call)?;
        Ok(match self.drop_path {
            None => cfg,
            Some((rate, per_sample)) => {
                let path = DropPath::new(rate.p(), keys.call(self.site, 1)?)
                    .and_then(|p| p.per_sample(per_sample))?;
                cfg.with_drop_path(path)
            }
        })
    }

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
    ) -> candle_core::Result<Tensor> {
        check_tensor(OP, "x", x, x)?;
        check_tensor(OP, "residual", residual, x)?;
        if residual.dims() != x.dims() {
            return Err(wrap(Error::shape(
                OP,
                format!("residual {:?} and x {:?} differ", residual.dims(), x.dims()),
            )));
        }
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
        let cfg = self.config(rows, cols, keys)?;
        let op = Fwd { cfg };
        let (x, residual) = (x.contiguous()?, residual.contiguous()?);
        match bias {
            None => x.apply_op2(&residual, op),
            Some(b) => x.apply_op3(&residual, &b.contiguous()?, op),
        }
    }
}

/// The forward custom op: (x, residual) or (x, residual, bias).
#[derive(Clone, Copy, Debug)]
struct Fwd {
    cfg: Config,
}

fn fwd_cpu<T: Elem>(
    cfg: &Config,
    (sx, lx): (&CpuStorage, &Layout),
    (sr, lr): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = cpu_slice::<T>(FWD, "x", sx, lx)?;
    let r = cpu_slice::<T>(FWD, "residual", sr, lr)?;
    let b = bias
        .map(|(s, l)| cpu_slice::<T>(FWD, "bias", s, l))
        .transpose()?;
    let mut y = vec![T::default(); cfg.len()];
    let opts = cpu::ForwardOptions {
        bias: b,
        residual: Some(r),
        ..Default::default()
    };
    cpu::forward(cfg, x, &mut y, opts)?;
    Ok(cpu_out(y, lx.shape().clone()))
}

#[cfg(feature = "candle-cuda")]
fn fwd_cuda<T: Elem>(
    cfg: &Config,
    (sx, lx): (&candle_core::CudaStorage, &Layout),
    (sr, lr): (&candle_core::CudaStorage, &Layout),
    bias: Option<(&candle_core::CudaStorage, &Layout)>,
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use super::storage::{cuda_alloc, cuda_handle, cuda_view};
    let dev = &sx.device;
    let h = cuda_handle(dev)?;
    let x = cuda_view::<T>(FWD, "x", sx, lx)?;
    let r = cuda_view::<T>(FWD, "residual", sr, lr)?;
    let b = bias
        .map(|(s, l)| cuda_view::<T>(FWD, "bias", s, l))
        .transpose()?;
    // SAFETY: the out-of-place forward writes every element of y (a dropped element or row gets
    // the residual's bits).
    let mut y = unsafe { cuda_alloc::<T>(dev, cfg.len())? };
    let opts = crate::dropout::ForwardOptions {
        bias: b,
        residual: Some(r),
        ..Default::default()
    };
    crate::dropout::forward(&h, cfg, &x, &mut y.slice_mut(..cfg.len()), opts)?;
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(y, dev.clone()),
        lx.shape().clone(),
    ))
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
            fwd_cpu(&self.cfg, (s1, l1), (s2, l2), None)
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
            fwd_cuda(&self.cfg, (s1, l1), (s2, l2), None)
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        _residual: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, _) = backward(&self.cfg, x, dy, false)?;
        Ok((Some(dx), Some(dy.clone())))
    }
}

impl CustomOp3 for Fwd {
    fn name(&self) -> &'static str {
        FWD
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
            FWD,
            s1.dtype(),
            fwd_cpu(&self.cfg, (s1, l1), (s2, l2), Some((s3, l3)))
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
            FWD,
            s1.dtype(),
            fwd_cuda(&self.cfg, (s1, l1), (s2, l2), Some((s3, l3)))
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        _residual: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dbias) = backward(&self.cfg, x, dy, true)?;
        Ok((Some(dx), Some(dy.clone()), dbias))
    }
}

/// `(dx, dbias)` from one fused backward: the op writes dx and dbias into one `[rows + 1, cols]`
/// buffer (dbias last), split here with `narrow` (views, no copy).
fn backward(
    cfg: &Config,
    x: &Tensor,
    dy: &Tensor,
    dbias: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let out = dy
        .contiguous()?
        .apply_op1_no_bwd(&Bwd { cfg: *cfg, dbias })?;
    if !dbias {
        return Ok((out, None));
    }
    let rows = cfg.rows();
    let dx = out.narrow(0, 0, rows)?.reshape(x.shape())?;
    let db = out.narrow(0, rows, 1)?.reshape(cfg.cols())?;
    Ok((dx, Some(db)))
}

/// The backward custom op on dy: dx (dy's shape), or `[rows + 1, cols]` = dx then dbias. It has
/// no backward of its own (no second derivatives through this op).
#[derive(Clone, Copy, Debug)]
struct Bwd {
    cfg: Config,
    dbias: bool,
}

impl Bwd {
    /// Elements and shape of the output.
    fn out_shape(&self, dy: &Layout) -> candle_core::Result<(usize, Shape)> {
        let (n, cols) = (self.cfg.len(), self.cfg.cols());
        if !self.dbias {
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
    s: &CpuStorage,
    l: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let dy = cpu_slice::<T>(BWD, "dy", s, l)?;
    let (total, shape) = op.out_shape(l)?;
    let mut out = vec![T::default(); total];
    let (dx, db) = out.split_at_mut(op.cfg.len());
    let opts = cpu::BackwardOptions {
        dbias: op.dbias.then_some(db),
        ..Default::default()
    };
    cpu::backward(&op.cfg, dy, dx, opts)?;
    Ok(cpu_out(out, shape))
}

#[cfg(feature = "candle-cuda")]
fn bwd_cuda<T: Elem>(
    op: &Bwd,
    s: &candle_core::CudaStorage,
    l: &Layout,
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use super::storage::{cuda_alloc, cuda_handle, cuda_view};
    let dev = &s.device;
    let h = cuda_handle(dev)?;
    let dy = cuda_view::<T>(BWD, "dy", s, l)?;
    let (total, shape) = op.out_shape(l)?;
    let n = op.cfg.len();
    // SAFETY: the backward writes every dx element, and dbias (also when rows is 0: a memset).
    let mut out = unsafe { cuda_alloc::<T>(dev, total)? };
    {
        let (mut dx, mut db) = out.split_at_mut(n);
        let db = db.slice_mut(..total - n);
        let opts = crate::dropout::BackwardOptions {
            dbias: op.dbias.then_some(db),
            ..Default::default()
        };
        crate::dropout::backward(&h, &op.cfg, &dy, &mut dx, opts)?;
    }
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
        shape,
    ))
}

impl CustomOp1 for Bwd {
    fn name(&self) -> &'static str {
        BWD
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(BWD, s.dtype(), bwd_cpu(self, s, l))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(BWD, s.dtype(), bwd_cuda(self, s, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The custom ops refuse strided layouts (the public `forward` copies before reaching them).
    #[test]
    fn custom_op_refuses_non_contiguous() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?.t()?; // [6, 4], strided
        let r = Tensor::zeros((6, 4), DType::F32, &dev)?;
        let cfg = Config::new(6, 4, 0.1, 1, 2)?;
        let err = x.apply_op2_no_bwd(&r, &Fwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
        let bwd = Bwd { cfg, dbias: true };
        let err = x.apply_op1_no_bwd(&bwd).unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
        Ok(())
    }

    /// Storage of another dtype than the first argument's is refused by the op itself.
    #[test]
    fn custom_op_refuses_mixed_dtypes() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let r = Tensor::zeros((2, 3), DType::BF16, &dev)?;
        let cfg = Config::new(2, 3, 0.1, 1, 2)?;
        let err = x.apply_op2_no_bwd(&r, &Fwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        let x64 = Tensor::zeros((2, 3), DType::F64, &dev)?;
        let err = x64
            .apply_op1_no_bwd(&Bwd { cfg, dbias: false })
            .unwrap_err();
        assert!(err.to_string().contains("F64"), "{err}");
        Ok(())
    }
}
