//! The C ABI on the CPU: each entry point against the library call it wraps (same bits), the
//! optimizer object's life cycle, and bad input as status codes with messages.

use std::ffi::CStr;
use std::ptr::{null, null_mut};

use fusedreg_ffi::*;

mod common;
use common::{randn, t, CPU};

fn last() -> String {
    // SAFETY: fr_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(fr_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// `fr_dropout_forward` without bias, residual or mask: `x` in, `y` out.
fn dropout_plain(o: &FrOptions, exec: FrExec, x: &FrTensor, y: &FrTensor) -> FrStatus {
    // SAFETY: the descriptors point at live buffers of their stated lengths (or are the bad
    // input under test, which the entry point must reject without reading).
    unsafe { fr_dropout_forward(o, exec, x, null(), null(), null(), y, null(), null()) }
}

/// The four outputs of a norm forward over `rows` rows of `cols`: out, s, mean and rstd.
struct NormOuts {
    out: Vec<f32>,
    s: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl NormOuts {
    fn new(rows: usize, cols: usize) -> Self {
        let n = rows * cols;
        NormOuts {
            out: vec![0.0; n],
            s: vec![0.0; n],
            mean: vec![0.0; rows],
            rstd: vec![0.0; rows],
        }
    }

    /// These buffers as the library's CPU forward writes them.
    fn cpu(&mut self) -> fusedreg::dropout_add_norm::cpu::ForwardOut<'_, f32, f32> {
        fusedreg::dropout_add_norm::cpu::ForwardOut {
            out: &mut self.out,
            s: &mut self.s,
            mean: &mut self.mean,
            rstd: &mut self.rstd,
        }
    }
}

/// `fr_dropout_add_norm_forward` with gamma only (no bias, beta or row scale): x and an optional
/// residual in; `outs` out; `stats`, when given, a Block Influence site's words.
fn dan_forward(
    o: &FrOptions,
    x: &mut [f32],
    r: Option<&mut [f32]>,
    g: &mut [f32],
    outs: &mut NormOuts,
    stats: Option<&FrTensor>,
) -> FrStatus {
    let (x, g) = (t(x, FR_F32), t(g, FR_F32));
    let r = r.map(|r| t(r, FR_F32));
    let r = r.as_ref().map_or(null(), |r| r as *const FrTensor);
    let stats = stats.map_or(null(), |w| w as *const FrTensor);
    let [out, s, mean, rstd] =
        [&mut outs.out, &mut outs.s, &mut outs.mean, &mut outs.rstd].map(|v| t(v, FR_F32));
    // SAFETY: as in `dropout_plain`.
    unsafe {
        fr_dropout_add_norm_forward(
            o,
            CPU,
            &x,
            r,
            &g,
            null(),
            null(),
            null(),
            &out,
            &s,
            &mean,
            &rstd,
            stats,
        )
    }
}

#[test]
fn dropout_residual_matches_the_library() {
    let (rows, cols) = (13usize, 37usize);
    let mut x = randn(rows * cols, 1);
    let mut b = randn(cols, 2);
    let mut r = randn(rows * cols, 3);
    let mut y = vec![0f32; rows * cols];
    let mut o = fr_options_default();
    (o.rows, o.cols, o.p, o.seed, o.call) = (rows as i64, cols as i64, 0.3, 9, 77);
    let st = unsafe {
        fr_dropout_forward(
            &o,
            CPU,
            &t(&mut x, FR_F32),
            &t(&mut b, FR_F32),
            &t(&mut r, FR_F32),
            null(),
            &t(&mut y, FR_F32),
            null(),
            null(),
        )
    };
    assert_eq!(st, FR_OK, "{}", last());
    let cfg = fusedreg::dropout::Config::new(rows, cols, 0.3, 9, 77).unwrap();
    let mut want = vec![0f32; rows * cols];
    let opts = fusedreg::dropout::cpu::ForwardOptions {
        bias: Some(&b),
        residual: Some(&r),
        ..Default::default()
    };
    fusedreg::dropout::cpu::forward(&cfg, &x, &mut want, opts).unwrap();
    assert_eq!(y, want);

    // Backward: dx and dbias, against the library.
    let mut dy = randn(rows * cols, 4);
    let (mut dx, mut db) = (vec![0f32; rows * cols], vec![0f32; cols]);
    let st = unsafe {
        fr_dropout_backward(
            &o,
            CPU,
            &t(&mut dy, FR_F32),
            null(),
            &t(&mut dx, FR_F32),
            &t(&mut db, FR_F32),
            null(),
        )
    };
    assert_eq!(st, FR_OK, "{}", last());
    let (mut wdx, mut wdb) = (vec![0f32; rows * cols], vec![0f32; cols]);
    let opts = fusedreg::dropout::cpu::BackwardOptions {
        dbias: Some(&mut wdb),
        ..Default::default()
    };
    fusedreg::dropout::cpu::backward(&cfg, &dy, &mut wdx, opts).unwrap();
    assert_eq!((dx, db), (wdx, wdb));
}

#[test]
fn cross_entropy_mean_gradient_equals_folded_upstream() {
    let (rows, vocab) = (9usize, 50usize);
    let mut logits = randn(rows * vocab, 5);
    let mut targets: Vec<i64> = (0..rows as i64).map(|i| (i * 7) % 50).collect();
    targets[3] = -100;
    let mut o = fr_options_default();
    (o.rows, o.cols, o.label_smoothing) = (rows as i64, vocab as i64, 0.1);
    let mut loss = [0f32];
    let st = unsafe {
        fr_cross_entropy_forward(
            &o,
            CPU,
            &t(&mut logits, FR_F32),
            &t(&mut targets, FR_I64),
            &t(&mut loss, FR_F32),
            null(),
            null(),
        )
    };
    assert_eq!(st, FR_OK, "{}", last());
    let cfg = fusedreg::cross_entropy::Config::new(rows, vocab)
        .unwrap()
        .label_smoothing(0.1)
        .unwrap();
    let mut want = vec![0f32; rows * vocab];
    let l =
        fusedreg::cross_entropy::cpu::forward_backward(&cfg, &logits, &targets, None, &mut want)
            .unwrap();
    assert_eq!(loss[0], l.reduced.unwrap());
    // What the Python autograd does: reduction none with upstream = 1 / n_valid per row.
    o.reduction = FR_REDUCTION_NONE;
    let mut up = vec![1.0f32 / 8.0; rows];
    let mut grad = vec![0f32; rows * vocab];
    let st = unsafe {
        fr_cross_entropy_backward(
            &o,
            CPU,
            &t(&mut logits, FR_F32),
            &t(&mut targets, FR_I64),
            &t(&mut up, FR_F32),
            &t(&mut grad, FR_F32),
            null(),
            null(),
            null(),
        )
    };
    assert_eq!(st, FR_OK, "{}", last());
    assert_eq!(grad, want, "the same bits as the library's mean gradient");
    // In place: grad = logits.
    let mut inplace = logits.clone();
    let lt = t(&mut inplace, FR_F32);
    let st = unsafe {
        fr_cross_entropy_backward(
            &o,
            CPU,
            &lt,
            &t(&mut targets, FR_I64),
            &t(&mut up, FR_F32),
            &lt,
            null(),
            null(),
            null(),
        )
    };
    assert_eq!(st, FR_OK, "{}", last());
    assert_eq!(inplace, want);
}

#[test]
fn adamw_object_steps_saves_and_restores() {
    let mut p0 = randn(100, 6);
    let mut p1 = randn(7, 7);
    let mut g0 = randn(100, 8);
    let mut g1 = randn(7, 9);
    let params = [t(&mut p0, FR_F32), t(&mut p1, FR_F32)];
    let grads = [t(&mut g0, FR_F32), t(&mut g1, FR_F32)];
    let wd = [0.1f32, 0.0];
    let mut o = fr_adamw_options_default();
    o.max_grad_norm = 0.5;
    let mut opt: *mut FrAdamW = null_mut();
    let st = unsafe {
        fr_adamw_create(
            &o,
            CPU,
            params.as_ptr(),
            grads.as_ptr(),
            wd.as_ptr(),
            2,
            &mut opt,
        )
    };
    assert_eq!(st, FR_OK, "{}", last());
    for _ in 0..3 {
        assert_eq!(
            unsafe { fr_adamw_step(opt, grads.as_ptr(), null(), 2, 1e-2) },
            FR_OK,
            "{}",
            last()
        );
    }
    let mut size = 0i64;
    assert_eq!(unsafe { fr_adamw_state_size(opt, &mut size) }, FR_OK);
    let mut state = vec![0u8; size as usize];
    assert_eq!(
        unsafe { fr_adamw_save_state(opt, state.as_mut_ptr(), size) },
        FR_OK,
        "{}",
        last()
    );
    let snapshot = (p0.clone(), p1.clone());
    // Two more steps, then rewind the state and the parameters and take them again: same bits.
    for _ in 0..2 {
        assert_eq!(
            unsafe { fr_adamw_step(opt, grads.as_ptr(), null(), 2, 1e-2) },
            FR_OK
        );
    }
    let after = (p0.clone(), p1.clone());
    p0.copy_from_slice(&snapshot.0);
    p1.copy_from_slice(&snapshot.1);
    assert_eq!(
        unsafe { fr_adamw_restore_state(opt, state.as_ptr(), size) },
        FR_OK,
        "{}",
        last()
    );
    for _ in 0..2 {
        assert_eq!(
            unsafe { fr_adamw_step(opt, grads.as_ptr(), null(), 2, 1e-2) },
            FR_OK
        );
    }
    assert_eq!((p0.clone(), p1.clone()), after);
    // A skipped tensor is untouched.
    let skip = [0u8, 1];
    let before = p1.clone();
    assert_eq!(
        unsafe { fr_adamw_step(opt, grads.as_ptr(), skip.as_ptr(), 2, 1e-2) },
        FR_OK
    );
    assert_eq!(p1, before);
    // Bad input: a corrupted state, a wrong count.
    state[0] ^= 0xff;
    assert_eq!(
        unsafe { fr_adamw_restore_state(opt, state.as_ptr(), size) },
        FR_ERR_INVALID_ARGUMENT
    );
    assert!(!last().is_empty());
    assert_eq!(
        unsafe { fr_adamw_step(opt, grads.as_ptr(), null(), 1, 1e-2) },
        FR_ERR_INVALID_ARGUMENT
    );
    assert!(last().contains("1 gradients"), "{}", last());
    assert_eq!(unsafe { fr_adamw_destroy(opt) }, FR_OK);
}

#[test]
fn bad_input_is_a_status_with_a_message() {
    let mut o = fr_options_default();
    (o.rows, o.cols, o.p) = (2, 2, 1.5);
    let mut x = vec![0f32; 4];
    let mut y = vec![0f32; 4];
    let st = dropout_plain(&o, CPU, &t(&mut x, FR_F32), &t(&mut y, FR_F32));
    assert_eq!(st, FR_ERR_INVALID_ARGUMENT);
    assert!(last().contains("p = 1.5"), "{}", last());
    o.p = 0.1;
    let mut short = vec![0f32; 3];
    let st = dropout_plain(&o, CPU, &t(&mut x, FR_F32), &t(&mut short, FR_F32));
    assert_eq!(st, FR_ERR_SHAPE, "{}", last());
    let mut h = vec![half::f16::ZERO; 4];
    let st = dropout_plain(&o, CPU, &t(&mut x, FR_F32), &t(&mut h, FR_F16));
    assert_eq!(st, FR_ERR_INVALID_ARGUMENT);
    assert!(last().contains("dtype"), "{}", last());
    let st = unsafe {
        fr_dropout_forward(
            null(),
            CPU,
            null(),
            null(),
            null(),
            null(),
            null(),
            null(),
            null(),
        )
    };
    assert_eq!(st, FR_ERR_INVALID_ARGUMENT);
    let bad = FrTensor {
        data: null_mut(),
        len: 4,
        dtype: FR_F32,
    };
    let st = dropout_plain(&o, CPU, &bad, &t(&mut y, FR_F32));
    assert_eq!(st, FR_ERR_INVALID_ARGUMENT);
    assert!(last().contains("null data pointer"), "{}", last());
    // Without a GPU (or kernels), a GPU call is a clear error, not a crash.
    if !fusedreg::driver_present() {
        let gpu = FrExec {
            device: 0,
            stream: null_mut(),
        };
        let st = dropout_plain(&o, gpu, &t(&mut x, FR_F32), &t(&mut y, FR_F32));
        assert_eq!(st, FR_ERR_NO_DRIVER, "{}", last());
    }
}

#[test]
fn stochastic_depth_plan_is_the_library_plan() {
    let (mut runs, mut scale) = ([0u8; 8], [0f32; 8]);
    let st = unsafe {
        fr_stochastic_depth_plan(
            FR_DEPTH_LINEAR,
            0.5,
            null(),
            8,
            3,
            11,
            FR_DEPTH_BATCH,
            runs.as_mut_ptr(),
            scale.as_mut_ptr(),
            null_mut(),
            null_mut(),
        )
    };
    assert_eq!(st, FR_OK, "{}", last());
    let sd = fusedreg::stochastic_depth::StochasticDepth::new(
        fusedreg::stochastic_depth::Schedule::linear(0.5),
        8,
        3,
        fusedreg::stochastic_depth::Mode::Batch,
    )
    .unwrap();
    let plan = sd.plan(11);
    for l in 0..8 {
        assert_eq!(runs[l] != 0, plan.runs(l));
        assert_eq!(scale[l], plan.residual_scale(l));
    }
}

#[test]
fn dropout_add_norm_keys_at_every_resolution() {
    use fusedreg::dropout_add_norm::{cpu, Config, Norm};
    use fusedreg::dropping::MaskResolution;
    let (rows, cols) = (5usize, 45usize);
    let n = rows * cols;
    let (mut x, mut r, mut g) = (randn(n, 11), randn(n, 12), randn(cols, 13));
    let mut streams = Vec::new();
    for (bits, res) in [
        (32, MaskResolution::Bits32),
        (16, MaskResolution::Bits16),
        (8, MaskResolution::Bits8),
    ] {
        let mut o = fr_options_default();
        (o.rows, o.cols, o.p, o.seed, o.call) = (rows as i64, cols as i64, 0.3, 9, 77);
        o.mask_bits = bits;
        let mut got = NormOuts::new(rows, cols);
        let st = dan_forward(&o, &mut x, Some(&mut r), &mut g, &mut got, None);
        assert_eq!(st, FR_OK, "mask_bits {bits}: {}", last());
        let cfg = Config::new(rows, cols, Norm::LayerNorm, o.eps)
            .unwrap()
            .with_resolution(res)
            .with_dropout(0.3, 9, 77)
            .unwrap();
        let mut want = NormOuts::new(rows, cols);
        let args = cpu::ForwardArgs {
            residual: Some(&r),
            ..cpu::ForwardArgs::new(&x, &g)
        };
        cpu::forward(&cfg, args, want.cpu()).unwrap();
        assert_eq!((&got.out, &got.s), (&want.out, &want.s), "mask_bits {bits}");
        streams.push(got.s);
    }
    // The resolutions key different masks.
    assert_ne!(streams[0], streams[1]);
    assert_ne!(streams[1], streams[2]);
    // A resolution no op offers is an error naming the choices.
    let mut o = fr_options_default();
    (o.rows, o.cols, o.mask_bits) = (rows as i64, cols as i64, 4);
    let mut got = NormOuts::new(rows, cols);
    let st = dan_forward(&o, &mut x, None, &mut g, &mut got, None);
    assert_ne!(st, FR_OK);
    assert!(last().contains("use 32 or 16 or 8"), "{}", last());
}

#[test]
fn dropout_add_norm_measures_block_influence() {
    use fusedreg::dropout_add_norm::{cpu, Config, Norm};
    use fusedreg::redundancy::{cpu::Redundancy, SiteStats};
    let (rows, cols) = (7usize, 33usize);
    let n = rows * cols;
    let (mut x, mut r, mut g) = (randn(n, 21), randn(n, 22), randn(cols, 23));
    let mut o = fr_options_default();
    (o.rows, o.cols) = (rows as i64, cols as i64);
    let mut got = NormOuts::new(rows, cols);
    // Two calls into one site: the words accumulate (the caller zeroes them to start).
    let mut words = [0i64; 3];
    for _ in 0..2 {
        let st = dan_forward(
            &o,
            &mut x,
            Some(&mut r),
            &mut g,
            &mut got,
            Some(&t(&mut words, FR_I64)),
        );
        assert_eq!(st, FR_OK, "{}", last());
    }
    let cfg = Config::new(rows, cols, Norm::LayerNorm, o.eps).unwrap();
    let meter = Redundancy::new(1).unwrap();
    for _ in 0..2 {
        let mut want = NormOuts::new(rows, cols);
        let args = cpu::ForwardArgs {
            residual: Some(&r),
            redundancy: Some(meter.site(0).unwrap()),
            ..cpu::ForwardArgs::new(&x, &g)
        };
        cpu::forward(&cfg, args, want.cpu()).unwrap();
        assert_eq!(
            (&got.out, &got.s),
            (&want.out, &want.s),
            "the statistics leave the outputs alone"
        );
    }
    let want = meter.stats().unwrap()[0];
    assert_eq!(want.rows, 2 * rows as u64);
    assert_eq!(SiteStats::from_words(words.map(|w| w as u64)), want);
    // A site is three words: anything else is a shape error naming them.
    let mut short = [0i64; 2];
    let st = dan_forward(
        &o,
        &mut x,
        Some(&mut r),
        &mut g,
        &mut got,
        Some(&t(&mut short, FR_I64)),
    );
    assert_eq!(st, FR_ERR_SHAPE, "{}", last());
    assert!(last().contains("3 int64 words"), "{}", last());
}

/// `fr_dropout_forward` with a residual, a row scale and a Block Influence site: the final
/// residual add of a block. `y` may be the residual itself (in place).
fn dropout_measured(
    o: &FrOptions,
    x: &FrTensor,
    r: Option<&FrTensor>,
    rowscale: &FrTensor,
    y: &FrTensor,
    stats: &FrTensor,
) -> FrStatus {
    let r = r.map_or(null(), |r| r as *const FrTensor);
    // SAFETY: as in `dropout_plain`.
    unsafe { fr_dropout_forward(o, CPU, x, null(), r, rowscale, y, null(), stats) }
}

#[test]
fn dropout_residual_measures_block_influence() {
    use fusedreg::dropout::{cpu, Config};
    use fusedreg::redundancy::{cpu::Redundancy, SiteStats};
    let (rows, cols) = (9usize, 41usize);
    let n = rows * cols;
    let (mut x, mut r) = (randn(n, 31), randn(n, 32));
    let mut rs: Vec<f32> = randn(rows, 33).iter().map(|v| v.abs()).collect();
    let mut o = fr_options_default();
    (o.rows, o.cols, o.p, o.seed, o.call) = (rows as i64, cols as i64, 0.2, 5, 3);
    let cfg = Config::new(rows, cols, 0.2, 5, 3).unwrap();

    // The library's plain forward (no meter): the bits the measured calls must keep.
    let mut plain = vec![0f32; n];
    let opts = cpu::ForwardOptions {
        residual: Some(&r),
        rowscale: Some(&rs),
        ..Default::default()
    };
    cpu::forward(&cfg, &x, &mut plain, opts).unwrap();

    // Out of place, then in place (y = residual): both into one site (zeroed to start).
    let mut words = [0i64; 3];
    let mut y = vec![0f32; n];
    let st = dropout_measured(
        &o,
        &t(&mut x, FR_F32),
        Some(&t(&mut r, FR_F32)),
        &t(&mut rs, FR_F32),
        &t(&mut y, FR_F32),
        &t(&mut words, FR_I64),
    );
    assert_eq!(st, FR_OK, "{}", last());
    assert_eq!(y, plain, "the statistics leave the output alone");
    let mut stream = r.clone();
    let st = dropout_measured(
        &o,
        &t(&mut x, FR_F32),
        Some(&t(&mut stream, FR_F32)),
        &t(&mut rs, FR_F32),
        &t(&mut stream, FR_F32),
        &t(&mut words, FR_I64),
    );
    assert_eq!(st, FR_OK, "{}", last());
    assert_eq!(stream, plain, "in place: the same bits");

    // The library's meter over the same two calls: the same words.
    let meter = Redundancy::new(1).unwrap();
    for _ in 0..2 {
        let mut want = vec![0f32; n];
        let opts = cpu::ForwardOptions {
            residual: Some(&r),
            rowscale: Some(&rs),
            redundancy: Some(meter.site(0).unwrap()),
            ..Default::default()
        };
        cpu::forward(&cfg, &x, &mut want, opts).unwrap();
    }
    let want = meter.stats().unwrap()[0];
    assert_eq!(want.rows, 2 * rows as u64);
    assert_eq!(SiteStats::from_words(words.map(|w| w as u64)), want);
    // And BI against a plain f64 recomputation of cos(r, y) per row (well inside the library's
    // bound; the library's own tests hold it to the bound itself).
    let mut cos = 0f64;
    for i in 0..rows {
        let (a, b) = (&r[i * cols..][..cols], &plain[i * cols..][..cols]);
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(&u, &v)| f64::from(u) * f64::from(v))
            .sum();
        let na: f64 = a.iter().map(|&u| f64::from(u).powi(2)).sum();
        let nb: f64 = b.iter().map(|&u| f64::from(u).powi(2)).sum();
        cos += dot / (na * nb).sqrt();
    }
    let bi = meter.bi().unwrap()[0].unwrap();
    assert!((bi - (1.0 - cos / rows as f64)).abs() < 1e-5, "{bi}");

    // Without a residual there is no BI: an error naming what to do, the words untouched.
    let before = words;
    let st = dropout_measured(
        &o,
        &t(&mut x, FR_F32),
        None,
        &t(&mut rs, FR_F32),
        &t(&mut y, FR_F32),
        &t(&mut words, FR_I64),
    );
    assert_eq!(st, FR_ERR_INVALID_ARGUMENT);
    assert!(last().contains("needs a `residual`"), "{}", last());
    assert_eq!(words, before);
    // A site is three int64 words: anything else is a clear error.
    let (mut short, mut wrong) = ([0i64; 2], [0f32; 3]);
    for (stats, status, msg) in [
        (t(&mut short, FR_I64), FR_ERR_SHAPE, "3 int64 words"),
        (
            t(&mut wrong, FR_F32),
            FR_ERR_INVALID_ARGUMENT,
            "`stats` has dtype",
        ),
    ] {
        let (xt, rt, rst, yt) = (
            t(&mut x, FR_F32),
            t(&mut r, FR_F32),
            t(&mut rs, FR_F32),
            t(&mut y, FR_F32),
        );
        let st = dropout_measured(&o, &xt, Some(&rt), &rst, &yt, &stats);
        assert_eq!(st, status, "{}", last());
        assert!(last().contains(msg), "{}", last());
    }
}

/// A caller-supplied workspace: the size query, a CPU call given exactly that many bytes (checked
/// and unused: the same bits as without), one byte less, the wrong dtype and a misaligned one as
/// status codes with messages.
#[test]
fn workspace_is_queried_and_checked() {
    let (rows, cols) = (37usize, 19usize);
    let mut o = fr_options_default();
    (o.rows, o.cols, o.p, o.seed, o.call) = (rows as i64, cols as i64, 0.25, 3, 4);
    let mut n = -1i64;
    let st = unsafe { fr_workspace_size(FR_OP_DROPOUT_BACKWARD, &o, FR_F32, &mut n) };
    assert_eq!(st, FR_OK, "{}", last());
    let want_n =
        fusedreg::workspace::dropout_backward_size(rows, cols, fusedreg::DtypeKind::F32, true)
            .unwrap();
    assert_eq!(n as usize, want_n);
    // 16-byte aligned storage of n + 16 bytes.
    let mut store = vec![0u128; n as usize / 16 + 2];
    let base = store.as_mut_ptr().cast::<u8>();
    let ws = |off: usize, len: i64, dtype| FrTensor {
        data: base.wrapping_add(off).cast(),
        len,
        dtype,
    };
    let dy = randn(rows * cols, 11);
    let run = |w: Option<&FrTensor>| {
        let (mut dx, mut db) = (vec![0f32; rows * cols], vec![0f32; cols]);
        let mut dy = dy.clone();
        let st = unsafe {
            fr_dropout_backward(
                &o,
                CPU,
                &t(&mut dy, FR_F32),
                null(),
                &t(&mut dx, FR_F32),
                &t(&mut db, FR_F32),
                w.map_or(null(), |w| w as *const FrTensor),
            )
        };
        (st, last(), dx, db)
    };
    let (st, msg, dx0, db0) = run(None);
    assert_eq!(st, FR_OK, "{msg}");
    let (st, msg, dx1, db1) = run(Some(&ws(0, n, FR_U8)));
    assert_eq!(st, FR_OK, "{msg}");
    assert_eq!((dx1, db1), (dx0, db0));
    let (st, msg, ..) = run(Some(&ws(0, n - 1, FR_U8)));
    assert_eq!(st, FR_ERR_SHAPE);
    assert!(
        msg.contains("fr_workspace_size") && msg.contains(&format!("needs {n}")),
        "{msg}"
    );
    let (st, msg, ..) = run(Some(&ws(0, n, FR_F32)));
    assert_eq!(st, FR_ERR_INVALID_ARGUMENT);
    assert!(msg.contains("uint8"), "{msg}");
    let (st, msg, ..) = run(Some(&ws(8, n, FR_U8)));
    assert_eq!(st, FR_ERR_INVALID_ARGUMENT);
    assert!(msg.contains("aligned"), "{msg}");
}
