//! `fr_cross_entropy_*`: label-smoothed cross-entropy with ignore index, z-loss and reductions.

use fusedreg::cross_entropy::{self as xe, Config, Reduction, TargetIndex};
use fusedreg::workspace::WorkspaceView;
use fusedreg::{Dtype, Handle};

use crate::tensor::{
    dispatch_float, host, host_mut, opt, req, Borrowed, Elem, FrTensor, FR_I32, FR_I64,
};
use crate::workspace::{cross_entropy_layout, part, XeLayout};
use crate::{boundary, FfiError, FfiResult, FrExec, FrOptions, FrStatus};
use crate::{FR_REDUCTION_MEAN, FR_REDUCTION_NONE, FR_REDUCTION_SUM};

const OP: &str = "cross_entropy";

/// The library's config of a call (`FR_MATH_DEFAULT`: the library's default, Fast). The op has
/// no mask: `mask_bits` other than 0 (the default) or 32 is refused as a likely mistake.
pub(crate) fn config(o: &FrOptions) -> FfiResult<Config> {
    o.resolution(OP, &[32])?;
    let (rows, vocab) = o.shape(OP)?;
    let reduction = match o.reduction {
        FR_REDUCTION_NONE => Reduction::None,
        FR_REDUCTION_SUM => Reduction::Sum,
        FR_REDUCTION_MEAN => Reduction::Mean,
        r => {
            return Err(FfiError::invalid(format!(
                "{OP}: reduction = {r}; use 0 (none), 1 (sum) or 2 (mean)"
            )))
        }
    };
    let cfg = Config::new(rows, vocab)?
        .label_smoothing(o.label_smoothing)?
        .ignore_index(o.ignore_index)
        .z_loss(o.z_loss)?
        .reduction(reduction);
    Ok(match o.math(OP)? {
        Some(m) => cfg.with_math(m),
        None => cfg,
    })
}

/// The tensors of one call.
struct Args<'a> {
    logits: &'a FrTensor,
    targets: &'a FrTensor,
    loss: Option<&'a FrTensor>,
    upstream: Option<&'a FrTensor>,
    grad: Option<&'a FrTensor>,
    invalid_target: Option<&'a FrTensor>,
    workspace: *const FrTensor,
}

/// The loss: `rows` f32 with reduction none, one f32 otherwise. CPU: a target outside
/// `[0, cols)` that is not `ignore_index` is an error. GPU: such a row counts as ignored and, when
/// `invalid_target` (one int32, never cleared) is given, ORs 1 into it; nothing waits for the
/// device.
///
/// `workspace` (optional, `FR_U8`): the device scratch of the reductions, at least
/// `fr_workspace_size(FR_OP_CROSS_ENTROPY)` bytes; null allocates it stream-ordered per call.
#[no_mangle]
pub unsafe extern "C" fn fr_cross_entropy_forward(
    options: *const FrOptions,
    exec: FrExec,
    logits: *const FrTensor,
    targets: *const FrTensor,
    loss: *const FrTensor,
    invalid_target: *const FrTensor,
    workspace: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let a = Args {
            logits: req(OP, "logits", logits)?,
            targets: req(OP, "targets", targets)?,
            loss: Some(req(OP, "loss", loss)?),
            upstream: None,
            grad: None,
            invalid_target: opt(OP, "invalid_target", invalid_target)?,
            workspace,
        };
        run(o, exec, &a)
    })
}

/// The gradient of the loss with respect to the logits into `grad` (`rows * cols`, the logits'
/// dtype; `grad` may be the logits themselves: then it is written in place). `upstream`
/// (optional, `rows` f32, reduction none only) scales each row's gradient; fold a mean's or a
/// sum's upstream gradient into it (`upstream[r] = d_loss / n_valid` with reduction none) to get
/// the gradient in one pass. `loss` is optional (null: computed into scratch and dropped).
///
/// `workspace` (optional, `FR_U8`): the device scratch of the reductions and of a null `loss`,
/// at least `fr_workspace_size(FR_OP_CROSS_ENTROPY)` bytes; null allocates them stream-ordered
/// per call.
#[no_mangle]
pub unsafe extern "C" fn fr_cross_entropy_backward(
    options: *const FrOptions,
    exec: FrExec,
    logits: *const FrTensor,
    targets: *const FrTensor,
    upstream: *const FrTensor,
    grad: *const FrTensor,
    loss: *const FrTensor,
    invalid_target: *const FrTensor,
    workspace: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let a = Args {
            logits: req(OP, "logits", logits)?,
            targets: req(OP, "targets", targets)?,
            loss: opt(OP, "loss", loss)?,
            upstream: opt(OP, "upstream", upstream)?,
            grad: Some(req(OP, "grad", grad)?),
            invalid_target: opt(OP, "invalid_target", invalid_target)?,
            workspace,
        };
        run(o, exec, &a)
    })
}

fn run(o: &FrOptions, exec: FrExec, a: &Args<'_>) -> FfiResult {
    let cfg = config(o)?;
    let layout = cross_entropy_layout(cfg.rows(), cfg.vocab(), cfg.get_reduction())?;
    // Checked on the CPU too (unused there), so a bad workspace fails the same way everywhere.
    let ws = crate::workspace::arg(OP, a.workspace, layout.total)?;
    let h = exec.handle()?;
    match a.targets.dtype {
        FR_I32 => dispatch_float!(OP, "logits", a.logits.dtype, T => {
            typed::<T, i32>(&cfg, h.as_ref(), a, ws, &layout)
        }),
        FR_I64 => dispatch_float!(OP, "logits", a.logits.dtype, T => {
            typed::<T, i64>(&cfg, h.as_ref(), a, ws, &layout)
        }),
        d => Err(FfiError::invalid(format!(
            "{OP}: targets have dtype {}; use int32 or int64",
            crate::tensor::dtype_name(d)
        ))),
    }
}

fn typed<T: Dtype + Elem, I: TargetIndex + Elem>(
    cfg: &Config,
    h: Option<&Handle>,
    a: &Args<'_>,
    ws: Option<&FrTensor>,
    layout: &XeLayout,
) -> FfiResult {
    match h {
        None => cpu::<T, I>(cfg, a),
        Some(h) => gpu::<T, I>(cfg, h, a, ws, layout),
    }
}

fn in_place(a: &Args<'_>) -> bool {
    a.grad.is_some_and(|g| g.data == a.logits.data && g.len > 0)
}

fn cpu<T: Dtype + Elem, I: TargetIndex + Elem>(cfg: &Config, a: &Args<'_>) -> FfiResult {
    // SAFETY (every host view below): the C contract, host pointers valid for their lengths;
    // `grad` aliases `logits` only in the in-place branch, which takes one mutable view.
    let targets = unsafe { host::<I>(OP, "targets", a.targets)? };
    let upstream = match a.upstream {
        Some(u) => Some(unsafe { host::<f32>(OP, "upstream", u)? }),
        None => None,
    };
    let loss = match a.grad {
        None => xe::cpu::forward(cfg, unsafe { host::<T>(OP, "logits", a.logits)? }, targets)?,
        Some(_) if in_place(a) => xe::cpu::forward_backward_inplace(
            cfg,
            unsafe { host_mut::<T>(OP, "logits", a.logits)? },
            targets,
            upstream,
        )?,
        Some(g) => xe::cpu::forward_backward(
            cfg,
            unsafe { host::<T>(OP, "logits", a.logits)? },
            targets,
            upstream,
            unsafe { host_mut::<T>(OP, "grad", g)? },
        )?,
    };
    if let Some(l) = a.loss {
        let out = unsafe { host_mut::<f32>(OP, "loss", l)? };
        let values = match loss.reduced {
            Some(r) => vec![r],
            None => loss.rows,
        };
        if out.len() != values.len() {
            return Err(fusedreg::Error::shape(
                OP,
                format!("loss has {} elements, expected {}", out.len(), values.len()),
            )
            .into());
        }
        out.copy_from_slice(&values);
    }
    Ok(())
}

fn gpu<T: Dtype + Elem, I: TargetIndex + Elem>(
    cfg: &Config,
    h: &Handle,
    a: &Args<'_>,
    ws: Option<&FrTensor>,
    layout: &XeLayout,
) -> FfiResult {
    let s = h.stream();
    // SAFETY (every borrowed buffer below): the C contract, device pointers of this context
    // valid for their lengths until the launched work has run.
    let mut logits = unsafe { Borrowed::<T>::new(OP, "logits", a.logits, s)? };
    let targets = unsafe { Borrowed::<I>::new(OP, "targets", a.targets, s)? };
    let upstream = match a.upstream {
        Some(u) => Some(unsafe { Borrowed::<f32>::new(OP, "upstream", u, s)? }),
        None => None,
    };
    let mut flag = match a.invalid_target {
        Some(f) => Some(unsafe { Borrowed::<u32>::new(OP, "invalid_target", f, s)? }),
        None => None,
    };
    let mut loss_borrowed;
    let mut loss_scratch;
    let loss_len = cfg.get_reduction().loss_len(cfg.rows());
    // The library's part of the workspace, and the rest for a loss nobody asked for.
    let mut library = match ws {
        Some(w) => Some(unsafe { part::<u8>(OP, w, 0, layout.loss_offset, s)? }),
        None => None,
    };
    let loss = match (a.loss, ws) {
        (Some(l), _) => {
            loss_borrowed = unsafe { Borrowed::<f32>::new(OP, "loss", l, s)? };
            loss_borrowed.view_mut()
        }
        (None, Some(w)) if loss_len > 0 => {
            loss_borrowed = unsafe { part::<f32>(OP, w, layout.loss_offset, loss_len, s)? };
            loss_borrowed.view_mut()
        }
        (None, _) => {
            // Scratch for a loss nobody asked for, freed stream-ordered after the launch.
            let n = cfg.get_reduction().loss_len(cfg.rows()).max(1);
            // SAFETY: written by the kernel before anything reads it; never read by us.
            loss_scratch = unsafe { s.alloc::<f32>(n) }.map_err(fusedreg::Error::driver(OP))?;
            loss_scratch.slice_mut(..cfg.get_reduction().loss_len(cfg.rows()))
        }
    };
    let out = xe::Outputs {
        loss,
        upstream: upstream.as_ref().map(|u| u.view()),
        invalid_target: flag.as_mut().map(|f| f.view_mut()),
        workspace: None,
        workspace_view: library.as_mut().map(|w| WorkspaceView::new(w.view_mut())),
    };
    match a.grad {
        None => xe::forward(h, cfg, logits.slice(), targets.slice(), out)?,
        Some(_) if in_place(a) => {
            xe::forward_backward_inplace(h, cfg, logits.slice_mut(), targets.slice(), out)?
        }
        Some(g) => {
            let mut grad = unsafe { Borrowed::<T>::new(OP, "grad", g, s)? };
            xe::forward_backward(
                h,
                cfg,
                logits.slice(),
                targets.slice(),
                grad.slice_mut(),
                out,
            )?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fr_options_default, FR_MATH_DEFAULT, FR_MATH_EXACT, FR_MATH_FAST};
    use fusedreg::Math;

    #[test]
    fn math_option_reaches_the_config() {
        let cfg = |math| {
            let o = FrOptions {
                rows: 2,
                cols: 8,
                math,
                ..fr_options_default()
            };
            config(&o).map(|c| c.math())
        };
        assert_eq!(cfg(FR_MATH_DEFAULT).unwrap(), Math::Fast); // the library's default
        assert_eq!(cfg(FR_MATH_EXACT).unwrap(), Math::Exact);
        assert_eq!(cfg(FR_MATH_FAST).unwrap(), Math::Fast);
        assert!(cfg(7).is_err());
    }
}
