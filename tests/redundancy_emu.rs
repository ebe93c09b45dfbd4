//! The Block Influence statistics of `kernels/dropout_add_norm.cu` (the `*_stats_*` forwards)
//! run under host emulation against the CPU reference's meter: the site's three words (cosine
//! sum, rows, non-finite rows) bit for bit, and the outputs with them. Needs the emulator's
//! dumps, so it is ignored by default; `scripts/emu/redundancy_vs_cpu.sh` builds and runs the
//! emulator and then this test:
//!
//! ```text
//! g++ -std=c++20 -O2 -pthread -Iscripts/emu -Iscripts/emu/include -Ikernels \
//!     -DKFILE='"'$PWD/kernels/dropout_add_norm.cu'"' -include scripts/emu/shim.h \
//!     -o /tmp/dan-emu scripts/emu/cases/dropout_add_norm.cpp
//! mkdir -p /tmp/dan-dump && DAN_DUMP=/tmp/dan-dump /tmp/dan-emu
//! DAN_DUMP=/tmp/dan-dump cargo test --test redundancy_emu -- --ignored
//! ```
//!
//! The dump format is written by `run_stats()` in
//! `scripts/emu/cases/dropout_add_norm_stats.inc` (files `stats*.bin`; the `case*.bin` of the
//! other cases are `tests/dropout_add_norm_emu.rs`'s).
//!
//! The same for `dropout`'s residual forward (`dropout_fwd_res_stats_*` in `kernels/dropout.cu`):
//! `DO_DUMP=<dir>` of the `dstats*.bin` files that `scripts/emu/cases/dropout_stats.inc` writes
//! (the script runs both).
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
use fusedreg::dropping::MaskResolution;
use fusedreg::redundancy::{self, SiteStats};
use fusedreg::Dtype;
use half::{bf16, f16};

/// The emulated site's three words (cosine sum, rows, non-finite rows), next in the dump.
fn read_site(r: &mut Rd) -> SiteStats {
    let words: Vec<u64> = r.arr(3);
    SiteStats {
        cos_sum: words[0] as i64,
        rows: words[1],
        nonfinite: words[2],
    }
}

/// 1 when the CPU meter's one site differs from the emulated one (printed), else 0.
fn site_mismatch(meter: &redundancy::cpu::Redundancy, emu: &SiteStats) -> usize {
    let want = meter.stats().unwrap()[0];
    if want != *emu {
        eprintln!("  site: emulated {emu:?}, CPU {want:?}");
        return 1;
    }
    0
}

/// What the cases of one dump family found and covered.
#[derive(Default)]
struct Coverage {
    mismatches: usize,
    cases: usize,
    /// Rows the emulated sites counted, and the cases with excluded / non-finite rows.
    counted: u64,
    excluded: usize,
    nonfinite: usize,
}

impl Coverage {
    /// Adds one case's (mismatches, emulated site); `excluded`: rows of it were left out.
    fn add(&mut self, (bad, site): (usize, SiteStats), excluded: bool) {
        self.mismatches += bad;
        self.cases += 1;
        self.counted += site.rows;
        self.excluded += usize::from(excluded);
        self.nonfinite += usize::from(site.nonfinite > 0);
    }

    /// No mismatches, and the `prefix*.bin` cases in `dir` exercised every fate of a row (or the
    /// comparison proves little); `excluded` says what an excluded case is, for the summary.
    fn check(&self, dir: &str, prefix: &str, excluded: &str) {
        eprintln!(
            "{prefix}: {} cases checked: {} rows counted, {} cases {excluded}, {} with non-finite \
             rows",
            self.cases, self.counted, self.excluded, self.nonfinite
        );
        assert!(self.cases > 0, "no {prefix}*.bin dumps in {dir}");
        assert!(self.counted > 0 && self.excluded > 0 && self.nonfinite > 0);
        assert_eq!(self.mismatches, 0);
    }
}

/// Checks one case; returns (mismatches, the emulated site).
fn check<T: Dtype, S: Dtype>(name: &str, r: &mut Rd) -> (usize, SiteStats) {
    let c = DanCase::<T, S>::read(r);
    let (rows, cols, flags) = (c.rows, c.cols, c.flags);
    let want = c.read_forward(r);
    // The emulator launched twice into one site: its words are twice one call's.
    let emu = read_site(r);
    let meter = redundancy::cpu::Redundancy::new(1).unwrap();
    let mut got = DanOut::new(rows, cols);
    for _ in 0..2 {
        let args = cpu::ForwardArgs {
            redundancy: Some(meter.site(0).unwrap()),
            ..c.inputs.args()
        };
        cpu::forward(&c.cfg, args, got.outs()).unwrap();
    }
    let bad = forward_mismatches(&want, &got) + site_mismatch(&meter, &emu);
    if bad > 0 {
        eprintln!(
            "{name}: {rows}x{cols} flags {flags:#x} p {}: {bad} mismatches",
            c.p
        );
    }
    (bad, emu)
}

#[test]
#[ignore = "needs DAN_DUMP=<dir> of dumps from the emulated kernels (see the file's docs)"]
fn emulated_statistics_match_the_cpu_reference() {
    let dir = std::env::var("DAN_DUMP").expect("DAN_DUMP: the directory of the emulator's dumps");
    let mut cover = Coverage::default();
    for_each_dump(&dir, "stats", |name, r| {
        let checked = check_kinds!(check, name, r);
        let site = checked.1;
        cover.add(checked, site.rows == 0 && site.nonfinite == 0);
    });
    cover.check(&dir, "stats", "with every row excluded");
}

/// Checks one dropout statistics case (`dstats*.bin`); returns (mismatches, the emulated site).
fn check_dropout<T: Dtype>(name: &str, r: &mut Rd) -> (usize, SiteStats) {
    use fusedreg::dropout::{cpu as dcpu, Config as DConfig, DropPath as DPath};
    let rows = r.u64() as usize;
    let cols = r.u64() as usize;
    let flags = r.u64();
    let (seed, call, path_call) = (r.u64(), r.u64(), r.u64());
    let p = f64::from_bits(r.u64());
    let pp = f64::from_bits(r.u64());
    let n = rows * cols;
    let resolution = match flags & (16 | 32) {
        0 => MaskResolution::Bits32,
        16 => MaskResolution::Bits16,
        32 => MaskResolution::Bits8,
        _ => panic!("flags {flags:#x}: two resolutions"),
    };
    let mut cfg = DConfig::new(rows, cols, p, seed, call)
        .unwrap()
        .with_resolution(resolution);
    if flags & 4 != 0 {
        cfg = cfg.with_drop_path(DPath::new(pp, path_call).unwrap());
    }
    let x: Vec<T> = r.arr(n);
    let res: Vec<T> = r.arr(n);
    let bias: Option<Vec<T>> = (flags & 1 != 0).then(|| r.arr(cols));
    let rs: Option<Vec<f32>> = (flags & 2 != 0).then(|| r.arr(rows));
    let e_y: Vec<T> = r.arr(n);
    let emu = read_site(r);
    let meter = redundancy::cpu::Redundancy::new(1).unwrap();
    let in_place = flags & 8 != 0;
    let mut y = vec![T::default(); n];
    for _ in 0..2 {
        let opts = dcpu::ForwardOptions {
            bias: bias.as_deref(),
            rowscale: rs.as_deref(),
            residual: (!in_place).then_some(&res[..]),
            redundancy: Some(meter.site(0).unwrap()),
            ..Default::default()
        };
        if in_place {
            y.copy_from_slice(&res);
            dcpu::forward_inplace(&cfg, &x, &mut y, opts).unwrap();
        } else {
            dcpu::forward(&cfg, &x, &mut y, opts).unwrap();
        }
    }
    let bad = mismatches("y", &e_y, &y) + site_mismatch(&meter, &emu);
    if bad > 0 {
        eprintln!("{name}: {rows}x{cols} flags {flags:#x} p {p}: {bad} mismatches");
    }
    (bad, emu)
}

#[test]
#[ignore = "needs DO_DUMP=<dir> of dumps from the emulated dropout kernels (see the file's docs)"]
fn emulated_dropout_statistics_match_the_cpu_reference() {
    let dir = std::env::var("DO_DUMP").expect("DO_DUMP: the directory of the emulator's dumps");
    let mut cover = Coverage::default();
    for_each_dump(&dir, "dstats", |name, r| {
        let checked = match r.u64() {
            0 => check_dropout::<f32>(name, r),
            1 => check_dropout::<f16>(name, r),
            2 => check_dropout::<bf16>(name, r),
            k => panic!("bad kind {k}"),
        };
        let site = checked.1;
        cover.add(checked, site.rows + site.nonfinite < 2 * rows_of(r.b));
    });
    cover.check(&dir, "dstats", "with excluded rows");
}

/// The row count of a `dstats*.bin` dump (its second header word).
fn rows_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[8..16].try_into().unwrap())
}
