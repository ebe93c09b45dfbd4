//! `kernels/philox.cu`: the generator on random (counter, key) pairs (the extremes included) and
//! the mask keying over runs of 64-bit indices (across 2^32, up to `u64::MAX`), any grid.

use fusedreg::philox::{mask_word, philox4x32_10};

use crate::harness::{offset, size, Data, Diffs, Reader, Rng, Stem, Writer};

#[derive(Debug)]
pub struct Case {
    grid: u64,
    block: u64,
    counters: Data<u32>,
    keys: Data<u32>,
    seed: u64,
    call: u64,
    start: u64,
    n: u64,
    off: u64,
}

fn word(g: &mut Rng) -> u32 {
    match g.below(4) {
        0 => g.pick(&[0, 1, u32::MAX, u32::MAX - 1, 1 << 31]),
        _ => g.u32(),
    }
}

fn wide(g: &mut Rng) -> u64 {
    match g.below(4) {
        0 => g.pick(&[0, 1, u64::MAX, u32::MAX as u64, 1 << 32, 1 << 63]),
        1 => g.below(1000),
        _ => g.u64(),
    }
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        let pairs = size(g, &[32, 128], 600);
        let n = size(g, &[4, 32, 128], 3000) as u64;
        let start = match g.below(3) {
            0 => (1u64 << 32) - g.below(2 * n + 2).min(1 << 32),
            1 => u64::MAX - n - g.below(64),
            _ => g.u64() >> g.below(64),
        }
        .min(u64::MAX - n);
        Case {
            grid: g.range(1, 5),
            block: g.pick(&[32, 64, 256]),
            counters: Data((0..4 * pairs).map(|_| word(g)).collect()),
            keys: Data((0..2 * pairs).map(|_| word(g)).collect()),
            seed: wide(g),
            call: wide(g),
            start,
            n,
            off: offset(g, 3),
        }
    }

    fn write(c: &Case, w: &mut Writer) {
        w.u64("grid", c.grid);
        w.u64("block", c.block);
        w.view("counters", &c.counters, 0);
        w.view("keys", &c.keys, 0);
        w.u64("seed", c.seed);
        w.u64("call", c.call);
        w.u64("start", c.start);
        w.u64("n", c.n);
        w.u64("off", c.off);
    }

    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        let pairs = c.keys.len() / 2;
        let blocks = r.vec::<u32>("blocks", 4 * pairs)?;
        let words = r.vec::<u32>("mask_words", c.n as usize)?;
        let cpu_blocks: Vec<u32> = (0..pairs)
            .flat_map(|i| {
                let ctr = [0, 1, 2, 3].map(|j| c.counters[4 * i + j]);
                philox4x32_10(ctr, [c.keys[2 * i], c.keys[2 * i + 1]])
            })
            .collect();
        let cpu_words: Vec<u32> = (0..c.n)
            .map(|j| mask_word(c.seed, c.call, c.start + j))
            .collect();
        let mut d = Diffs::default();
        d.eq("philox4x32_10", &blocks, &cpu_blocks);
        d.eq("mask_word", &words, &cpu_words);
        d.into_result()
    }
}
