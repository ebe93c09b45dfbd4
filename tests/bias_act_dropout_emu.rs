//! The kernels of `kernels/bias_act_dropout.cu` under host emulation against the CPU reference:
//! the `Math::Fast` cases within the bounds stated in the module docs (with the emulator's
//! deterministic model of the special-function unit), the `Math::Exact` cases with 16-bit and
//! 8-bit keying and the ReLU vector kernel bit for bit; the mask and the dropped `+0` exact in every case.
//! Needs the emulator's dumps, so it is ignored by default:
//!
//! ```text
//! g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
//!     -DKFILE='"'$PWD/kernels/bias_act_dropout.cu'"' -include scripts/emu/shim.h \
//!     -o /tmp/bad-emu scripts/emu/cases/bias_act_dropout.cpp
//! mkdir -p /tmp/bad-dump && BAD_DUMP=/tmp/bad-dump /tmp/bad-emu
//! BAD_DUMP=/tmp/bad-dump cargo test --test bias_act_dropout_emu -- --ignored
//! ```
//!
//! (`scripts/emu/bias_act_dropout_vs_cpu.sh` runs the three steps.) The dump format is written
//! by `run_new()` in `scripts/emu/cases/bias_act_dropout.cpp`.
#![allow(clippy::needless_range_loop)]

#[path = "common/bias_act_fast.rs"]
mod fastcheck;

#[path = "common/dump.rs"]
mod dump;

use dump::{differ, dump_files, Rd};
use fusedreg::bias_act_dropout::{cpu, Activation, Config, Preact};
use fusedreg::dropping::MaskResolution;
use fusedreg::{Dtype, Math};
use half::{bf16, f16};

/// Bit for bit, any NaN equal to any NaN.
fn same<T: Dtype>(what: &str, got: &[T], want: &[T], fails: &mut fastcheck::Failures) {
    for i in 0..got.len() {
        if differ(&got[i], &want[i]) {
            let (g, w) = (got[i].to_f32(), want[i].to_f32());
            fails.count += 1;
            if fails.first.len() < 6 {
                fails.first.push(format!("{what}[{i}] emu {g:e} cpu {w:e}"));
            }
        }
    }
}

struct Header {
    rows: usize,
    cols: usize,
    fast: bool,
    bias: bool,
    h_out: bool,
    from_h: bool,
    dbias: bool,
    cfg: Config,
}

fn check<T: Dtype + bytemuck::Pod>(hd: &Header, r: &mut Rd) -> Result<(), String> {
    let (n, cols) = (hd.rows * hd.cols, hd.cols);
    let x: Vec<T> = r.arr(n);
    let b: Vec<T> = r.arr(cols);
    let dy: Vec<T> = r.arr(n);
    let y: Vec<T> = r.arr(n);
    let h: Vec<T> = r.arr(n);
    let dx: Vec<T> = r.arr(n);
    let db: Vec<T> = r.arr(cols);
    let cfg = &hd.cfg;
    let bias = hd.bias.then_some(&b[..]);
    let mut fails = fastcheck::Failures::default();

    // The CPU reference (the exact mode, whatever the case's mode).
    let mut y_ref = vec![T::from_f32_rn(0.0); n];
    let mut h_ref = vec![T::from_f32_rn(0.0); n];
    cpu::forward(cfg, &x, bias, &mut y_ref, Some(&mut h_ref)).map_err(|e| e.to_string())?;
    if hd.h_out {
        same("h", &h, &h_ref, &mut fails);
    }
    let pre = if hd.from_h {
        Preact::H(&h[..])
    } else {
        Preact::X { x: &x[..], bias }
    };
    let mut dx_ref = vec![T::from_f32_rn(0.0); n];
    let mut db_ref = vec![T::from_f32_rn(0.0); cols];
    cpu::backward(cfg, &dy, pre, &mut dx_ref, Some(&mut db_ref)).map_err(|e| e.to_string())?;

    if hd.fast {
        // The f32 pre-activation of each element, as the kernels computed it.
        let h_fwd: Vec<f32> = (0..n)
            .map(|i| match bias {
                Some(b) => x[i].to_f32() + b[i % cols].to_f32(),
                None => x[i].to_f32(),
            })
            .collect();
        let h_bwd: Vec<f32> = if hd.from_h {
            h.iter().map(|v| v.to_f32()).collect()
        } else {
            h_fwd.clone()
        };
        fastcheck::check_forward(cfg, &h_fwd, &y, &mut fails);
        fastcheck::check_backward(
            cfg,
            &h_bwd,
            &dy,
            &dx,
            hd.dbias.then_some(&db[..]),
            &mut fails,
        );
    } else {
        same("y", &y, &y_ref, &mut fails);
        same("dx", &dx, &dx_ref, &mut fails);
        if hd.dbias {
            same("dbias", &db, &db_ref, &mut fails);
        }
    }
    fails.result("")
}

#[test]
#[ignore = "needs the emulator's dumps: BAD_DUMP=<dir> (see the file's docs)"]
fn emulated_kernels_match_the_cpu_reference() {
    let dir = std::env::var("BAD_DUMP").expect("BAD_DUMP=<dir of case*.bin>");
    let paths = dump_files(&dir, "");
    assert!(!paths.is_empty(), "no dumps in {dir}");
    let (mut bad, mut fast_cases) = (Vec::new(), 0);
    for p in &paths {
        let bytes = std::fs::read(p).unwrap();
        let mut r = Rd { b: &bytes, o: 0 };
        let dt = r.u64();
        let (rows, cols) = (r.u64() as usize, r.u64() as usize);
        let act = Activation::ALL[r.u64() as usize];
        let math = r.u64();
        let res = match r.u64() {
            0 => MaskResolution::Bits32,
            1 => MaskResolution::Bits16,
            _ => MaskResolution::Bits8,
        };
        let _vec = r.u64();
        let (bias, h_out, from_h, dbias) = (r.u64() != 0, r.u64() != 0, r.u64() != 0, r.u64() != 0);
        let (seed, call) = (r.u64(), r.u64());
        let prob = f64::from_bits(r.u64());
        let fast = math == 1 && act != Activation::Relu;
        let cfg = Config::new(rows, cols, act, prob, seed, call)
            .unwrap()
            .with_math(if fast { Math::Fast } else { Math::Exact })
            .with_resolution(res);
        fast_cases += fast as usize;
        let hd = Header {
            rows,
            cols,
            fast,
            bias,
            h_out,
            from_h,
            dbias,
            cfg,
        };
        let out = match dt {
            0 => check::<f32>(&hd, &mut r),
            1 => check::<f16>(&hd, &mut r),
            _ => check::<bf16>(&hd, &mut r),
        };
        if let Err(e) = out {
            bad.push(format!(
                "{}: dt {dt} {rows}x{cols} {act:?} fast {fast} {res:?} p {prob}{e}",
                p.display()
            ));
        }
    }
    eprintln!(
        "{} emulated cases ({fast_cases} Math::Fast) checked",
        paths.len()
    );
    assert!(
        bad.is_empty(),
        "{} cases failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
