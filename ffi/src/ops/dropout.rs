//! `fr_dropout_*`: `y = [residual +] rowscale · dropout(x + bias)`, plain or with a residual
//! (one ABI op; the library's `dropout`, with its optional residual, underneath).

use fusedreg::dropout::{self, Config};
use fusedreg::workspace::{self, WorkspaceView};
use fusedreg::{redundancy, Dtype, Handle};

use crate::tensor::{
    dispatch_float, host, host_mut, host_site, opt, req, Borrowed, Elem, FrTensor,
};
use crate::{boundary, FfiError, FfiResult, FrExec, FrOptions, FrStatus};

const OP: &str = "dropout";

fn config(o: &FrOptions) -> FfiResult<Config> {
    o.exact_only(OP)?;
    let (rows, cols) = o.shape(OP)?;
    let cfg = Config::new(rows, cols, o.p, o.seed, o.call)?;
    // mask_bits = 0: unset, the library resolves it for the dtype at the call.
    let mut cfg = o
        .resolution(OP, &[32, 16, 8])?
        .map_or(cfg, |r| cfg.with_resolution(r));
    if let Some(path) = o.drop_path(OP)? {
        cfg = cfg.with_drop_path(path);
    }
    Ok(cfg)
}

/// Forward on `[rows, cols]`: `y = rowscale · dropout(x + bias)`, plus `residual` when given
/// (`y` may be the residual itself: then it is updated in place). `bias` `[cols]` and
/// `rowscale` (f32 `[rows]`) are optional; with a drop path in the options the row scale is
/// drawn instead, and `rowscale_out` (optional, f32 `[rows]`) receives it. A dropped element
/// contributes exactly 0.
///
/// `stats` (optional, int64, 3 elements: one Block Influence site's `cos_sum`, `rows`,
/// `nonfinite`, zeroed by the caller to start; host memory on the CPU, device memory on the GPU)
/// accumulates `cos(residual, y)` of this call's rows, as `fr_dropout_add_norm_forward`'s does
/// (the library's `redundancy` module): the final residual add of a block. It needs a residual
/// (an error otherwise); every output bit is the same with or without it.
#[no_mangle]
pub unsafe extern "C" fn fr_dropout_forward(
    options: *const FrOptions,
    exec: FrExec,
    x: *const FrTensor,
    bias: *const FrTensor,
    residual: *const FrTensor,
    rowscale: *const FrTensor,
    y: *const FrTensor,
    rowscale_out: *const FrTensor,
    stats: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let t = Fwd {
            x: req(OP, "x", x)?,
            bias: opt(OP, "bias", bias)?,
            residual: opt(OP, "residual", residual)?,
            rowscale: opt(OP, "rowscale", rowscale)?,
            y: req(OP, "y", y)?,
            rowscale_out: opt(OP, "rowscale_out", rowscale_out)?,
            stats: opt(OP, "stats", stats)?,
        };
        if t.stats.is_some() && t.residual.is_none() {
            return Err(FfiError::invalid(format!(
                "{OP}: `stats` measures cos(residual, y) per row and needs a `residual`; pass \
                 one, or a null `stats`"
            )));
        }
        let cfg = config(o)?;
        let h = exec.handle()?;
        dispatch_float!(OP, "x", t.x.dtype, T => forward::<T>(&cfg, h.as_ref(), &t))
    })
}

/// Backward: `dx = keep · rowscale · scale · dy` with the mask regenerated from the options'
/// keys (the residual's gradient is `dy` itself: nothing to compute), and (optional) `dbias`,
/// the column sums of the unrounded `dx` in a fixed order. Pass the forward's `rowscale` (given
/// or drawn) when it had one.
///
/// `workspace` (optional, `FR_U8`): the device scratch of the dbias partials, at least
/// `fr_workspace_size(FR_OP_DROPOUT_BACKWARD)` bytes when `dbias` is given (none is needed
/// without); null allocates it stream-ordered per call.
#[no_mangle]
pub unsafe extern "C" fn fr_dropout_backward(
    options: *const FrOptions,
    exec: FrExec,
    dy: *const FrTensor,
    rowscale: *const FrTensor,
    dx: *const FrTensor,
    dbias: *const FrTensor,
    workspace: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let cfg = config(o)?;
        let t = Bwd {
            dy: req(OP, "dy", dy)?,
            rowscale: opt(OP, "rowscale", rowscale)?,
            dx: req(OP, "dx", dx)?,
            dbias: opt(OP, "dbias", dbias)?,
            workspace,
        };
        let h = exec.handle()?;
        dispatch_float!(OP, "dy", t.dy.dtype, T => backward::<T>(&cfg, h.as_ref(), &t))
    })
}

struct Fwd<'a> {
    x: &'a FrTensor,
    bias: Option<&'a FrTensor>,
    residual: Option<&'a FrTensor>,
    rowscale: Option<&'a FrTensor>,
    y: &'a FrTensor,
    rowscale_out: Option<&'a FrTensor>,
    stats: Option<&'a FrTensor>,
}

struct Bwd<'a> {
    dy: &'a FrTensor,
    rowscale: Option<&'a FrTensor>,
    dx: &'a FrTensor,
    dbias: Option<&'a FrTensor>,
    /// Checked in `backward` (its size depends on the dtype).
    workspace: *const FrTensor,
}

fn forward<T: Dtype + Elem>(cfg: &Config, h: Option<&Handle>, t: &Fwd<'_>) -> FfiResult {
    let inplace = t.residual.is_some_and(|r| r.data == t.y.data && r.len > 0);
    // SAFETY (every view below): the C contract, pointers valid for their lengths; the one
    // allowed alias (y = residual) is taken as a single mutable view.
    match h {
        None => unsafe {
            // The caller's words in a cell for the CPU reference's meter, written back after.
            let stats = t.stats.map(|w| host_site(OP, w)).transpose()?;
            let opts = dropout::cpu::ForwardOptions {
                bias: t.bias.map(|b| host::<T>(OP, "bias", b)).transpose()?,
                rowscale: t
                    .rowscale
                    .map(|b| host::<f32>(OP, "rowscale", b))
                    .transpose()?,
                mask_out: None,
                rowscale_out: t
                    .rowscale_out
                    .map(|b| host_mut::<f32>(OP, "rowscale_out", b))
                    .transpose()?,
                redundancy: stats
                    .as_ref()
                    .map(|(_, c)| redundancy::cpu::Site::of_cell(c)),
                ..Default::default()
            };
            let x = host::<T>(OP, "x", t.x)?;
            let y = host_mut::<T>(OP, "y", t.y)?;
            match t.residual {
                None => dropout::cpu::forward(cfg, x, y, opts)?,
                Some(_) if inplace => dropout::cpu::forward_inplace(cfg, x, y, opts)?,
                Some(r) => {
                    let residual = Some(host::<T>(OP, "residual", r)?);
                    let opts = dropout::cpu::ForwardOptions { residual, ..opts };
                    dropout::cpu::forward(cfg, x, y, opts)?
                }
            }
            if let Some((words, cell)) = stats {
                words.copy_from_slice(&cell.get().to_words());
            }
        },
        Some(h) => unsafe {
            let s = h.stream();
            let x = Borrowed::<T>::new(OP, "x", t.x, s)?;
            let bias = t
                .bias
                .map(|b| Borrowed::<T>::new(OP, "bias", b, s))
                .transpose()?;
            let rowscale = t
                .rowscale
                .map(|b| Borrowed::<f32>::new(OP, "rowscale", b, s))
                .transpose()?;
            let mut rs_out = t
                .rowscale_out
                .map(|b| Borrowed::<f32>::new(OP, "rowscale_out", b, s))
                .transpose()?;
            let mut y = Borrowed::<T>::new(OP, "y", t.y, s)?;
            let mut stats = t
                .stats
                .map(|w| Borrowed::<u64>::new(OP, "stats", w, s))
                .transpose()?;
            let opts = dropout::ForwardOptions {
                bias: bias.as_ref().map(|b| b.view()),
                rowscale: rowscale.as_ref().map(|b| b.view()),
                mask_out: None,
                rowscale_out: rs_out.as_mut().map(|b| b.view_mut()),
                redundancy: stats
                    .as_mut()
                    .map(|w| redundancy::Site::from_words(w.view_mut()))
                    .transpose()?,
                ..Default::default()
            };
            match t.residual {
                None => dropout::forward(h, cfg, x.slice(), y.slice_mut(), opts)?,
                Some(_) if inplace => {
                    dropout::forward_inplace(h, cfg, x.slice(), y.slice_mut(), opts)?
                }
                Some(r) => {
                    let r = Borrowed::<T>::new(OP, "residual", r, s)?;
                    let opts = dropout::ForwardOptions {
                        residual: Some(r.view()),
                        ..opts
                    };
                    dropout::forward(h, cfg, x.slice(), y.slice_mut(), opts)?
                }
            }
        },
    }
    Ok(())
}

fn backward<T: Dtype + Elem>(cfg: &Config, h: Option<&Handle>, t: &Bwd<'_>) -> FfiResult {
    let need =
        workspace::dropout_backward_size(cfg.rows(), cfg.cols(), T::KIND, t.dbias.is_some())?;
    let ws = crate::workspace::arg(OP, t.workspace, need)?;
    // SAFETY: as in `forward`; outputs are distinct from the inputs.
    match h {
        None => unsafe {
            let opts = dropout::cpu::BackwardOptions {
                rowscale: t
                    .rowscale
                    .map(|b| host::<f32>(OP, "rowscale", b))
                    .transpose()?,
                mask: None,
                dbias: t.dbias.map(|b| host_mut::<T>(OP, "dbias", b)).transpose()?,
            };
            dropout::cpu::backward(
                cfg,
                host::<T>(OP, "dy", t.dy)?,
                host_mut::<T>(OP, "dx", t.dx)?,
                opts,
            )?;
        },
        Some(h) => unsafe {
            let s = h.stream();
            let dy = Borrowed::<T>::new(OP, "dy", t.dy, s)?;
            let rowscale = t
                .rowscale
                .map(|b| Borrowed::<f32>::new(OP, "rowscale", b, s))
                .transpose()?;
            let mut dx = Borrowed::<T>::new(OP, "dx", t.dx, s)?;
            let mut dbias = t
                .dbias
                .map(|b| Borrowed::<T>::new(OP, "dbias", b, s))
                .transpose()?;
            let mut ws = ws
                .map(|w| Borrowed::<u8>::new(OP, "workspace", w, s))
                .transpose()?;
            let opts = dropout::BackwardOptions {
                rowscale: rowscale.as_ref().map(|b| b.view()),
                mask: None,
                dbias: dbias.as_mut().map(|b| b.view_mut()),
                workspace_view: ws.as_mut().map(|w| WorkspaceView::new(w.view_mut())),
                ..Default::default()
            };
            dropout::backward(h, cfg, dy.slice(), dx.slice_mut(), opts)?;
        },
    }
    Ok(())
}
