//! Dropout on the device against the CPU reference, bit for bit, without a residual, with one
//! and in place (y, the 1-bit mask, the generated row scale, dx from the regenerated mask and
//! from the bitmask, dbias), at every keying resolution; the unfused baseline against its CPU
//! mirror.
//!
//! Every output is poisoned before the kernel runs, and output views have a sentinel element on
//! each side that must survive.

// Element-wise comparisons read best with explicit indices.
#![allow(clippy::needless_range_loop)]

use fusedreg::dropout::{
    self as dr, cpu, unfused, BackwardOptions, Config, DropPath, ForwardOptions, LaunchTuning,
    MaskResolution, Workspace,
};
use fusedreg::{Dtype, Error, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::common::{bits_eq, rng, uniform};
use crate::harness::{trials_of, TestResult};
use crate::prelude::{download, launches, poison, upload, Rs};

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "dropout",
        &[
            ("flat_sizes_f32", flat_sizes::<f32>),
            ("flat_sizes_f16", flat_sizes::<f16>),
            ("flat_sizes_bf16", flat_sizes::<bf16>),
            ("shapes_f32", shapes::<f32>),
            ("shapes_f16", shapes::<f16>),
            ("shapes_bf16", shapes::<bf16>),
            ("edge_rates_f32", edge_rates::<f32>),
            ("edge_rates_f16", edge_rates::<f16>),
            ("edge_rates_bf16", edge_rates::<bf16>),
            ("launch_configurations_agree", launch_configurations_agree),
            ("sixteen_bit_keying_f32", sixteen_bit_keying::<f32>),
            ("sixteen_bit_keying_f16", sixteen_bit_keying::<f16>),
            ("sixteen_bit_keying_bf16", sixteen_bit_keying::<bf16>),
            ("eight_bit_keying_f32", eight_bit_keying::<f32>),
            ("eight_bit_keying_f16", eight_bit_keying::<f16>),
            ("eight_bit_keying_bf16", eight_bit_keying::<bf16>),
            ("default_keying_bf16_is_bits16", default_keying::<bf16>),
            ("default_keying_f32_is_bits32", default_keying::<f32>),
            ("dbias_is_deterministic", dbias_is_deterministic),
            ("row_scales_staged_in_chunks", row_scales_staged_in_chunks),
            ("empty_inputs_launch_nothing", empty_inputs_launch_nothing),
            ("unfused_matches_its_cpu_mirror_f32", unfused_mirror::<f32>),
            (
                "unfused_matches_its_cpu_mirror_bf16",
                unfused_mirror::<bf16>,
            ),
            ("unfused_matches_its_cpu_mirror_f16", unfused_mirror::<f16>),
            ("bad_input_is_an_error", bad_input_is_an_error),
        ],
    )
}

/// The residual variant of the forward.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Res {
    /// `y = dropout(x + bias)`.
    None,
    /// `y = r + dropout(x + bias)` into a separate y.
    Out,
    /// `r += dropout(x + bias)` (`forward_inplace`).
    InPlace,
}

/// Every residual variant, for the cases that run them all.
const ALL_RES: [Res; 3] = [Res::None, Res::Out, Res::InPlace];

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    cols: usize,
    p: f64,
    bias: bool,
    rs: Rs,
    res: Res,
    mask: bool,
    /// x, residual, y, dy and dx are views starting at this element.
    offset: usize,
    dbias: bool,
    /// The keying resolution (Bits32 by default).
    resolution: MaskResolution,
    tuning: LaunchTuning,
}

impl Case {
    fn new(rows: usize, cols: usize) -> Self {
        Case {
            rows,
            cols,
            p: 0.1,
            bias: false,
            rs: Rs::None,
            res: Res::None,
            mask: true,
            offset: 0,
            dbias: false,
            resolution: MaskResolution::Bits32,
            tuning: LaunchTuning::default(),
        }
    }

    /// The same case with another residual variant.
    fn with(self, res: Res) -> Self {
        Case { res, ..self }
    }

    fn config(&self, seed: u64) -> Config {
        let cfg = Config::new(self.rows, self.cols, self.p, seed, 0x1234_5678_9abc)
            .unwrap()
            .with_resolution(self.resolution);
        match self.rs.drop_path(16) {
            Some(path) => cfg.with_drop_path(path),
            None => cfg,
        }
    }
}

struct Data<T> {
    x: Vec<T>,
    r: Vec<T>,
    bias: Option<Vec<T>>,
    rowscale: Option<Vec<f32>>,
    dy: Vec<T>,
}

fn data<T: Dtype>(c: &Case, seed: u64) -> Data<T> {
    let mut g = rng(seed);
    let n = c.rows * c.cols;
    Data {
        x: uniform(&mut g, n, -4.0, 4.0),
        r: uniform(&mut g, n, -4.0, 4.0),
        bias: c.bias.then(|| uniform(&mut g, c.cols, -1.0, 1.0)),
        rowscale: c.rs.given(&mut g, c.rows, 7),
        dy: uniform(&mut g, n, -1.0, 1.0),
    }
}

struct FwdOut<T> {
    y: Vec<T>,
    mask: Option<Vec<u32>>,
    rowscale_out: Option<Vec<f32>>,
}

fn cpu_forward<T: Dtype>(c: &Case, cfg: &Config, d: &Data<T>) -> FwdOut<T> {
    let mut y = vec![poison::<T>(); cfg.len()];
    let mut mask = c.mask.then(|| vec![0xDEAD_BEEF; cfg.mask_words()]);
    let path = matches!(c.rs, Rs::Path | Rs::PerSample);
    let mut rs_out = path.then(|| vec![f32::NAN; c.rows]);
    let opts = cpu::ForwardOptions {
        bias: d.bias.as_deref(),
        residual: (c.res != Res::None).then_some(&d.r[..]),
        rowscale: d.rowscale.as_deref(),
        mask_out: mask.as_deref_mut(),
        rowscale_out: rs_out.as_deref_mut(),
        redundancy: None,
    };
    // In place and out of place give the same bits (tests/dropout.rs): the out-of-place
    // reference serves both.
    cpu::forward(cfg, &d.x, &mut y, opts).unwrap();
    FwdOut {
        y,
        mask,
        rowscale_out: rs_out,
    }
}

fn gpu_forward<T: Dtype>(
    h: &Handle,
    c: &Case,
    cfg: &Config,
    d: &Data<T>,
) -> Result<FwdOut<T>, Box<dyn std::error::Error>> {
    let s = h.stream();
    let (off, n) = (c.offset, cfg.len());
    let sent = T::from_f32_rn(-7.0);
    let x = upload(s, &d.x, off, sent)?;
    let bias = d.bias.as_ref().map(|b| s.clone_htod(b)).transpose()?;
    let rs = d.rowscale.as_ref().map(|b| s.clone_htod(b)).transpose()?;
    let mut mask = c
        .mask
        .then(|| s.clone_htod(&vec![0xDEAD_BEEFu32; cfg.mask_words()]))
        .transpose()?;
    let path = matches!(c.rs, Rs::Path | Rs::PerSample);
    let mut rs_out = path
        .then(|| s.clone_htod(&vec![f32::NAN; c.rows]))
        .transpose()?;
    let r = upload(s, &d.r, off, sent)?;
    let opts = ForwardOptions {
        bias: bias.as_ref().map(|b| b.as_view()),
        residual: None,
        rowscale: rs.as_ref().map(|b| b.as_view()),
        mask_out: mask.as_mut().map(|b| b.as_view_mut()),
        rowscale_out: rs_out.as_mut().map(|b| b.as_view_mut()),
        redundancy: None,
        tuning: c.tuning,
    };
    let x = x.slice(off..off + n);
    let out = match c.res {
        Res::InPlace => {
            let mut r = r;
            dr::forward_inplace(h, cfg, &x, &mut r.slice_mut(off..off + n), opts)?;
            r
        }
        Res::None | Res::Out => {
            let opts = ForwardOptions {
                residual: (c.res == Res::Out).then(|| r.slice(off..off + n)),
                ..opts
            };
            let mut y = upload(s, &vec![poison::<T>(); n], off, sent)?;
            dr::forward(h, cfg, &x, &mut y.slice_mut(off..off + n), opts)?;
            y
        }
    };
    Ok(FwdOut {
        y: download(s, &out, off, sent, "y")?,
        mask: mask.map(|m| s.clone_dtoh(&m)).transpose()?,
        rowscale_out: rs_out.map(|m| s.clone_dtoh(&m)).transpose()?,
    })
}

struct BwdOut<T> {
    dx: Vec<T>,
    dbias: Option<Vec<T>>,
}

fn cpu_backward<T: Dtype>(c: &Case, cfg: &Config, d: &Data<T>, mask: Option<&[u32]>) -> BwdOut<T> {
    let mut dx = vec![poison::<T>(); cfg.len()];
    let mut dbias = c.dbias.then(|| vec![poison::<T>(); c.cols]);
    let opts = cpu::BackwardOptions {
        rowscale: d.rowscale.as_deref(),
        mask,
        dbias: dbias.as_deref_mut(),
    };
    cpu::backward(cfg, &d.dy, &mut dx, opts).unwrap();
    BwdOut { dx, dbias }
}

fn gpu_backward<T: Dtype>(
    h: &Handle,
    c: &Case,
    cfg: &Config,
    d: &Data<T>,
    mask: Option<&[u32]>,
    ws: Option<&mut Workspace>,
) -> Result<BwdOut<T>, Box<dyn std::error::Error>> {
    let s = h.stream();
    let (off, n) = (c.offset, cfg.len());
    let sent = T::from_f32_rn(-7.0);
    let dy = upload(s, &d.dy, off, sent)?;
    let mut dx = upload(s, &vec![poison::<T>(); n], off, sent)?;
    let rs = d.rowscale.as_ref().map(|b| s.clone_htod(b)).transpose()?;
    let mask = mask.map(|m| s.clone_htod(m)).transpose()?;
    let mut dbias = c
        .dbias
        .then(|| s.clone_htod(&vec![poison::<T>(); c.cols]))
        .transpose()?;
    let opts = BackwardOptions {
        rowscale: rs.as_ref().map(|b| b.as_view()),
        mask: mask.as_ref().map(|b| b.as_view()),
        dbias: dbias.as_mut().map(|b| b.as_view_mut()),
        workspace: ws,
        tuning: c.tuning,
        ..Default::default()
    };
    dr::backward(
        h,
        cfg,
        &dy.slice(off..off + n),
        &mut dx.slice_mut(off..off + n),
        opts,
    )?;
    Ok(BwdOut {
        dx: download(s, &dx, off, sent, "dx")?,
        dbias: dbias.map(|b| s.clone_dtoh(&b)).transpose()?,
    })
}

fn compare_fwd<T: Dtype>(what: &str, got: &FwdOut<T>, want: &FwdOut<T>) -> TestResult {
    bits_eq(&format!("{what}: y"), &got.y, &want.y)?;
    if let (Some(g), Some(w)) = (&got.mask, &want.mask) {
        bits_eq(&format!("{what}: mask"), g, w)?;
    }
    if let (Some(g), Some(w)) = (&got.rowscale_out, &want.rowscale_out) {
        bits_eq(&format!("{what}: rowscale_out"), g, w)?;
    }
    Ok(())
}

fn compare_bwd<T: Dtype>(what: &str, got: &BwdOut<T>, want: &BwdOut<T>) -> TestResult {
    bits_eq(&format!("{what}: dx"), &got.dx, &want.dx)?;
    if let (Some(g), Some(w)) = (&got.dbias, &want.dbias) {
        bits_eq(&format!("{what}: dbias"), g, w)?;
    }
    Ok(())
}

/// Forward, backward from the regenerated mask and backward from the bitmask, each against the
/// CPU reference bit for bit. Returns the GPU results for further comparisons.
fn run_case<T: Dtype>(
    h: &Handle,
    c: &Case,
    seed: u64,
) -> Result<(FwdOut<T>, BwdOut<T>), Box<dyn std::error::Error>> {
    let what = format!("{} {c:?} seed {seed}", T::KIND.name());
    let cfg = c.config(seed);
    let d = data::<T>(c, seed);
    let want = cpu_forward(c, &cfg, &d);
    let got = gpu_forward(h, c, &cfg, &d)?;
    compare_fwd(&format!("forward {what}"), &got, &want)?;
    let want_b = cpu_backward(c, &cfg, &d, None);
    let got_b = gpu_backward(h, c, &cfg, &d, None, None)?;
    compare_bwd(
        &format!("backward (regenerated mask) {what}"),
        &got_b,
        &want_b,
    )?;
    if let Some(mask) = &got.mask {
        // From the bitmask: identical to regenerating (the CPU proves that separately).
        let got_m = gpu_backward(h, c, &cfg, &d, Some(mask), None)?;
        compare_bwd(&format!("backward (from bitmask) {what}"), &got_m, &want_b)?;
    }
    Ok((got, got_b))
}

/// [`run_case`] for each residual variant in `res`.
fn run_each<T: Dtype>(h: &Handle, c: &Case, res: &[Res], seed: u64) -> TestResult {
    for &r in res {
        run_case::<T>(h, &c.with(r), seed)?;
    }
    Ok(())
}

fn flat_sizes<T: Dtype>(h: &Handle) -> TestResult {
    for (k, &n) in [1usize, 3, 4095, 65537, 3 * (1 << 20) + 7]
        .iter()
        .enumerate()
    {
        let mut c = Case::new(1, n);
        run_each::<T>(h, &c, &ALL_RES, 100 + k as u64)?;
        if (3..100_000).contains(&n) {
            c.offset = 1; // misaligned views: the scalar path
            run_each::<T>(h, &c, &ALL_RES, 200 + k as u64)?;
        }
    }
    // A [rows, cols] tensor without bias or row scale runs flat: same results.
    run_each::<T>(h, &Case::new(129, 1000 + 3), &ALL_RES, 300)
}

fn shapes<T: Dtype>(h: &Handle) -> TestResult {
    let base = |rows, cols| Case {
        bias: true,
        dbias: true,
        ..Case::new(rows, cols)
    };
    let cases = [
        // cols not a multiple of 8: the scalar path (mask via atomics).
        Case {
            rs: Rs::Given,
            ..base(37, 1003)
        },
        // The vector path, drop path generated (257 rows: a partial last slab).
        Case {
            rs: Rs::Path,
            ..base(257, 1024)
        },
        // A per-sample drop path.
        Case {
            rs: Rs::PerSample,
            ..base(257, 1024)
        },
        // A caller row scale and no mask, views starting at element 1.
        Case {
            rs: Rs::Given,
            mask: false,
            offset: 1,
            ..base(64, 512)
        },
        // Misaligned views of a shape that would take the vector path.
        Case {
            offset: 1,
            ..base(40, 1024)
        },
        // cols % 8 == 4: the scalar path for 16-bit types; for f32 the vector path without a
        // mask and the scalar path with one (two lanes could not share a mask byte).
        Case {
            mask: false,
            ..base(40, 1028)
        },
        base(40, 1028),
        // Many rows, few columns: inactive lanes in every warp.
        Case {
            rs: Rs::Path,
            ..base(3000, 5)
        },
    ];
    for (k, c) in cases.iter().enumerate() {
        run_each::<T>(h, c, &ALL_RES, 400 + k as u64)?;
    }
    Ok(())
}

fn edge_rates<T: Dtype>(h: &Handle) -> TestResult {
    for (k, p) in [0.0, 1.0].into_iter().enumerate() {
        for rs in [Rs::None, Rs::Path] {
            let c = Case {
                p,
                rs,
                bias: true,
                dbias: true,
                ..Case::new(100, 264)
            };
            run_each::<T>(h, &c, &ALL_RES, 500 + k as u64)?;
        }
        let c = Case {
            p,
            ..Case::new(1, 10_001)
        };
        run_each::<T>(h, &c, &ALL_RES, 510 + k as u64)?;
    }
    Ok(())
}

/// Block size, unroll, grid.x cap (the column-tile loop), the forced scalar path, slab heights
/// and flat row widths change nothing: y, mask, rowscale_out, dx and dbias are identical bits,
/// without and with a residual.
fn launch_configurations_agree(h: &Handle) -> TestResult {
    let tunings = [
        LaunchTuning {
            block: 64,
            unroll: false,
            ..Default::default()
        },
        LaunchTuning {
            block: 32,
            max_grid_x: 1,
            ..Default::default()
        },
        LaunchTuning {
            force_scalar: true,
            block: 128,
            ..Default::default()
        },
        // Other slab heights for launches without partials, another flat row width (flat
        // tensors are cut into rows plus a one-row remainder).
        LaunchTuning {
            slab_rows: 3,
            flat_width: 2080,
            ..Default::default()
        },
    ];
    let shaped = (257, 1024, 70, 4104);
    let bases = [
        Case {
            bias: true,
            dbias: true,
            rs: Rs::Path,
            ..Case::new(shaped.0, shaped.1)
        },
        Case {
            bias: true,
            dbias: true,
            rs: Rs::Path,
            ..Case::new(shaped.2, shaped.3)
        },
        // Flat tensors (no bias, no row scale): the row layout is free, the bits are not.
        Case::new(1, 200_003),
        Case::new(1, 1 << 16),
    ];
    for base in bases {
        for res in [Res::None, Res::Out] {
            let base = base.with(res);
            let (f0, b0) = run_case::<bf16>(h, &base, 600)?;
            let (g0, c0) = run_case::<f32>(h, &base, 601)?;
            for (k, t) in tunings.iter().enumerate() {
                let c = Case { tuning: *t, ..base };
                let what = format!("{}x{} {res:?} tuning {k}", c.rows, c.cols);
                let (f1, b1) = run_case::<bf16>(h, &c, 600)?;
                compare_fwd(&format!("bf16 {what} forward"), &f1, &f0)?;
                compare_bwd(&format!("bf16 {what} backward"), &b1, &b0)?;
                let (g1, c1) = run_case::<f32>(h, &c, 601)?;
                compare_fwd(&format!("f32 {what} forward"), &g1, &g0)?;
                compare_bwd(&format!("f32 {what} backward"), &c1, &c0)?;
            }
        }
    }
    Ok(())
}

/// 16-bit keying on every path (see `keying_at`).
fn sixteen_bit_keying<T: Dtype>(h: &Handle) -> TestResult {
    keying_at::<T>(h, MaskResolution::Bits16, 1000)
}

/// 8-bit keying on every path (see `keying_at`).
fn eight_bit_keying<T: Dtype>(h: &Handle) -> TestResult {
    keying_at::<T>(h, MaskResolution::Bits8, 2000)
}

/// Keying at `resolution` on every path, without and with a residual: flat (vector, scalar at
/// view offset 1, a one-row remainder), shaped with bias, dbias, row scales and the mask (f32
/// with cols % 8 == 4: the scalar path), p = 0 and 1; and launch configurations change no bit.
fn keying_at<T: Dtype>(h: &Handle, resolution: MaskResolution, seed: u64) -> TestResult {
    let keyed = |c: Case| Case { resolution, ..c };
    let shaped = |rows, cols| Case {
        bias: true,
        dbias: true,
        ..Case::new(rows, cols)
    };
    let cases = [
        keyed(Case::new(1, 65_537)),
        keyed(Case::new(1, 3 * (1 << 20) + 7)),
        keyed(Case {
            offset: 1,
            ..Case::new(1, 4095)
        }),
        keyed(shaped(257, 1024)),
        keyed(Case {
            rs: Rs::Path,
            ..shaped(130, 1028)
        }),
        keyed(Case {
            rs: Rs::Given,
            offset: 1,
            ..shaped(37, 1003)
        }),
        keyed(Case {
            p: 0.0,
            ..shaped(64, 264)
        }),
        keyed(Case {
            p: 1.0,
            ..shaped(64, 264)
        }),
    ];
    for (k, c) in cases.iter().enumerate() {
        run_each::<T>(h, c, &ALL_RES, seed + k as u64)?;
    }
    for res in ALL_RES {
        let base = keyed(Case {
            rs: Rs::PerSample,
            res,
            ..shaped(257, 1024)
        });
        let (f0, b0) = run_case::<T>(h, &base, seed + 100)?;
        for (k, t) in [
            LaunchTuning {
                block: 64,
                unroll: false,
                ..Default::default()
            },
            LaunchTuning {
                force_scalar: true,
                ..Default::default()
            },
        ]
        .into_iter()
        .enumerate()
        {
            let (f1, b1) = run_case::<T>(h, &Case { tuning: t, ..base }, seed + 100)?;
            compare_fwd(
                &format!("{resolution:?} {res:?} tuning {k} forward"),
                &f1,
                &f0,
            )?;
            compare_bwd(
                &format!("{resolution:?} {res:?} tuning {k} backward"),
                &b1,
                &b0,
            )?;
        }
    }
    Ok(())
}

/// A config without an explicit resolution keys at the dtype's default on the GPU (16 bits for
/// bf16, 32 for f32: `MaskResolution::default_for`): forward (outputs and mask) and the
/// backward that regenerates the mask give the explicit resolution's bits, and the CPU
/// reference with the same unset config agrees.
fn default_keying<T: Dtype>(h: &Handle) -> TestResult {
    let c = Case {
        bias: true,
        dbias: true,
        resolution: MaskResolution::default_for(T::KIND),
        ..Case::new(257, 1024)
    };
    let seed = 3000;
    let explicit = c.config(seed);
    let unset = Config::new(c.rows, c.cols, c.p, seed, 0x1234_5678_9abc).unwrap();
    assert_eq!(unset.resolution(), None);
    let d = data::<T>(&c, seed);
    let got = gpu_forward(h, &c, &unset, &d)?;
    compare_fwd(
        "default forward vs explicit",
        &got,
        &gpu_forward(h, &c, &explicit, &d)?,
    )?;
    compare_fwd("default forward vs CPU", &got, &cpu_forward(&c, &unset, &d))?;
    let got_b = gpu_backward(h, &c, &unset, &d, None, None)?;
    compare_bwd(
        "default backward vs explicit",
        &got_b,
        &gpu_backward(h, &c, &explicit, &d, None, None)?,
    )?;
    compare_bwd(
        "default backward vs CPU",
        &got_b,
        &cpu_backward(&c, &unset, &d, None),
    )
}

/// dbias is identical across repeated runs, with and without a reused workspace.
fn dbias_is_deterministic(h: &Handle) -> TestResult {
    let c = Case {
        bias: true,
        dbias: true,
        ..Case::new(4096, 768)
    };
    let cfg = c.config(700);
    let d = data::<bf16>(&c, 700);
    let want = cpu_backward(&c, &cfg, &d, None);
    let mut ws = Workspace::new();
    for run in 0..4 {
        let got = gpu_backward(h, &c, &cfg, &d, None, (run % 2 == 1).then_some(&mut ws))?;
        compare_bwd(&format!("run {run}"), &got, &want)?;
    }
    if ws.capacity() == 0 {
        return Err("the workspace was not used".into());
    }
    Ok(())
}

/// More than 256 rows per slab (rows > 256 * 65535): the row scales are staged in several
/// chunks per slab.
fn row_scales_staged_in_chunks(h: &Handle) -> TestResult {
    let c = Case {
        rows: 256 * 65_535 + 300,
        cols: 1,
        bias: true,
        dbias: true,
        rs: Rs::Path,
        mask: true,
        // One column: a block of 32 threads wastes less than one of 256 (31 idle lanes).
        tuning: LaunchTuning {
            block: 32,
            ..Default::default()
        },
        ..Case::new(1, 1)
    };
    if dr::slab_rows(c.rows, 1, fusedreg::DtypeKind::F32) <= 256 {
        return Err("the case does not reach several chunks per slab".into());
    }
    run_each::<f32>(h, &c, &[Res::None, Res::InPlace], 800)
}

fn empty_inputs_launch_nothing(h: &Handle) -> TestResult {
    let s = h.stream();
    let before = h.launch_count();
    let empty = s.alloc_zeros::<bf16>(0)?;
    let mut empty_out = s.alloc_zeros::<bf16>(0)?;
    let cfg = Config::new(0, 64, 0.5, 1, 2)?;
    dr::forward(h, &cfg, &empty, &mut empty_out, ForwardOptions::default())?;
    let opts = ForwardOptions {
        residual: Some(empty.as_view()),
        ..Default::default()
    };
    dr::forward(h, &cfg, &empty, &mut empty_out, opts)?;
    let mut dbias = s.clone_htod(&vec![bf16::NAN; 64])?;
    let opts = BackwardOptions {
        dbias: Some(dbias.as_view_mut()),
        ..Default::default()
    };
    dr::backward(h, &cfg, &empty, &mut empty_out, opts)?;
    let flat = Config::flat(0, 0.5, 1, 2)?;
    let mut mask = s.alloc_zeros::<u32>(0)?;
    let mut ub = unfused::Unfused::<bf16>::new(h);
    let mut m8 = s.alloc_zeros::<u8>(0)?;
    ub.forward(&flat, &empty, None, None, &mut empty_out, &mut m8)?;
    ub.forward(
        &flat,
        &empty,
        None,
        Some(empty.as_view()),
        &mut empty_out,
        &mut m8,
    )?;
    let opts = ForwardOptions {
        mask_out: Some(mask.as_view_mut()),
        ..Default::default()
    };
    dr::forward(h, &flat, &empty, &mut empty_out, opts)?;
    let opts = ForwardOptions {
        mask_out: Some(mask.as_view_mut()),
        ..Default::default()
    };
    dr::forward_inplace(h, &flat, &empty, &mut empty_out, opts)?;
    launches(h, before, 0, "empty input")?;
    let db = s.clone_dtoh(&dbias)?;
    if db.iter().any(|v| v.to_f32() != 0.0) {
        return Err("dbias of zero rows is not zero".into());
    }
    Ok(())
}

fn unfused_mirror<T: Dtype>(h: &Handle) -> TestResult {
    let s = h.stream();
    let mut baseline = unfused::Unfused::<T>::new(h);
    for (k, (rows, cols, bias, off)) in [
        (257usize, 1024usize, true, 0usize),
        (37, 1003, true, 0),
        (1, 65_537, false, 0),
        (16, 512, true, 1),
    ]
    .into_iter()
    .enumerate()
    {
        for residual in [false, true] {
            let c = Case {
                bias,
                dbias: bias,
                offset: off,
                ..Case::new(rows, cols)
            };
            let c = c.with(if residual { Res::Out } else { Res::None });
            let cfg = c.config(900 + k as u64);
            let d = data::<T>(&c, 900 + k as u64);
            let n = cfg.len();
            let what = format!(
                "unfused {} {rows}x{cols} bias {bias} residual {residual} offset {off}",
                T::KIND.name()
            );
            // CPU mirror.
            let mut y_want = vec![T::default(); n];
            let mut m_want = vec![0u8; n];
            let r_cpu = residual.then_some(&d.r[..]);
            unfused::forward_cpu(
                &cfg,
                &d.x,
                d.bias.as_deref(),
                r_cpu,
                &mut y_want,
                &mut m_want,
            )?;
            let mut dx_want = vec![T::default(); n];
            let mut db_want = bias.then(|| vec![T::default(); cols]);
            unfused::backward_cpu(&cfg, &d.dy, &m_want, &mut dx_want, db_want.as_deref_mut())?;
            // GPU.
            let sent = T::from_f32_rn(-7.0);
            let x = upload(s, &d.x, off, sent)?;
            let r = upload(s, &d.r, off, sent)?;
            let b = d.bias.as_ref().map(|b| s.clone_htod(b)).transpose()?;
            let mut y = upload(s, &vec![poison::<T>(); n], off, sent)?;
            let mut m8 = upload(s, &vec![0xA5u8; n], off, 0x5A)?;
            baseline.forward(
                &cfg,
                &x.slice(off..off + n),
                b.as_ref().map(|b| b.as_view()),
                residual.then(|| r.slice(off..off + n)),
                &mut y.slice_mut(off..off + n),
                &mut m8.slice_mut(off..off + n),
            )?;
            bits_eq(
                &format!("{what}: y"),
                &download(s, &y, off, sent, "y")?,
                &y_want,
            )?;
            let m_all = s.clone_dtoh(&m8)?;
            bits_eq(&format!("{what}: mask"), &m_all[off..off + n], &m_want)?;
            let dy = upload(s, &d.dy, off, sent)?;
            let mut dx = upload(s, &vec![poison::<T>(); n], off, sent)?;
            let mut db = bias
                .then(|| s.clone_htod(&vec![poison::<T>(); cols]))
                .transpose()?;
            baseline.backward(
                &cfg,
                &dy.slice(off..off + n),
                &m8.slice(off..off + n),
                &mut dx.slice_mut(off..off + n),
                db.as_mut().map(|b| b.as_view_mut()),
            )?;
            bits_eq(
                &format!("{what}: dx"),
                &download(s, &dx, off, sent, "dx")?,
                &dx_want,
            )?;
            if let (Some(db), Some(want)) = (db, &db_want) {
                bits_eq(&format!("{what}: dbias"), &s.clone_dtoh(&db)?, want)?;
            }
            // The byte mask equals the fused bitmask.
            let fused = cpu_forward(&c, &cfg, &d);
            let bm = fused.mask.expect("mask requested");
            for i in 0..n {
                if (m_want[i] == 1) != (bm[i / 32] >> (i % 32) & 1 == 1) {
                    return Err(format!("{what}: byte mask and bitmask differ at {i}").into());
                }
            }
        }
    }
    Ok(())
}

/// `r` must be the error named by `is`; says which call and what came back otherwise.
fn expect(what: &str, r: fusedreg::Result<()>, is: fn(&Error) -> bool) -> TestResult {
    match &r {
        Err(e) if is(e) => Ok(()),
        _ => Err(format!("{what}: {r:?}").into()),
    }
}

fn bad_input_is_an_error(h: &Handle) -> TestResult {
    let shape = |e: &Error| matches!(e, Error::ShapeMismatch { .. });
    let invalid = |e: &Error| matches!(e, Error::InvalidArgument { .. });
    let s = h.stream();
    let cfg = Config::new(4, 8, 0.1, 1, 1)?;
    let x = s.alloc_zeros::<f32>(32)?;
    let short = s.alloc_zeros::<f32>(31)?;
    let mut y = s.alloc_zeros::<f32>(32)?;
    let r = dr::forward(h, &cfg, &short, &mut y, ForwardOptions::default());
    expect("short x", r, shape)?;
    let opts = ForwardOptions {
        residual: Some(short.as_view()),
        ..Default::default()
    };
    expect(
        "short residual",
        dr::forward(h, &cfg, &x, &mut y, opts),
        shape,
    )?;
    let mut short_stream = s.alloc_zeros::<f32>(31)?;
    let r = dr::forward_inplace(h, &cfg, &x, &mut short_stream, ForwardOptions::default());
    expect("short stream in place", r, shape)?;
    let opts = ForwardOptions {
        residual: Some(x.as_view()),
        ..Default::default()
    };
    let r = dr::forward_inplace(h, &cfg, &x, &mut y, opts);
    expect("a second residual in place", r, invalid)?;
    let bias = s.alloc_zeros::<f32>(7)?;
    let opts = ForwardOptions {
        bias: Some(bias.as_view()),
        residual: Some(x.as_view()),
        ..Default::default()
    };
    expect("short bias", dr::forward(h, &cfg, &x, &mut y, opts), shape)?;
    let mut mask = s.alloc_zeros::<u32>(2)?;
    let opts = ForwardOptions {
        mask_out: Some(mask.as_view_mut()),
        ..Default::default()
    };
    expect("short mask", dr::forward(h, &cfg, &x, &mut y, opts), shape)?;
    let with_path = cfg.with_drop_path(DropPath::new(0.2, 3)?);
    let rs = s.alloc_zeros::<f32>(4)?;
    let opts = ForwardOptions {
        rowscale: Some(rs.as_view()),
        ..Default::default()
    };
    let r = dr::forward(h, &with_path, &x, &mut y, opts);
    expect("rowscale with a drop path", r, invalid)?;
    let opts = ForwardOptions {
        tuning: LaunchTuning {
            block: 512,
            ..Default::default()
        },
        ..Default::default()
    };
    expect("block 512", dr::forward(h, &cfg, &x, &mut y, opts), invalid)?;
    let opts = BackwardOptions {
        tuning: LaunchTuning {
            block: 48,
            ..Default::default()
        },
        ..Default::default()
    };
    expect("block 48", dr::backward(h, &cfg, &x, &mut y, opts), invalid)?;
    let mut m8 = s.alloc_zeros::<u8>(32)?;
    let r = unfused::Unfused::<f32>::new(h).forward(&with_path, &x, None, None, &mut y, &mut m8);
    expect("unfused with a drop path", r, invalid)?;
    let r = unfused::Unfused::<f32>::new(h).forward(
        &cfg.with_resolution(MaskResolution::Bits16),
        &x,
        None,
        Some(x.as_view()),
        &mut y,
        &mut m8,
    );
    expect("unfused with 16-bit keying", r, invalid)
}
