//! The emulated cross-entropy kernels (scripts/emu, run with `XE_DUMP=DIR`) against the CPU
//! reference, bit for bit: losses, reduced loss, count, flag, gradient, and the unfused
//! baseline's kernels against their CPU mirror. Ignored by default because it needs the dumps;
//! `scripts/emu/cross_entropy_vs_cpu.sh` makes them and runs it. This checks the kernel's logic
//! (indexing, reduction order, options) on a machine without a GPU; the GPU suite checks the
//! device's arithmetic.

// Element-wise comparisons read best with explicit indices.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{xent_within_fast_bound, XentOut};
use fusedreg::cross_entropy::{cpu, fast_model, unfused, Config, Reduction};
use fusedreg::Dtype;
use half::{bf16, f16};

fn hexs(l: &str) -> Vec<u32> {
    l.split_whitespace()
        .map(|w| u32::from_str_radix(w, 16).unwrap())
        .collect()
}
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn check<T: Dtype>(
    name: &str,
    lines: &[&str],
    h: &[&str],
    from_bits: fn(u32) -> T,
    to_bits: fn(T) -> u32,
) -> usize {
    let rows: usize = h[2].parse().unwrap();
    let vocab: usize = h[3].parse().unwrap();
    let grad: i32 = h[4].parse().unwrap();
    let red = match h[5] {
        "0" => Reduction::None,
        "1" => Reduction::Sum,
        _ => Reduction::Mean,
    };
    let up_on = h[6] == "1";
    let alpha = f32::from_bits(u32::from_str_radix(h[7], 16).unwrap());
    let lambda = f32::from_bits(u32::from_str_radix(h[8], 16).unwrap());
    let x: Vec<T> = hexs(lines[1]).into_iter().map(from_bits).collect();
    let t: Vec<i64> = lines[2]
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    let up: Vec<f32> = hexs(lines[3]).into_iter().map(f32::from_bits).collect();
    let loss_rows: Vec<f32> = hexs(lines[4]).into_iter().map(f32::from_bits).collect();
    let tail: Vec<&str> = lines[5].split_whitespace().collect();
    let reduced = f32::from_bits(u32::from_str_radix(tail[0], 16).unwrap());
    let nv: u64 = tail[1].parse().unwrap();
    let flag: u32 = tail[2].parse().unwrap();
    let g: Vec<u32> = hexs(lines[6]);
    let ug: Vec<u32> = hexs(lines[7]);
    let urows: Vec<f32> = hexs(lines[8]).into_iter().map(f32::from_bits).collect();
    let bad = t
        .iter()
        .any(|&v| v != -100 && !(0..vocab as i64).contains(&v));
    let tc: Vec<i64> = t
        .iter()
        .map(|&v| {
            if v != -100 && !(0..vocab as i64).contains(&v) {
                -100
            } else {
                v
            }
        })
        .collect();
    let cfg = Config::new(rows, vocab)
        .unwrap()
        .label_smoothing(alpha as f64)
        .unwrap()
        .z_loss(lambda as f64)
        .unwrap()
        .reduction(red);
    let upo = (red == Reduction::None && up_on).then_some(&up[..]);
    let mut gr = vec![T::from_f32_rn(0.0); rows * vocab];
    let l = cpu::forward_backward(&cfg, &x, &tc, upo, &mut gr).unwrap();
    let mut errs = 0;
    let mut e = |m: String| {
        if errs < 5 {
            eprintln!("{name}: {m}");
        }
        errs += 1;
    };
    if (flag != 0) != bad {
        e(format!("flag {flag} bad {bad}"));
    }
    for r in 0..rows {
        if !same(loss_rows[r], l.rows[r]) {
            e(format!(
                "loss row {r}: emu {} cpu {}",
                loss_rows[r], l.rows[r]
            ));
        }
    }
    if red != Reduction::None {
        if !same(reduced, l.reduced.unwrap()) {
            e(format!("reduced emu {reduced} cpu {:?}", l.reduced));
        }
        if red == Reduction::Mean && nv != l.n_valid {
            e(format!("nv {nv} vs {}", l.n_valid));
        }
    }
    // The device writes one canonical NaN whatever the inputs; the CPU keeps payloads.
    let same_t = |bits: u32, want: T| {
        bits == to_bits(want) || (from_bits(bits).to_f32().is_nan() && want.to_f32().is_nan())
    };
    if grad != 0 {
        for i in 0..rows * vocab {
            if !same_t(g[i], gr[i]) {
                e(format!(
                    "grad [{i}] emu {:x} cpu {:x}",
                    g[i],
                    to_bits(gr[i])
                ));
            }
        }
    }
    // unfused
    let mut ugr = vec![T::from_f32_rn(0.0); rows * vocab];
    let ul = unfused::forward_backward_cpu(&cfg, &x, &tc, upo, &mut ugr).unwrap();
    for r in 0..rows {
        if !same(urows[r], ul.rows[r]) {
            e(format!(
                "unfused loss row {r}: emu {} cpu {}",
                urows[r], ul.rows[r]
            ));
        }
    }
    for i in 0..rows * vocab {
        if !same_t(ug[i], ugr[i]) {
            e(format!(
                "unfused grad [{i}] emu {:x} cpu {:x}",
                ug[i],
                to_bits(ugr[i])
            ));
        }
    }
    // Math::Fast: the emulated kernel against the fast arithmetic over the same model of the
    // special-function unit (bit for bit), and against the CPU reference within the stated bound.
    let floss: Vec<f32> = hexs(lines[9]).into_iter().map(f32::from_bits).collect();
    let ftail: Vec<&str> = lines[10].split_whitespace().collect();
    let freduced = f32::from_bits(u32::from_str_radix(ftail[0], 16).unwrap());
    let fflag: u32 = ftail[1].parse().unwrap();
    let fg: Vec<T> = hexs(lines[11]).into_iter().map(from_bits).collect();
    if (fflag != 0) != bad {
        e(format!("fast flag {fflag} bad {bad}"));
    }
    let mut mg = vec![T::from_f32_rn(0.0); rows * vocab];
    let ml =
        fast_model::forward_backward(&cfg, &x, &tc, upo, &mut mg, &fast_model::EmuSfu).unwrap();
    for r in 0..rows {
        if !same(floss[r], ml.rows[r]) {
            e(format!(
                "fast loss row {r}: emu {} model {}",
                floss[r], ml.rows[r]
            ));
        }
    }
    if red != Reduction::None && !same(freduced, ml.reduced.unwrap()) {
        e(format!(
            "fast reduced emu {freduced} model {:?}",
            ml.reduced
        ));
    }
    if grad != 0 {
        for i in 0..rows * vocab {
            if !same_t(to_bits(fg[i]), mg[i]) {
                e(format!(
                    "fast grad [{i}] emu {:x} model {:x}",
                    to_bits(fg[i]),
                    to_bits(mg[i])
                ));
            }
        }
    }
    let out = XentOut {
        rows: Some(&floss),
        reduced: (red != Reduction::None).then_some(freduced),
        grad: (grad != 0).then_some(&fg[..]),
    };
    if let Err(m) = xent_within_fast_bound(name, &cfg, &x, &tc, upo, out) {
        e(format!("fast vs the CPU reference: {m}"));
    }
    errs
}

#[test]
#[ignore = "needs the dumps of scripts/emu/cross_entropy_vs_cpu.sh (XE_DUMP)"]
fn emu_matches_cpu() {
    let dir = std::env::var("XE_DUMP").expect("XE_DUMP: the directory of the emulator's dumps");
    let mut total = 0;
    let mut files = 0;
    for ent in std::fs::read_dir(dir).unwrap() {
        let p = ent.unwrap().path();
        let s = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = s.split('\n').collect();
        let h: Vec<&str> = lines[0].split_whitespace().collect();
        let name = format!("{} {}", p.display(), lines[0]);
        files += 1;
        total += match h[0] {
            "0" => check::<f32>(&name, &lines, &h, f32::from_bits, f32::to_bits),
            "1" => check::<f16>(
                &name,
                &lines,
                &h,
                |b| f16::from_bits(b as u16),
                |v| v.to_bits() as u32,
            ),
            _ => check::<bf16>(
                &name,
                &lines,
                &h,
                |b| bf16::from_bits(b as u16),
                |v| v.to_bits() as u32,
            ),
        };
    }
    assert!(files > 100);
    assert_eq!(total, 0, "{total} mismatches in {files} cases");
}
