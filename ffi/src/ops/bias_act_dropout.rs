//! `fr_bias_act_dropout_*`: `y = dropout(act(x + bias))`, the feed-forward site.

use fusedreg::bias_act_dropout::{self as bad, Activation, Config, Preact};
use fusedreg::workspace::{self, WorkspaceView};
use fusedreg::{Dtype, Handle};

use crate::tensor::{dispatch_float, host, host_mut, opt, req, Borrowed, Elem, FrTensor};
use crate::{boundary, FfiError, FfiResult, FrExec, FrOptions, FrStatus};
use crate::{FR_ACT_GELU_ERF, FR_ACT_GELU_TANH, FR_ACT_RELU, FR_ACT_SILU};

const OP: &str = "bias_act_dropout";

/// The library's config of a call: the math mode and keying resolution from the options (the
/// activation's default math for `FR_MATH_DEFAULT`).
pub(crate) fn config(o: &FrOptions) -> FfiResult<Config> {
    let (rows, cols) = o.shape(OP)?;
    let act = match o.activation {
        FR_ACT_GELU_ERF => Activation::GeluErf,
        FR_ACT_GELU_TANH => Activation::GeluTanh,
        FR_ACT_SILU => Activation::Silu,
        FR_ACT_RELU => Activation::Relu,
        a => {
            return Err(FfiError::invalid(format!(
                "{OP}: activation = {a}; use 0 (GELU erf), 1 (GELU tanh), 2 (SiLU) or 3 (ReLU)"
            )))
        }
    };
    let cfg = Config::new(rows, cols, act, o.p, o.seed, o.call)?;
    // mask_bits = 0: unset, the library resolves it for the dtype at the call.
    let cfg = o
        .resolution(OP, &[32, 16, 8])?
        .map_or(cfg, |r| cfg.with_resolution(r));
    Ok(match o.math(OP)? {
        Some(m) => cfg.with_math(m),
        None => cfg,
    })
}

/// `y = dropout(act(x + bias))` on `[rows, cols]`, `bias` (optional) `[cols]`; `h_out`
/// (optional) receives `x + bias`. Keyed by `(seed, call)`.
#[no_mangle]
pub unsafe extern "C" fn fr_bias_act_dropout_forward(
    options: *const FrOptions,
    exec: FrExec,
    x: *const FrTensor,
    bias: *const FrTensor,
    y: *const FrTensor,
    h_out: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let cfg = config(o)?;
        let t = Fwd {
            x: req(OP, "x", x)?,
            bias: opt(OP, "bias", bias)?,
            y: req(OP, "y", y)?,
            h_out: opt(OP, "h_out", h_out)?,
        };
        let h = exec.handle()?;
        dispatch_float!(OP, "x", t.x.dtype, T => forward::<T>(&cfg, h.as_ref(), &t))
    })
}

/// `dx = keep · scale · dy · act'(x + bias)` with the mask regenerated from the options' keys,
/// and (optional) `dbias`, its column sums in a fixed order. The pre-activation is recomputed
/// from `x` (+ `bias`), or read from `h` when given (then `x` and `bias` may be null).
///
/// `workspace` (optional, `FR_U8`): the device scratch of the dbias partials, at least
/// `fr_workspace_size(FR_OP_BIAS_ACT_DROPOUT_BACKWARD)` bytes when `dbias` is given (none is
/// needed without); null allocates it stream-ordered per call.
#[no_mangle]
pub unsafe extern "C" fn fr_bias_act_dropout_backward(
    options: *const FrOptions,
    exec: FrExec,
    dy: *const FrTensor,
    x: *const FrTensor,
    bias: *const FrTensor,
    h: *const FrTensor,
    dx: *const FrTensor,
    dbias: *const FrTensor,
    workspace: *const FrTensor,
) -> FrStatus {
    boundary(|| {
        let o = FrOptions::read(OP, options)?;
        let cfg = config(o)?;
        let hh = opt(OP, "h", h)?;
        let t = Bwd {
            dy: req(OP, "dy", dy)?,
            x: if hh.is_some() {
                opt(OP, "x", x)?
            } else {
                Some(req(OP, "x", x)?)
            },
            bias: opt(OP, "bias", bias)?,
            h: hh,
            dx: req(OP, "dx", dx)?,
            dbias: opt(OP, "dbias", dbias)?,
            workspace,
        };
        let handle = exec.handle()?;
        dispatch_float!(OP, "dy", t.dy.dtype, T => backward::<T>(&cfg, handle.as_ref(), &t))
    })
}

struct Fwd<'a> {
    x: &'a FrTensor,
    bias: Option<&'a FrTensor>,
    y: &'a FrTensor,
    h_out: Option<&'a FrTensor>,
}

struct Bwd<'a> {
    dy: &'a FrTensor,
    x: Option<&'a FrTensor>,
    bias: Option<&'a FrTensor>,
    h: Option<&'a FrTensor>,
    dx: &'a FrTensor,
    dbias: Option<&'a FrTensor>,
    /// Checked in `backward` (its size depends on the dtype).
    workspace: *const FrTensor,
}

fn forward<T: Dtype + Elem>(cfg: &Config, h: Option<&Handle>, t: &Fwd<'_>) -> FfiResult {
    // SAFETY (every view below): the C contract, pointers valid for their lengths, outputs
    // distinct from the inputs.
    match h {
        None => unsafe {
            let bias = t.bias.map(|b| host::<T>(OP, "bias", b)).transpose()?;
            let h_out = t.h_out.map(|b| host_mut::<T>(OP, "h_out", b)).transpose()?;
            bad::cpu::forward(
                cfg,
                host::<T>(OP, "x", t.x)?,
                bias,
                host_mut::<T>(OP, "y", t.y)?,
                h_out,
            )?;
        },
        Some(h) => unsafe {
            let s = h.stream();
            let x = Borrowed::<T>::new(OP, "x", t.x, s)?;
            let bias = t
                .bias
                .map(|b| Borrowed::<T>::new(OP, "bias", b, s))
                .transpose()?;
            let mut y = Borrowed::<T>::new(OP, "y", t.y, s)?;
            let mut h_out = t
                .h_out
                .map(|b| Borrowed::<T>::new(OP, "h_out", b, s))
                .transpose()?;
            bad::forward(
                h,
                cfg,
                x.slice(),
                bias.as_ref().map(|b| b.view()),
                y.slice_mut(),
                h_out.as_mut().map(|b| b.view_mut()),
            )?;
        },
    }
    Ok(())
}

fn backward<T: Dtype + Elem>(cfg: &Config, h: Option<&Handle>, t: &Bwd<'_>) -> FfiResult {
    let (rows, cols, want_dbias) = (cfg.rows(), cfg.cols(), t.dbias.is_some());
    let need = workspace::bias_act_dropout_backward_size(rows, cols, T::KIND, want_dbias)?;
    let ws = crate::workspace::arg(OP, t.workspace, need)?;
    // SAFETY: as in `forward`.
    match h {
        None => unsafe {
            let pre = match t.h {
                Some(hh) => Preact::H(host::<T>(OP, "h", hh)?),
                None => Preact::X {
                    x: host::<T>(OP, "x", t.x.expect("checked: x or h"))?,
                    bias: t.bias.map(|b| host::<T>(OP, "bias", b)).transpose()?,
                },
            };
            let dbias = t.dbias.map(|b| host_mut::<T>(OP, "dbias", b)).transpose()?;
            bad::cpu::backward(
                cfg,
                host::<T>(OP, "dy", t.dy)?,
                pre,
                host_mut::<T>(OP, "dx", t.dx)?,
                dbias,
            )?;
        },
        Some(h) => unsafe {
            let s = h.stream();
            let dy = Borrowed::<T>::new(OP, "dy", t.dy, s)?;
            let hh = t.h.map(|b| Borrowed::<T>::new(OP, "h", b, s)).transpose()?;
            let x = match (t.h, t.x) {
                (None, Some(x)) => Some(Borrowed::<T>::new(OP, "x", x, s)?),
                _ => None,
            };
            let bias = t
                .bias
                .map(|b| Borrowed::<T>::new(OP, "bias", b, s))
                .transpose()?;
            let pre = match (&hh, &x) {
                (Some(hh), _) => Preact::H(hh.view()),
                (None, Some(x)) => Preact::X {
                    x: x.view(),
                    bias: bias.as_ref().map(|b| b.view()),
                },
                (None, None) => unreachable!("checked: x or h"),
            };
            let mut dx = Borrowed::<T>::new(OP, "dx", t.dx, s)?;
            let mut dbias = t
                .dbias
                .map(|b| Borrowed::<T>::new(OP, "dbias", b, s))
                .transpose()?;
            let mut ws = ws
                .map(|w| Borrowed::<u8>::new(OP, "workspace", w, s))
                .transpose()?;
            bad::backward_with_workspace(
                h,
                cfg,
                dy.slice(),
                pre,
                dx.slice_mut(),
                dbias.as_mut().map(|b| b.view_mut()),
                ws.as_mut().map(|w| WorkspaceView::new(w.view_mut())),
            )?;
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fr_options_default, FR_MATH_DEFAULT, FR_MATH_EXACT, FR_MATH_FAST};
    use fusedreg::dropping::MaskResolution;
    use fusedreg::DtypeKind;
    use fusedreg::Math;

    fn cfg(activation: u32, math: u32, mask_bits: u32) -> FfiResult<Config> {
        config(&FrOptions {
            rows: 2,
            cols: 8,
            p: 0.1,
            activation,
            math,
            mask_bits,
            ..fr_options_default()
        })
    }

    #[test]
    fn math_and_resolution_reach_the_config() {
        // The default is the activation's: Fast for GELU and SiLU, Exact for ReLU.
        assert_eq!(
            cfg(FR_ACT_GELU_TANH, FR_MATH_DEFAULT, 32).unwrap().math(),
            Math::Fast
        );
        assert_eq!(
            cfg(FR_ACT_RELU, FR_MATH_DEFAULT, 32).unwrap().math(),
            Math::Exact
        );
        assert_eq!(
            cfg(FR_ACT_SILU, FR_MATH_EXACT, 32).unwrap().math(),
            Math::Exact
        );
        assert_eq!(
            cfg(FR_ACT_RELU, FR_MATH_FAST, 32).unwrap().math(),
            Math::Fast
        );
        let c = cfg(FR_ACT_GELU_ERF, FR_MATH_DEFAULT, 16).unwrap();
        assert_eq!(c.resolution(), Some(MaskResolution::Bits16));
        assert_eq!(c.effective_p(DtypeKind::F32), 6554.0 / 65536.0);
        let c = cfg(FR_ACT_GELU_ERF, FR_MATH_DEFAULT, 8).unwrap();
        assert_eq!(c.resolution(), Some(MaskResolution::Bits8));
        // 0: unset, resolved per dtype by the library (16 bits for bf16, 32 for f32).
        let c = cfg(FR_ACT_GELU_ERF, FR_MATH_DEFAULT, 0).unwrap();
        assert_eq!(c.resolution(), None);
        assert_eq!(c.resolution_for(DtypeKind::Bf16), MaskResolution::Bits16);
        assert_eq!(c.resolution_for(DtypeKind::F32), MaskResolution::Bits32);
        let e = cfg(FR_ACT_GELU_ERF, FR_MATH_DEFAULT, 4)
            .unwrap_err()
            .message;
        assert!(
            e.contains("mask_bits = 4") && e.contains("use 32 or 16 or 8"),
            "{e}"
        );
        assert!(cfg(FR_ACT_GELU_ERF, 9, 32).is_err());
    }
}
