//! The device's shared f32 math (`kernels/common/fmath.cuh`) against `fusedreg::fmath`, bit for
//! bit: every 97th f32 bit pattern (about 44 million inputs of both signs, all binades,
//! subnormals, infinities, NaNs with payloads) plus the edge cases of each function.

use fusedreg::fmath::gpu::{eval, Func};
use fusedreg::Handle;
use libtest_mimic::Trial;

use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "fmath",
        &[
            ("sweep_every_97th_pattern", sweep_every_97th_pattern),
            ("edge_cases", edge_cases),
        ],
    )
}

fn compare(h: &Handle, xs: &[f32], what: &str) -> TestResult {
    for f in Func::ALL {
        let got = eval(h, f, xs)?;
        let want: Vec<f32> = xs.iter().map(|&x| f.cpu(x)).collect();
        let got_bits: Vec<u32> = got.iter().map(|y| y.to_bits()).collect();
        let want_bits: Vec<u32> = want.iter().map(|y| y.to_bits()).collect();
        if let Err(e) = bits_eq(&format!("{f:?} {what}"), &got_bits, &want_bits) {
            // Name the inputs of the first mismatches, not only their positions.
            let firsts: Vec<String> = (0..xs.len())
                .filter(|&i| got_bits[i] != want_bits[i])
                .take(8)
                .map(|i| format!("x = {:e} ({:#010x})", xs[i], xs[i].to_bits()))
                .collect();
            return Err(format!("{e}\ninputs: {}", firsts.join(", ")).into());
        }
    }
    Ok(())
}

fn sweep_every_97th_pattern(h: &Handle) -> TestResult {
    const CHUNK: u64 = 1 << 24;
    let total = 1u64 << 32;
    let mut start = 0u64;
    while start < total {
        let xs: Vec<f32> = (start..(start + CHUNK * 97).min(total))
            .step_by(97)
            .map(|b| f32::from_bits(b as u32))
            .collect();
        compare(h, &xs, &format!("sweep from pattern {start:#x}"))?;
        start += CHUNK * 97;
    }
    Ok(())
}

fn edge_cases(h: &Handle) -> TestResult {
    let specials = [
        0.0f32,
        f32::from_bits(1),
        f32::from_bits(0x007f_ffff),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::INFINITY,
        f32::from_bits(0x7fc0_0000),
        f32::from_bits(0x7f80_0001), // signalling NaN
        f32::from_bits(0x7fc1_2345),
        1.0,
        0.5,
        2.0,
        0.625,
        4.0,
        9.5,
        88.722_83,
        89.0,
        87.336_55,
        103.972_08,
        104.0,
        std::f32::consts::LN_2,
        std::f32::consts::SQRT_2,
        f32::from_bits(0x3980_0000),
        f32::from_bits(0x3f35_04f3),
    ];
    let mut xs = Vec::new();
    for s in specials {
        for d in -300i64..=300 {
            for sign in [0u32, 0x8000_0000] {
                let b = (i64::from(s.to_bits() & 0x7fff_ffff) + d).clamp(0, 0x7fff_ffff) as u32;
                xs.push(f32::from_bits(b | sign));
            }
        }
    }
    // Every subnormal and every input in [-2, 2] at a fine stride.
    xs.extend((0..0x0080_0000u32).step_by(7).map(f32::from_bits));
    xs.extend((0..0x4000_0000u32).step_by(101).map(|b| -f32::from_bits(b)));
    xs.extend((0..0x4000_0000u32).step_by(103).map(f32::from_bits));
    compare(h, &xs, "edge cases")
}
