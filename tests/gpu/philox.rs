//! Device Philox against the CPU, bit for bit.

use fusedreg::philox::{self, gpu};
use fusedreg::Handle;
use libtest_mimic::Trial;
use rand::Rng;

use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "philox",
        &[
            (
                "known_answers_and_random_pairs",
                known_answers_and_random_pairs,
            ),
            (
                "mask_words_match_cpu_with_64bit_indices",
                mask_words_match_cpu_with_64bit_indices,
            ),
        ],
    )
}

fn known_answers_and_random_pairs(h: &Handle) -> TestResult {
    let mut r = rng(0x9411);
    let mut counters = vec![
        [0; 4],
        [u32::MAX; 4],
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
    ];
    let mut keys = vec![[0; 2], [u32::MAX; 2], [0xa4093822, 0x299f31d0]];
    for _ in 0..(1 << 16) + 5 {
        counters.push(r.random());
        keys.push(r.random());
    }
    let got = gpu::fill(h, &counters, &keys)?;
    let want: Vec<[u32; 4]> = counters
        .iter()
        .zip(&keys)
        .map(|(c, k)| philox::philox4x32_10(*c, *k))
        .collect();
    assert_eq!(want[0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
    bits_eq("philox4x32_10 GPU vs CPU", &got, &want)?;
    Ok(())
}

fn mask_words_match_cpu_with_64bit_indices(h: &Handle) -> TestResult {
    let mut r = rng(0x3a5c);
    let n = 100_003;
    for start in [
        0u64,
        1,
        (1 << 32) - 50_001,
        (1 << 40) + 3,
        u64::MAX - n as u64,
    ] {
        let (seed, call): (u64, u64) = (r.random(), r.random());
        let got = gpu::mask_words(h, seed, call, start, n)?;
        let want: Vec<u32> = (0..n as u64)
            .map(|j| philox::mask_word(seed, call, start + j))
            .collect();
        bits_eq(
            &format!("mask words seed {seed:#x} call {call:#x} start {start:#x}"),
            &got,
            &want,
        )?;
    }
    Ok(())
}
