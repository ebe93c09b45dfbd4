//! [`Dropout`]: `y = rowscale * dropout(x + bias)` on candle tensors, with autograd, through
//! [`crate::dropout`].

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::storage::{check_tensor, cpu_out, cpu_slice, dispatch, rows_cols, Elem};
use super::{check_site, wrap, StepKeys};
use crate::dropout::{cpu, Config, DropPath};
use crate::dropping::DropRate;
use crate::error::Error;

const OP: &str = "candle::Dropout";
const FWD: &str = "fusedreg-dropout";
const BWD: &str = "fusedreg-dropout-bwd";

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
/// dtype.
///
/// # Examples
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use fusedreg::candle::{Dropout, StepKeys};
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
///     let want = if cfg.keeps(i as u64) { xv[i] * cfg.rate().scale() } else { 0.0 };
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
    rate: DropRate,
    site: u32,
    /// (rate, rows per sample); None when there is no drop path or its rate is 0.
    drop_path: Option<(DropRate, usize)>,
}

impl Dropout {
    /// A site dropping elements with probability `p` (in `[0, 1]`), numbered `site`
    /// (`< 2^24`, unique among the model's dropout sites).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::Dropout;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = Dropout::new(0.1, 0)?;
    /// assert_eq!((site.p(), site.site(), site.drop_path()), (0.1, 0, None));
    /// assert!(Dropout::new(1.5, 0).is_err());
    /// assert!(Dropout::new(f64::NAN, 0).is_err());
    /// assert!(Dropout::new(0.1, 1 << 24).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(p: f64, site: u32) -> candle_core::Result<Self> {
        check_site(site)?;
        let rate = DropRate::new(p)?;
        Ok(Dropout {
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
    /// use fusedreg::candle::Dropout;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = Dropout::new(0.1, 0)?.with_drop_path(0.2, 128)?;
    /// assert_eq!(site.drop_path(), Some((0.2, 128)));
    /// assert_eq!(Dropout::new(0.1, 0)?.with_drop_path(0.0, 128)?.drop_path(), None);
    /// assert!(Dropout::new(0.1, 0)?.with_drop_path(0.2, 0).is_err());
    /// assert!(Dropout::new(0.1, 0)?.with_drop_path(-0.2, 1).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_drop_path(self, p_path: f64, rows_per_sample: usize) -> candle_core::Result<Self> {
        // Validates both through the op's own checks.
        let path = DropPath::new(p_path, 0).and_then(|p| p.per_sample(rows_per_sample))?;
        Ok(Dropout {
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
    /// assert_eq!(fusedreg::candle::Dropout::new(0.25, 1)?.p(), 0.25);
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
    /// assert_eq!(fusedreg::candle::Dropout::new(0.25, 9)?.site(), 9);
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
    /// use fusedreg::candle::Dropout;
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(Dropout::new(0.1, 0)?.with_drop_path(0.5, 4)?.drop_path(), Some((0.5, 4)));
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
    /// use fusedreg::candle::{Dropout, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let keys = StepKeys::new(42, 3);
    /// let cfg = Dropout::new(0.1, 7)?.with_drop_path(0.2, 4)?.config(8, 16, Some(&keys))?;
    /// assert_eq!((cfg.seed(), cfg.call()), (42, keys.call(7, 0)?));
    /// assert_eq!(cfg.drop_path().unwrap().call(), keys.call(7, 1)?);
    /// let eval = Dropout::new(0.1, 7)?.config(8, 16, None)?;
    /// assert_eq!(eval.rate().p(), 0.0);
    /// assert!(eval.drop_path().is_none());
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
        if keys.is_none() && bias.is_none() {
            // Evaluation without a bias is the identity: no pass over the data at all.
            return Ok(x.clone());
        }
        let cfg = self.config(rows, cols, keys)?;
        let op = Fwd { cfg };
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
    let opts = cpu::ForwardOptions {
        bias: b,
        ..Default::default()
    };
    cpu::forward(cfg, x, &mut y, opts)?;
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
    // SAFETY: the forward writes every element of y (a dropped element or row gets +0).
    let mut y = unsafe { cuda_alloc::<T>(dev, cfg.len())? };
    let opts = crate::dropout::ForwardOptions {
        bias: b,
        ..Default::default()
    };
    crate::dropout::forward(&h, cfg, &x, &mut y.slice_mut(..cfg.len()), opts)?;
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
        let (dx, _) = backward(&self.cfg, x, dy, false)?;
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
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dbias) = backward(&self.cfg, x, dy, true)?;
        Ok((Some(dx), dbias))
    }
}

/// `(dx, dbias)` from one fused backward: the op writes dx and dbias into one `[rows + 1, cols]`
/// buffer (dbias last), split here with `narrow` (views, no copy). The mask is regenerated from
/// the config's keys; nothing was stored by the forward.
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
        let cfg = Config::new(6, 4, 0.1, 1, 2)?;
        let err = x.apply_op1_no_bwd(&Fwd { cfg }).unwrap_err();
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
        let b = Tensor::zeros(3, DType::BF16, &dev)?;
        let cfg = Config::new(2, 3, 0.1, 1, 2)?;
        let err = x.apply_op2_no_bwd(&b, &Fwd { cfg }).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        let x64 = Tensor::zeros((2, 3), DType::F64, &dev)?;
        let err = x64
            .apply_op1_no_bwd(&Bwd { cfg, dbias: false })
            .unwrap_err();
        assert!(err.to_string().contains("F64"), "{err}");
        Ok(())
    }
}
