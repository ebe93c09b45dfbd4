//! Caller-supplied workspaces (`fusedreg::workspace`): every op with scratch, given a borrowed
//! view of exactly the queried size, gives the same bits as without one (stream-ordered scratch,
//! itself checked against the CPU reference in the op's own file); one byte less, a misaligned
//! view, or both kinds of workspace at once are clear errors before any launch.

use cudarc::driver::{CudaSlice, CudaViewMut};
use fusedreg::bias_act_dropout::{self as bad, Activation, Preact};
use fusedreg::cross_entropy::{self as xe, Reduction};
use fusedreg::dropout::{self as dr, BackwardOptions};
use fusedreg::dropout_add_norm::{self as dan, Norm};
use fusedreg::workspace::{self, WorkspaceView};
use fusedreg::{DtypeKind, Error};

use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "workspace",
        &[
            ("dropout_exact_size", dropout_exact_size),
            ("bias_act_dropout_exact_size", bias_act_dropout_exact_size),
            ("dropout_add_norm_exact_size", dropout_add_norm_exact_size),
            ("cross_entropy_exact_size", cross_entropy_exact_size),
        ],
    )
}

/// How a call is given its workspace: none, the queried size, one byte less, misaligned by 8.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ws {
    None,
    Exact,
    Short,
    Misaligned,
}

/// A buffer for `ws` of a call needing `need` bytes (16 spare bytes for the misaligned case).
fn ws_buf(h: &Handle, need: usize) -> TestResult<CudaSlice<u8>> {
    Ok(h.stream().alloc_zeros::<u8>(need + 16)?)
}

fn view<'a>(buf: &'a mut CudaSlice<u8>, ws: Ws, need: usize) -> Option<WorkspaceView<'a>> {
    let v: CudaViewMut<'a, u8> = match ws {
        Ws::None => return None,
        Ws::Exact => buf.slice_mut(0..need),
        Ws::Short => buf.slice_mut(0..need - 1),
        Ws::Misaligned => buf.slice_mut(8..8 + need),
    };
    Some(WorkspaceView::new(v))
}

/// Runs `call` with no workspace and with each kind of view; checks the exact one gives `same`
/// bits and the bad ones their errors (naming `query`).
fn check_kinds<R: PartialEq + std::fmt::Debug>(
    query: &str,
    mut call: impl FnMut(Ws) -> TestResult<Result<R, Error>>,
) -> TestResult {
    let want = call(Ws::None)??;
    let got = call(Ws::Exact)??;
    if got != want {
        return Err(format!("exact-size workspace: {got:?} != {want:?} without one").into());
    }
    match call(Ws::Short)? {
        Err(Error::ShapeMismatch { detail, .. }) if detail.contains(query) => {}
        other => return Err(format!("one byte short: {other:?}, expected a ShapeMismatch").into()),
    }
    match call(Ws::Misaligned)? {
        Err(Error::InvalidArgument { detail, .. }) if detail.contains("aligned") => {}
        other => return Err(format!("misaligned: {other:?}, expected InvalidArgument").into()),
    }
    Ok(())
}

fn dropout_exact_size(h: &Handle) -> TestResult {
    let s = h.stream();
    let (rows, cols) = (1000, 777);
    let cfg = dr::Config::new(rows, cols, 0.1, 42, 7)?;
    let need = workspace::dropout_backward_size(rows, cols, DtypeKind::F32, true)?;
    let dy = s.clone_htod(&uniform::<f32>(&mut rng(1), cfg.len(), -2.0, 2.0))?;
    let mut buf = ws_buf(h, need)?;
    check_kinds("dropout_backward_size", |ws| {
        let mut dx = s.alloc_zeros::<f32>(cfg.len())?;
        let mut dbias = s.alloc_zeros::<f32>(cols)?;
        let opts = BackwardOptions {
            dbias: Some(dbias.as_view_mut()),
            workspace_view: view(&mut buf, ws, need),
            ..Default::default()
        };
        let r = dr::backward(h, &cfg, &dy, &mut dx, opts);
        Ok(match r {
            Ok(()) => Ok((
                to_bits(&s.clone_dtoh(&dx)?),
                to_bits(&s.clone_dtoh(&dbias)?),
            )),
            Err(e) => Err(e),
        })
    })?;
    // Both kinds of workspace at once.
    let mut owned = dr::Workspace::new();
    let mut dx = s.alloc_zeros::<f32>(cfg.len())?;
    let mut dbias = s.alloc_zeros::<f32>(cols)?;
    let opts = BackwardOptions {
        dbias: Some(dbias.as_view_mut()),
        workspace: Some(&mut owned),
        workspace_view: view(&mut buf, Ws::Exact, need),
        ..Default::default()
    };
    match dr::backward(h, &cfg, &dy, &mut dx, opts) {
        Err(Error::InvalidArgument { .. }) => Ok(()),
        other => Err(format!("both workspaces: {other:?}").into()),
    }
}

fn bias_act_dropout_exact_size(h: &Handle) -> TestResult {
    let s = h.stream();
    let (rows, cols) = (513, 1024);
    let cfg = bad::Config::new(rows, cols, Activation::Relu, 0.1, 42, 7)?;
    let need = workspace::bias_act_dropout_backward_size(rows, cols, DtypeKind::F32, true)?;
    let x = s.clone_htod(&uniform::<f32>(&mut rng(2), cfg.len(), -2.0, 2.0))?;
    let dy = s.clone_htod(&uniform::<f32>(&mut rng(3), cfg.len(), -2.0, 2.0))?;
    let mut buf = ws_buf(h, need)?;
    check_kinds("bias_act_dropout_backward_size", |ws| {
        let mut dx = s.alloc_zeros::<f32>(cfg.len())?;
        let mut dbias = s.alloc_zeros::<f32>(cols)?;
        let pre = Preact::X {
            x: x.as_view(),
            bias: None,
        };
        let v = view(&mut buf, ws, need);
        let r =
            bad::backward_with_workspace(h, &cfg, &dy, pre, &mut dx, Some(dbias.as_view_mut()), v);
        Ok(match r {
            Ok(()) => Ok((
                to_bits(&s.clone_dtoh(&dx)?),
                to_bits(&s.clone_dtoh(&dbias)?),
            )),
            Err(e) => Err(e),
        })
    })
}

fn dropout_add_norm_exact_size(h: &Handle) -> TestResult {
    let s = h.stream();
    let (rows, cols) = (1500, 768);
    let cfg = dan::Config::new(rows, cols, Norm::LayerNorm, 1e-5)?.with_dropout(0.1, 42, 7)?;
    let need = workspace::dropout_add_norm_backward_size(rows, cols)?;
    let r = &mut rng(4);
    let d_out = s.clone_htod(&uniform::<f32>(r, cfg.len(), -1.0, 1.0))?;
    let st = s.clone_htod(&uniform::<f32>(r, cfg.len(), -1.0, 1.0))?;
    let gamma = s.clone_htod(&uniform::<f32>(r, cols, 0.5, 1.5))?;
    let mean = s.clone_htod(&uniform::<f32>(r, rows, -0.1, 0.1))?;
    let rstd = s.clone_htod(&uniform::<f32>(r, rows, 0.5, 2.0))?;
    let mut buf = ws_buf(h, need)?;
    check_kinds("dropout_add_norm_backward_size", |ws| {
        let mut dx = s.alloc_zeros::<f32>(cfg.len())?;
        let mut dgamma = s.alloc_zeros::<f32>(cols)?;
        let mut dbeta = s.alloc_zeros::<f32>(cols)?;
        let args = dan::BackwardArgs {
            workspace_view: view(&mut buf, ws, need),
            ..dan::BackwardArgs::new(
                d_out.as_view(),
                st.as_view(),
                gamma.as_view(),
                mean.as_view(),
                rstd.as_view(),
            )
        };
        let out = dan::BackwardOut {
            dbeta: Some(dbeta.as_view_mut()),
            ..dan::BackwardOut::new(dx.as_view_mut(), dgamma.as_view_mut())
        };
        let res = dan::backward(h, &cfg, args, out);
        Ok(match res {
            Ok(()) => Ok((
                to_bits(&s.clone_dtoh(&dx)?),
                to_bits(&s.clone_dtoh(&dgamma)?),
                to_bits(&s.clone_dtoh(&dbeta)?),
            )),
            Err(e) => Err(e),
        })
    })
}

fn cross_entropy_exact_size(h: &Handle) -> TestResult {
    let s = h.stream();
    for (rows, red) in [
        (3000, Reduction::Mean),
        (70_000, Reduction::Sum),
        (5, Reduction::None),
    ] {
        let vocab = 33;
        let cfg = xe::Config::new(rows, vocab)?.reduction(red);
        let need = workspace::cross_entropy_size(rows, vocab, red)?;
        let r = &mut rng(5);
        let logits = s.clone_htod(&uniform::<f32>(r, cfg.len(), -4.0, 4.0))?;
        let t: Vec<i64> = (0..rows as i64).map(|i| (i * 7) % vocab as i64).collect();
        let targets = s.clone_htod(&t)?;
        let mut buf = ws_buf(h, need)?;
        check_kinds("cross_entropy_size", |ws| {
            let mut grad = s.alloc_zeros::<f32>(cfg.len())?;
            let mut loss = s.alloc_zeros::<f32>(red.loss_len(rows))?;
            let out = xe::Outputs {
                workspace_view: view(&mut buf, ws, need),
                ..xe::Outputs::new(loss.as_view_mut())
            };
            let res = xe::forward_backward(h, &cfg, &logits, &targets, &mut grad, out);
            Ok(match res {
                Ok(()) => Ok((
                    to_bits(&s.clone_dtoh(&loss)?),
                    to_bits(&s.clone_dtoh(&grad)?),
                )),
                Err(e) => Err(e),
            })
        })
        .map_err(|e| format!("{red:?}: {e}"))?;
    }
    Ok(())
}

fn to_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
