//! The device's shared f32 math (`kernels/common/fmath.cuh`) against `fusedreg::fmath`, bit for
//! bit: every 97th f32 bit pattern (about 44 million inputs of both signs, all binades,
//! subnormals, infinities, NaNs with payloads) plus the edge cases of each function.

use fusedreg::fmath::gpu::{eval, Func};
use fusedreg::Handle;
use libtest_mimic::Trial;

use crate::common::fmath_edge_inputs;
use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
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
    // Each edge case and its 300 neighbours on either side, both signs.
    let mut xs = fmath_edge_inputs(300);
    // Every subnormal and every input in [-2, 2] at a fine stride.
    xs.extend((0..0x0080_0000u32).step_by(7).map(f32::from_bits));
    xs.extend((0..0x4000_0000u32).step_by(101).map(|b| -f32::from_bits(b)));
    xs.extend((0..0x4000_0000u32).step_by(103).map(f32::from_bits));
    compare(h, &xs, "edge cases")
}
