//! The unfused baseline, the way a framework runs the pre-norm entry without this op:
//! [`dropout`](crate::dropout) with its residual (itself fused: bias + dropout + residual add,
//! writing `s`), then a separate norm kernel reading `s` back; backward: the norm's backward
//! (which adds the stream gradient `d_s`, as the framework's gradient accumulation does) writing
//! the stream gradient, then `dropout`'s backward reading it back for `dx` and dbias.
//! It moves `5 s` bytes per element forward and `6 s` backward against the fused `4 s` and
//! `5 s` ([`super::unfused_forward_bytes`], [`super::unfused_backward_bytes`]).
//!
//! Same [`Config`] and argument structs as the fused op, with two restrictions: the stream has
//! x's dtype, a residual is required (forward) and `d_residual` is required (backward: it holds
//! the stream gradient between the two kernels). Its results are not the fused op's bits (the
//! stream gradient is rounded to `T` before the dropout backward, and dbias is summed in
//! `dropout`'s order); [`forward_cpu`] and [`backward_cpu`] mirror it exactly.
//!
//! ```
//! use fusedreg::dropout_add_norm::{cpu, unfused, Config, Norm};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(2, 8, Norm::LayerNorm, 1e-5)?.with_dropout(0.25, 1, 2)?;
//! let (x, r, gamma) = ([0.5f32; 16], [1.0f32; 16], [1.0f32; 8]);
//! let (mut out, mut s, mut mean, mut rstd) = ([0f32; 16], [0f32; 16], [0f32; 2], [0f32; 2]);
//! let args = cpu::ForwardArgs { residual: Some(&r), ..cpu::ForwardArgs::new(&x, &gamma) };
//! let outs = cpu::ForwardOut { out: &mut out, s: &mut s, mean: &mut mean, rstd: &mut rstd };
//! unfused::forward_cpu(&cfg, args, outs)?;
//! // The forward gives the fused op's bits (the backward need not).
//! let (mut out2, mut s2) = ([0f32; 16], [0f32; 16]);
//! let outs = cpu::ForwardOut { out: &mut out2, s: &mut s2, mean: &mut mean, rstd: &mut rstd };
//! cpu::forward(&cfg, args, outs)?;
//! assert_eq!((out, s), (out2, s2));
//! # Ok(()) }
//! ```

use super::gpu::{forward_impl, Mode};
use super::{
    check_backward, check_forward, cpu, BackwardArgs, BackwardOut, Config, ForwardArgs, ForwardOut,
    OP,
};
use crate::dropout as dr;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::runtime::Handle;

fn need_residual() -> Error {
    Error::invalid(OP, "the unfused baseline needs a residual")
}

fn need_d_residual() -> Error {
    Error::invalid(
        OP,
        "the unfused baseline needs d_residual (it carries the stream gradient between its kernels)",
    )
}

/// The unfused forward on the GPU: `dropout::forward` with the residual into `out.s`, then the norm of
/// `out.s` (a second kernel).
///
/// Errors: as the fused [`super::forward`], and [`Error::InvalidArgument`] without a residual.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout_add_norm::{unfused, Config, ForwardArgs, ForwardOut, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let z = |n| h.stream().alloc_zeros::<f32>(n).unwrap();
/// let cfg = Config::new(16, 1024, Norm::LayerNorm, 1e-5)?.with_dropout(0.1, 42, 7)?;
/// let (x, r, gamma) = (z(cfg.len()), z(cfg.len()), z(1024));
/// let (mut out, mut s, mut mean, mut rstd) = (z(cfg.len()), z(cfg.len()), z(16), z(16));
/// let args = ForwardArgs { residual: Some(r.as_view()), ..ForwardArgs::new(x.as_view(), gamma.as_view()) };
/// let outs = ForwardOut {
///     out: out.as_view_mut(), s: s.as_view_mut(), mean: mean.as_view_mut(), rstd: rstd.as_view_mut(),
/// };
/// unfused::forward(&h, &cfg, args, outs)?;
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    args: ForwardArgs<'_, T, T>,
    mut out: ForwardOut<'_, T, T>,
) -> Result<()> {
    if args.redundancy.is_some() {
        return Err(Error::invalid(
            OP,
            "the unfused baseline does not measure redundancy; use the fused forward",
        ));
    }
    let lens = forward_lens!(args, out);
    let residual = args.residual.ok_or_else(need_residual)?;
    check_forward(cfg, &lens)?;
    let dcfg = cfg.dropout_config()?;
    let opts = dr::ForwardOptions {
        bias: args.bias,
        residual: Some(residual),
        rowscale: args.rowscale,
        ..Default::default()
    };
    dr::forward(handle, &dcfg, &args.x, &mut out.s, opts)?;
    let norm_args = ForwardArgs {
        residual: None,
        bias: None,
        rowscale: None,
        ..args
    };
    forward_impl(
        handle,
        &cfg.without_dropout(),
        norm_args,
        out,
        Mode::NormOnly,
    )
}

/// The unfused backward on the GPU: the norm's backward (with `d_s`) into `out.d_residual`, then
/// `dropout::backward` from it into `out.dx` (and dbias).
///
/// Errors: as the fused [`super::backward`], and [`Error::InvalidArgument`] without
/// `d_residual`.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout_add_norm::{unfused, BackwardArgs, BackwardOut, Config, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let z = |n| h.stream().alloc_zeros::<f32>(n).unwrap();
/// let cfg = Config::new(16, 1024, Norm::RmsNorm, 1e-5)?.with_dropout(0.1, 42, 7)?;
/// let (d_out, s, gamma, mean, rstd) = (z(cfg.len()), z(cfg.len()), z(1024), z(16), z(16));
/// let (mut dx, mut dres, mut dgamma) = (z(cfg.len()), z(cfg.len()), z(1024));
/// let args = BackwardArgs::new(d_out.as_view(), s.as_view(), gamma.as_view(), mean.as_view(), rstd.as_view());
/// let outs = BackwardOut { d_residual: Some(dres.as_view_mut()), ..BackwardOut::new(dx.as_view_mut(), dgamma.as_view_mut()) };
/// unfused::backward(&h, &cfg, args, outs)?;
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    args: BackwardArgs<'_, T, T>,
    out: BackwardOut<'_, T, T>,
) -> Result<()> {
    let lens = backward_lens!(args, out);
    let mut d_res = out.d_residual.ok_or_else(need_d_residual)?;
    check_backward(cfg, &lens)?;
    let dcfg = cfg.dropout_config()?;
    let rowscale = args.rowscale;
    let n = cfg.len();
    // The norm's backward: no dropout, no row scale, so its "dx" is T(ds), the stream gradient.
    let norm_args = BackwardArgs {
        rowscale: None,
        ..args
    };
    let norm_out = BackwardOut {
        dx: d_res.slice_mut(0..n),
        d_residual: None,
        dgamma: out.dgamma,
        dbeta: out.dbeta,
        dbias: None,
    };
    super::backward(handle, &cfg.without_dropout(), norm_args, norm_out)?;
    let mut dx = out.dx;
    let opts = dr::BackwardOptions {
        rowscale,
        dbias: out.dbias,
        ..Default::default()
    };
    dr::backward(handle, &dcfg, &d_res, &mut dx, opts)
}

/// The CPU mirror of [`forward`], bit for bit.
///
/// # Examples
///
/// See the [module docs](self).
pub fn forward_cpu<T: Dtype>(
    cfg: &Config,
    args: cpu::ForwardArgs<'_, T, T>,
    out: cpu::ForwardOut<'_, T, T>,
) -> Result<()> {
    let residual = args.residual.ok_or_else(need_residual)?;
    check_forward(cfg, &forward_lens!(args, out))?;
    let opts = dr::cpu::ForwardOptions {
        bias: args.bias,
        residual: Some(residual),
        rowscale: args.rowscale,
        ..Default::default()
    };
    dr::cpu::forward(&cfg.dropout_config()?, args.x, out.s, opts)?;
    cpu::forward_core(&cfg.without_dropout(), args, out, false, false);
    Ok(())
}

/// The CPU mirror of [`backward`], bit for bit.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::{cpu, unfused, Config, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 4, Norm::RmsNorm, 1e-5)?;
/// let (d_out, s, gamma, mean, rstd) = ([1.0f32; 8], [1.0f32, 2.0, 3.0, 4.0, 1.0, 1.0, 2.0, 2.0], [1.0f32; 4], [0.0f32; 2], [0.4f32, 0.6]);
/// let (mut dx, mut dres, mut dgamma) = ([0f32; 8], [0f32; 8], [0f32; 4]);
/// let outs = cpu::BackwardOut { d_residual: Some(&mut dres), ..cpu::BackwardOut::new(&mut dx, &mut dgamma) };
/// unfused::backward_cpu(&cfg, cpu::BackwardArgs::new(&d_out, &s, &gamma, &mean, &rstd), outs)?;
/// assert_eq!(dx, dres); // p = 0: dx is the stream gradient
/// # Ok(()) }
/// ```
pub fn backward_cpu<T: Dtype>(
    cfg: &Config,
    args: cpu::BackwardArgs<'_, T, T>,
    out: cpu::BackwardOut<'_, T, T>,
) -> Result<()> {
    let lens = backward_lens!(args, out);
    let d_res = out.d_residual.ok_or_else(need_d_residual)?;
    check_backward(cfg, &lens)?;
    let rowscale = args.rowscale;
    let norm_args = cpu::BackwardArgs {
        rowscale: None,
        ..args
    };
    let norm_out = cpu::BackwardOut {
        dx: &mut *d_res,
        d_residual: None,
        dgamma: out.dgamma,
        dbeta: out.dbeta,
        dbias: None,
    };
    cpu::backward(&cfg.without_dropout(), norm_args, norm_out)?;
    let opts = dr::cpu::BackwardOptions {
        rowscale,
        dbias: out.dbias,
        ..Default::default()
    };
    dr::cpu::backward(&cfg.dropout_config()?, d_res, out.dx, opts)
}
