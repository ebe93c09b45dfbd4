//! The multi-tensor AdamW kernels of `kernels/adamw.cu` under host emulation against the CPU
//! reference, bit for bit: stochastic rounding (16-bit randoms, one Philox block per 8 elements,
//! bf16 rounded on the f32's bits) for f16 and bf16 params, f32 and bf16 grads, every state
//! layout, two steps, a tensor crossing a chunk, tails of the 8-element groups and a misaligned
//! view (the element-by-element path). Needs the emulator's dumps, so it is ignored by default;
//! `scripts/emu/adamw_vs_cpu.sh` runs the three steps:
//!
//! ```text
//! g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
//!     -DKFILE='"'$PWD/kernels/adamw.cu'"' -include scripts/emu/shim.h \
//!     -o /tmp/adamw-emu scripts/emu/cases/adamw.cpp
//! mkdir -p /tmp/adamw-dump && ADAMW_DUMP=/tmp/adamw-dump /tmp/adamw-emu
//! ADAMW_DUMP=/tmp/adamw-dump cargo test --test adamw_emu -- --ignored
//! ```
//!
//! The dump format is written by `dump_case()` in `scripts/emu/cases/adamw.cpp`.

#[path = "common/dump.rs"]
mod dump;

use dump::{differ, dump_files, Rd};
use fusedreg::adamw::{cpu, AdamWConfig, MasterWeights, MomentDtype, Rounding, StateOptions};
use fusedreg::Dtype;
use half::{bf16, f16};

/// Counts the elements whose bits differ (any NaN equals any NaN), with the first few named.
fn diff<T: Dtype>(what: &str, got: &[T], want: &[T], fails: &mut Vec<String>) -> usize {
    let mut bad = 0;
    for i in 0..got.len() {
        if differ(&got[i], &want[i]) {
            let (g, w) = (got[i].to_f32(), want[i].to_f32());
            bad += 1;
            if fails.len() < 6 {
                fails.push(format!("{what}[{i}] emu {g:e} cpu {w:e}"));
            }
        }
    }
    bad
}

fn check<P: Dtype + bytemuck::Pod, G: Dtype + bytemuck::Pod>(
    layout: u64,
    seed: u64,
    r: &mut Rd,
) -> Result<usize, String> {
    let steps = r.u64() as usize;
    let ntensors = r.u64() as usize;
    let lrs: Vec<f32> = r.arr(steps);
    let options = StateOptions {
        moments: if layout & 1 == 1 {
            MomentDtype::Bf16
        } else {
            MomentDtype::F32
        },
        master: if layout & 2 == 2 {
            MasterWeights::None
        } else {
            MasterWeights::F32
        },
    };
    let cfg = AdamWConfig {
        rounding: Rounding::Stochastic { seed },
        state: options,
        ..Default::default()
    };
    let mut ts = Vec::new();
    let mut grads = Vec::new();
    let mut outs = Vec::new();
    for _ in 0..ntensors {
        let n = r.u64() as usize;
        let wd: f32 = r.arr::<f32>(1)[0];
        let p0: Vec<P> = r.arr(n);
        let gs: Vec<Vec<G>> = (0..steps).map(|_| r.arr(n)).collect();
        let p: Vec<P> = r.arr(n);
        let m: Vec<f32> = r.arr(n);
        let v: Vec<f32> = r.arr(n);
        let master: Option<Vec<f32>> = (layout & 2 == 0).then(|| r.arr(n));
        ts.push(cpu::CpuTensor::<P, G>::with_state(p0, gs[0].clone(), wd, options).unwrap());
        grads.push(gs);
        outs.push((p, m, v, master));
    }
    assert_eq!(r.o, r.b.len(), "trailing bytes: the dump format changed");
    for (s, &lr) in lrs.iter().enumerate() {
        for (t, g) in ts.iter_mut().zip(&grads) {
            t.grad = g[s].clone();
        }
        cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(lr), &[]).map_err(|e| e.to_string())?;
    }
    let mut fails = Vec::new();
    let mut bad = 0;
    let mut elems = 0;
    for (k, (t, (p, m, v, master))) in ts.iter().zip(&outs).enumerate() {
        bad += diff(&format!("tensor {k} param"), p, &t.param, &mut fails);
        bad += diff(&format!("tensor {k} m"), m, &t.m, &mut fails);
        bad += diff(&format!("tensor {k} v"), v, &t.v, &mut fails);
        if let (Some(a), Some(b)) = (master, &t.master) {
            bad += diff(&format!("tensor {k} master"), a, b, &mut fails);
        }
        elems += p.len();
    }
    if bad > 0 {
        return Err(format!("{bad} values differ: {}", fails.join("; ")));
    }
    Ok(elems)
}

#[test]
#[ignore = "needs the emulator's dumps: ADAMW_DUMP=<dir> (see the file's docs)"]
fn emulated_kernels_match_the_cpu_reference() {
    let dir = std::env::var("ADAMW_DUMP").expect("ADAMW_DUMP=<dir of NNNN.bin>");
    let files = dump_files(&dir, "");
    assert_eq!(files.len(), 16, "expected 16 dumped cases in {dir}");
    let mut errors = Vec::new();
    let mut elems = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let mut r = Rd { b: &bytes, o: 0 };
        let (pk, gk, layout, seed) = (r.u64(), r.u64(), r.u64(), r.u64());
        let res = match (pk, gk) {
            (1, 0) => check::<f16, f32>(layout, seed, &mut r),
            (1, 2) => check::<f16, bf16>(layout, seed, &mut r),
            (2, 0) => check::<bf16, f32>(layout, seed, &mut r),
            (2, 2) => check::<bf16, bf16>(layout, seed, &mut r),
            _ => Err(format!("unknown kinds p {pk} g {gk}")),
        };
        match res {
            Ok(n) => elems += n,
            Err(e) => errors.push(format!("{}: {e}", f.display())),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(elems > 16 * 65536, "{elems} elements checked");
}
