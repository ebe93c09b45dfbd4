//! The kernels of `kernels/dropout_add_norm.cu` run under host emulation against the CPU
//! reference, bit for bit (NaNs compared as NaN: the GPU's are canonical). Needs the emulator's
//! dumps, so it is ignored by default:
//!
//! ```text
//! g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
//!     -DKFILE='"'$PWD/kernels/dropout_add_norm.cu'"' -include scripts/emu/shim.h \
//!     -o /tmp/dan-emu scripts/emu/cases/dropout_add_norm.cpp
//! mkdir -p /tmp/dan-dump && DAN_DUMP=/tmp/dan-dump /tmp/dan-emu
//! DAN_DUMP=/tmp/dan-dump cargo test --test dropout_add_norm_emu -- --ignored
//! ```
//!
//! The dump format is written by `run()` in `scripts/emu/cases/dropout_add_norm.cpp` (files
//! `case*.bin`; flags 128 / 256 mark the 16- / 8-bit keying cases). `scripts/emu/redundancy_vs_cpu.sh`
//! runs this test and `tests/redundancy_emu.rs` on one set of dumps.
#[path = "common/dan.rs"]
mod dan;
#[path = "common/dan_dump.rs"]
mod dan_dump;
#[path = "common/dump.rs"]
mod dump;

use dan::DanOut;
use dan_dump::{check_kinds, forward_mismatches, DanCase};
use dump::{for_each_dump, mismatches, Rd};
use fusedreg::dropout_add_norm::cpu;
use fusedreg::Dtype;

fn check<T: Dtype, S: Dtype>(name: &str, r: &mut Rd) -> usize {
    let c = DanCase::<T, S>::read(r);
    let (rows, cols, flags, n) = (c.rows, c.cols, c.flags, c.rows * c.cols);
    let d_out: Vec<T> = r.arr(n);
    let d_s: Option<Vec<S>> = (flags & 32 != 0).then(|| r.arr(n));
    let want = c.read_forward(r);
    let e_dx: Vec<T> = r.arr(n);
    let e_dres: Option<Vec<S>> = (flags & 1 != 0).then(|| r.arr(n));
    let e_dg: Vec<T> = r.arr(cols);
    let e_db: Vec<T> = r.arr(cols);
    let e_dbias: Vec<T> = r.arr(cols);
    let mut got = DanOut::new(rows, cols);
    cpu::forward(&c.cfg, c.inputs.args(), got.outs()).unwrap();
    let mut bad = forward_mismatches(&want, &got);
    // Backward from the emulated forward's outputs (identical when the above agree).
    let (mut dx, mut dres, mut dg, mut db, mut dbias) = (
        vec![T::default(); n],
        vec![S::default(); n],
        vec![T::default(); cols],
        vec![T::default(); cols],
        vec![T::default(); cols],
    );
    let args = cpu::BackwardArgs {
        d_s: d_s.as_deref(),
        rowscale: c.inputs.rowscale.as_deref(),
        ..cpu::BackwardArgs::new(&d_out, &want.s, &c.inputs.gamma, &want.mean, &want.rstd)
    };
    let outs = cpu::BackwardOut {
        d_residual: Some(&mut dres),
        dbeta: Some(&mut db),
        dbias: Some(&mut dbias),
        ..cpu::BackwardOut::new(&mut dx, &mut dg)
    };
    cpu::backward(&c.cfg, args, outs).unwrap();
    bad += mismatches("dx", &e_dx, &dx)
        + mismatches("dgamma", &e_dg, &dg)
        + mismatches("dbeta", &e_db, &db)
        + mismatches("dbias", &e_dbias, &dbias);
    if let Some(e) = e_dres {
        bad += mismatches("d_residual", &e, &dres);
    }
    if bad > 0 {
        eprintln!(
            "{name}: {rows}x{cols} flags {flags:#x} p {} {bad} mismatches",
            c.p
        );
    }
    bad
}

#[test]
#[ignore = "needs DAN_DUMP=<dir> of dumps from the emulated kernels (see the file's docs)"]
fn emulated_kernels_match_the_cpu_reference() {
    let dir = std::env::var("DAN_DUMP").expect("DAN_DUMP: the directory of the emulator's dumps");
    // The case*.bin dumps only: the same directory holds the statistics cases' stats*.bin
    // (another format, tests/redundancy_emu.rs) when the emulator ran all of its cases.
    let (mut total, mut cases) = (0, 0);
    for_each_dump(&dir, "case", |name, r| {
        total += check_kinds!(check, name, r);
        cases += 1;
    });
    eprintln!("{cases} cases checked");
    assert!(cases > 0);
    assert_eq!(total, 0);
}
