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
    // The device writes one canonical NaN whatever the inputs; the CPU keeps payloads.
    let same_t = |bits: u32, want: T| {
        bits == to_bits(want) || (from_bits(bits).to_f32().is_nan() && want.to_f32().is_nan())
    };
    // The rows of losses (`emu`, the kernel's, against `want`, `whom`'s) that differ, as messages.
    let loss_rows_differ = |what: &str, whom: &str, emu: &[f32], want: &[f32]| -> Vec<String> {
        (0..rows)
            .filter(|&r| !same(emu[r], want[r]))
            .map(|r| format!("{what}loss row {r}: emu {} {whom} {}", emu[r], want[r]))
            .collect()
    };
    // The same for the gradient's elements (`emu` as bits).
    let grads_differ = |what: &str, whom: &str, emu: &[u32], want: &[T]| -> Vec<String> {
        (0..rows * vocab)
            .filter(|&i| !same_t(emu[i], want[i]))
            .map(|i| {
                format!(
                    "{what}grad [{i}] emu {:x} {whom} {:x}",
                    emu[i],
                    to_bits(want[i])
                )
            })
            .collect()
    };
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
    loss_rows_differ("", "cpu", &loss_rows, &l.rows)
        .into_iter()
        .for_each(&mut e);
    if red != Reduction::None {
        if !same(reduced, l.reduced.unwrap()) {
            e(format!("reduced emu {reduced} cpu {:?}", l.reduced));
        }
        if red == Reduction::Mean && nv != l.n_valid {
            e(format!("nv {nv} vs {}", l.n_valid));
        }
    }
    if grad != 0 {
        grads_differ("", "cpu", &g, &gr)
            .into_iter()
            .for_each(&mut e);
    }
    // unfused
    let mut ugr = vec![T::from_f32_rn(0.0); rows * vocab];
    let ul = unfused::forward_backward_cpu(&cfg, &x, &tc, upo, &mut ugr).unwrap();
    loss_rows_differ("unfused ", "cpu", &urows, &ul.rows)
        .into_iter()
        .for_each(&mut e);
    grads_differ("unfused ", "cpu", &ug, &ugr)
        .into_iter()
        .for_each(&mut e);
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
    loss_rows_differ("fast ", "model", &floss, &ml.rows)
        .into_iter()
        .for_each(&mut e);
    if red != Reduction::None && !same(freduced, ml.reduced.unwrap()) {
        e(format!(
            "fast reduced emu {freduced} model {:?}",
            ml.reduced
        ));
    }
    if grad != 0 {
        let fg_bits: Vec<u32> = fg.iter().map(|&v| to_bits(v)).collect();
        grads_differ("fast ", "model", &fg_bits, &mg)
            .into_iter()
            .for_each(&mut e);
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
