//! `fr_dropout_add_norm_*`: `s = residual + rowscale · dropout(x + bias)`,
//! `out = norm(s) · layer_scale` (LayerNorm or RMSNorm), the entry of a pre-norm block.

use fusedreg::dropout_add_norm::{self as dan, cpu, Config, Norm};
use fusedreg::{redundancy, Dtype, Handle};

use crate::tensor::{
    dispatch_float, host, host_mut, host_site, opt, req, Borrowed, Elem, FrTensor, FR_F32,
};
use crate::{
    boundary, FfiError, FfiResult, FrExec, FrOptions, FrStatus, FR_NORM_LAYER, FR_NORM_RMS,
};

const OP: &str = "dropout_add_norm";

fn config(o: &FrOptions) -> FfiResult<Config> {
    o.exact_only(OP)?;
    let resolution = o.resolution(OP, &[32, 16, 8])?;
    let (rows, cols) = o.shape(OP)?;
    let norm = match o.norm {
        FR_NORM_LAYER => Norm::LayerNorm,
        FR_NORM_RMS => Norm::RmsNorm,
        n => {
            return Err(FfiError::invalid(format!(
                "{OP}: norm = {n}; use 0 (LayerNorm) or 1 (RMSNorm)"
            )))
        }
    };
    let cfg = Config::new(rows, cols, norm, o.eps)?;
    // mask_bits = 0: unset, the library resolves it for the dtype at the call.
    let mut cfg = resolution
        .map_or(cfg, |r| cfg.with_resolution(r))
        .with_dropout(o.p, o.seed, o.call)?
        .with_layer_scale(o.layer_scale)?;
    if let Some(path) = o.drop_path(OP)? {
        cfg = cfg.with_drop_path(path);
    }
    Ok(cfg)
}

/// Forward. Inputs: `x` `[rows, cols]`, `residual` (optional, the stream's dtype), `gamma`
/// `[cols]`, `beta` / `bias` (optional, `[cols]`), `rowscale` (optional f32 `[rows]`; with a
/// drop path in the options it is generated instead). Outputs: `out` (x's dtype), `s` (the new
/// residual stream: x's dtype or float32), `mean` and `rstd` (f32 `[rows]`, kept for the
/// backward). `s` may be the residual itself (in place). `stats` (optional, int64, 3 elements:
/// one Block Influence site's `cos_sum`, `rows`, `nonfinite`, zeroed by the caller to start; host
/// memory on the CPU, device memory on the GPU) accumulates this call's rows (see the library's
/// `redundancy` module); it needs a residual for a meaningful BI.
#[no_mangle]
pub unsafe extern "C" fn fr_dropout_add_norm_forward(
    options: *const FrOptions,
    exec: FrExec,
    x: *const FrTensor,
    residual: *const FrTensor,
    gamma: *const FrTensor,
    beta: *const FrTensor,
    bias: *const FrTensor,
    rowscale: *const FrTensor,
    out: *const FrTensor,
    s: *const FrTensor,
    mean: *const FrTensor,
    rstd: *const FrTensor,
    stats: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let cfg = config(o)?;
        let t = Fwd {
            x: req(OP, "x", x)?,
            residual: opt(OP, "residual", residual)?,
            gamma: req(OP, "gamma", gamma)?,
            beta: opt(OP, "beta", beta)?,
            bias: opt(OP, "bias", bias)?,
            rowscale: opt(OP, "rowscale", rowscale)?,
            out: req(OP, "out", out)?,
            s: req(OP, "s", s)?,
            mean: req(OP, "mean", mean)?,
            rstd: req(OP, "rstd", rstd)?,
            stats: opt(OP, "stats", stats)?,
        };
        let h = exec.handle()?;
        let sd = t.s.dtype;
        dispatch_float!(OP, "x", t.x.dtype, T => {
            if sd == T::CODE {
                forward::<T, T>(&cfg, h.as_ref(), &t)
            } else if sd == FR_F32 {
                forward::<T, f32>(&cfg, h.as_ref(), &t)
            } else {
                Err(stream_dtype_error(sd, T::CODE))
            }
        })
    })
}

/// Backward from `d_out` and (optional) `d_s`, the gradient reaching the new stream directly.
/// Reads `s`, `gamma`, `mean`, `rstd` (and `rowscale` when the forward had one) and regenerates
/// the mask from the options' keys. Outputs: `dx`, `d_residual` (optional), `dgamma`, `dbeta`
/// and `dbias` (optional), column sums in a fixed order.
///
/// `workspace` (optional, `FR_U8`): the device scratch of the column partials, at least
/// `fr_workspace_size(FR_OP_DROPOUT_ADD_NORM_BACKWARD)` bytes; null allocates it stream-ordered
/// per call.
#[no_mangle]
pub unsafe extern "C" fn fr_dropout_add_norm_backward(
    options: *const FrOptions,
    exec: FrExec,
    d_out: *const FrTensor,
    d_s: *const FrTensor,
    s: *const FrTensor,
    gamma: *const FrTensor,
    mean: *const FrTensor,
    rstd: *const FrTensor,
    rowscale: *const FrTensor,
    dx: *const FrTensor,
    d_residual: *const FrTensor,
    dgamma: *const FrTensor,
    dbeta: *const FrTensor,
    dbias: *const FrTensor,
    workspace: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let cfg = config(o)?;
        let need = fusedreg::workspace::dropout_add_norm_backward_size(cfg.rows(), cfg.cols())?;
        let t = Bwd {
            d_out: req(OP, "d_out", d_out)?,
            d_s: opt(OP, "d_s", d_s)?,
            s: req(OP, "s", s)?,
            gamma: req(OP, "gamma", gamma)?,
            mean: req(OP, "mean", mean)?,
            rstd: req(OP, "rstd", rstd)?,
            rowscale: opt(OP, "rowscale", rowscale)?,
            dx: req(OP, "dx", dx)?,
            d_residual: opt(OP, "d_residual", d_residual)?,
            dgamma: req(OP, "dgamma", dgamma)?,
            dbeta: opt(OP, "dbeta", dbeta)?,
            dbias: opt(OP, "dbias", dbias)?,
            workspace: crate::workspace::arg(OP, workspace, need)?,
        };
        let h = exec.handle()?;
        let sd = t.s.dtype;
        dispatch_float!(OP, "d_out", t.d_out.dtype, T => {
            if sd == T::CODE {
                backward::<T, T>(&cfg, h.as_ref(), &t)
            } else if sd == FR_F32 {
                backward::<T, f32>(&cfg, h.as_ref(), &t)
            } else {
                Err(stream_dtype_error(sd, T::CODE))
            }
        })
    })
}

fn stream_dtype_error(got: i32, x: i32) -> FfiError {
    FfiError::invalid(format!(
        "{OP}: the residual stream `s` has dtype {}; it must be x's dtype ({}) or float32",
        crate::tensor::dtype_name(got),
        crate::tensor::dtype_name(x)
    ))
}

struct Fwd<'a> {
    x: &'a FrTensor,
    residual: Option<&'a FrTensor>,
    gamma: &'a FrTensor,
    beta: Option<&'a FrTensor>,
    bias: Option<&'a FrTensor>,
    rowscale: Option<&'a FrTensor>,
    out: &'a FrTensor,
    s: &'a FrTensor,
    mean: &'a FrTensor,
    rstd: &'a FrTensor,
    stats: Option<&'a FrTensor>,
}

struct Bwd<'a> {
    d_out: &'a FrTensor,
    d_s: Option<&'a FrTensor>,
    s: &'a FrTensor,
    gamma: &'a FrTensor,
    mean: &'a FrTensor,
    rstd: &'a FrTensor,
    rowscale: Option<&'a FrTensor>,
    dx: &'a FrTensor,
    d_residual: Option<&'a FrTensor>,
    dgamma: &'a FrTensor,
    dbeta: Option<&'a FrTensor>,
    dbias: Option<&'a FrTensor>,
    workspace: Option<&'a FrTensor>,
}

/// In place: the new stream is written over the residual.
fn in_place(t: &Fwd<'_>) -> bool {
    t.residual.is_some_and(|r| r.data == t.s.data && r.len > 0)
}

fn forward<T: Dtype + Elem, S: Dtype + Elem>(
    cfg: &Config,
    h: Option<&Handle>,
    t: &Fwd<'_>,
) -> FfiResult {
    let inplace = in_place(t);
    // SAFETY (every view below): the C contract, pointers valid for their lengths; the only
    // allowed alias (s = residual) is taken as one mutable view.
    match h {
        None => unsafe {
            // The caller's words in a cell for the CPU reference's meter, written back after.
            let stats = t.stats.map(|w| host_site(OP, w)).transpose()?;
            let args = cpu::ForwardArgs {
                x: host::<T>(OP, "x", t.x)?,
                residual: match t.residual {
                    Some(r) if !inplace => Some(host::<S>(OP, "residual", r)?),
                    _ => None,
                },
                gamma: host::<T>(OP, "gamma", t.gamma)?,
                beta: t.beta.map(|b| host::<T>(OP, "beta", b)).transpose()?,
                bias: t.bias.map(|b| host::<T>(OP, "bias", b)).transpose()?,
                rowscale: t
                    .rowscale
                    .map(|b| host::<f32>(OP, "rowscale", b))
                    .transpose()?,
                redundancy: stats
                    .as_ref()
                    .map(|(_, c)| redundancy::cpu::Site::of_cell(c)),
            };
            let out = cpu::ForwardOut {
                out: host_mut::<T>(OP, "out", t.out)?,
                s: host_mut::<S>(OP, "s", t.s)?,
                mean: host_mut::<f32>(OP, "mean", t.mean)?,
                rstd: host_mut::<f32>(OP, "rstd", t.rstd)?,
            };
            if inplace {
                cpu::forward_inplace(cfg, args, out)?;
            } else {
                cpu::forward(cfg, args, out)?;
            }
            if let Some((words, cell)) = stats {
                words.copy_from_slice(&cell.get().to_words());
            }
        },
        Some(h) => unsafe {
            let st = h.stream();
            let x = Borrowed::<T>::new(OP, "x", t.x, st)?;
            let residual = match t.residual {
                Some(r) if !inplace => Some(Borrowed::<S>::new(OP, "residual", r, st)?),
                _ => None,
            };
            let gamma = Borrowed::<T>::new(OP, "gamma", t.gamma, st)?;
            let beta = t
                .beta
                .map(|b| Borrowed::<T>::new(OP, "beta", b, st))
                .transpose()?;
            let bias = t
                .bias
                .map(|b| Borrowed::<T>::new(OP, "bias", b, st))
                .transpose()?;
            let rowscale = t
                .rowscale
                .map(|b| Borrowed::<f32>::new(OP, "rowscale", b, st))
                .transpose()?;
            let mut out = Borrowed::<T>::new(OP, "out", t.out, st)?;
            let mut s = Borrowed::<S>::new(OP, "s", t.s, st)?;
            let mut mean = Borrowed::<f32>::new(OP, "mean", t.mean, st)?;
            let mut rstd = Borrowed::<f32>::new(OP, "rstd", t.rstd, st)?;
            let mut stats = t
                .stats
                .map(|w| Borrowed::<u64>::new(OP, "stats", w, st))
                .transpose()?;
            let mut args = dan::ForwardArgs::new(x.view(), gamma.view());
            args.residual = residual.as_ref().map(|r| r.view());
            args.beta = beta.as_ref().map(|b| b.view());
            args.bias = bias.as_ref().map(|b| b.view());
            args.rowscale = rowscale.as_ref().map(|b| b.view());
            args.redundancy = stats
                .as_mut()
                .map(|w| redundancy::Site::from_words(w.view_mut()))
                .transpose()?;
            let o = dan::ForwardOut {
                out: out.view_mut(),
                s: s.view_mut(),
                mean: mean.view_mut(),
                rstd: rstd.view_mut(),
            };
            if inplace {
                dan::forward_inplace(h, cfg, args, o)?;
            } else {
                dan::forward(h, cfg, args, o)?;
            }
        },
    }
    Ok(())
}

fn backward<T: Dtype + Elem, S: Dtype + Elem>(
    cfg: &Config,
    h: Option<&Handle>,
    t: &Bwd<'_>,
) -> FfiResult {
    // SAFETY: as in `forward`; outputs are distinct from the inputs.
    match h {
        None => unsafe {
            let mut args = cpu::BackwardArgs::new(
                host::<T>(OP, "d_out", t.d_out)?,
                host::<S>(OP, "s", t.s)?,
                host::<T>(OP, "gamma", t.gamma)?,
                host::<f32>(OP, "mean", t.mean)?,
                host::<f32>(OP, "rstd", t.rstd)?,
            );
            args.d_s = t.d_s.map(|b| host::<S>(OP, "d_s", b)).transpose()?;
            args.rowscale = t
                .rowscale
                .map(|b| host::<f32>(OP, "rowscale", b))
                .transpose()?;
            let mut out = cpu::BackwardOut::new(
                host_mut::<T>(OP, "dx", t.dx)?,
                host_mut::<T>(OP, "dgamma", t.dgamma)?,
            );
            out.d_residual = t
                .d_residual
                .map(|b| host_mut::<S>(OP, "d_residual", b))
                .transpose()?;
            out.dbeta = t.dbeta.map(|b| host_mut::<T>(OP, "dbeta", b)).transpose()?;
            out.dbias = t.dbias.map(|b| host_mut::<T>(OP, "dbias", b)).transpose()?;
            cpu::backward(cfg, args, out)?;
        },
        Some(h) => unsafe {
            let st = h.stream();
            let d_out = Borrowed::<T>::new(OP, "d_out", t.d_out, st)?;
            let d_s = t
                .d_s
                .map(|b| Borrowed::<S>::new(OP, "d_s", b, st))
                .transpose()?;
            let s = Borrowed::<S>::new(OP, "s", t.s, st)?;
            let gamma = Borrowed::<T>::new(OP, "gamma", t.gamma, st)?;
            let mean = Borrowed::<f32>::new(OP, "mean", t.mean, st)?;
            let rstd = Borrowed::<f32>::new(OP, "rstd", t.rstd, st)?;
            let rowscale = t
                .rowscale
                .map(|b| Borrowed::<f32>::new(OP, "rowscale", b, st))
                .transpose()?;
            let mut dx = Borrowed::<T>::new(OP, "dx", t.dx, st)?;
            let mut d_residual = t
                .d_residual
                .map(|b| Borrowed::<S>::new(OP, "d_residual", b, st))
                .transpose()?;
            let mut dgamma = Borrowed::<T>::new(OP, "dgamma", t.dgamma, st)?;
            let mut dbeta = t
                .dbeta
                .map(|b| Borrowed::<T>::new(OP, "dbeta", b, st))
                .transpose()?;
            let mut dbias = t
                .dbias
                .map(|b| Borrowed::<T>::new(OP, "dbias", b, st))
                .transpose()?;
            let mut args = dan::BackwardArgs::new(
                d_out.view(),
                s.view(),
                gamma.view(),
                mean.view(),
                rstd.view(),
            );
            args.d_s = d_s.as_ref().map(|b| b.view());
            args.rowscale = rowscale.as_ref().map(|b| b.view());
            let mut ws = t
                .workspace
                .map(|w| Borrowed::<u8>::new(OP, "workspace", w, st))
                .transpose()?;
            args.workspace_view = ws
                .as_mut()
                .map(|w| fusedreg::workspace::WorkspaceView::new(w.view_mut()));
            let mut out = dan::BackwardOut::new(dx.view_mut(), dgamma.view_mut());
            out.d_residual = d_residual.as_mut().map(|b| b.view_mut());
            out.dbeta = dbeta.as_mut().map(|b| b.view_mut());
            out.dbias = dbias.as_mut().map(|b| b.view_mut());
            dan::backward(h, cfg, args, out)?;
        },
    }
    Ok(())
}
