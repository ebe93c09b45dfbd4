//! Deterministic host-side initialization shared by the CPU and GPU models: student and teacher
//! weights and the synthetic input batches, all drawn from our Philox so that both backends
//! start from the same numbers.

use super::config::MlpConfig;
use fusedreg::philox::mask_word;

/// One block's parameters: W1 `[H, H]`, b1 `[H]`, W2 `[H, H]`, b2 `[H]`.
pub(crate) type BlockParams = [Vec<f32>; 4];

/// Everything a model starts from.
pub(crate) struct HostInit {
    pub student: Vec<BlockParams>,
    pub teacher: Vec<BlockParams>,
    pub inputs: Vec<Vec<f32>>,
}

/// `n` values uniform in `[-scale, scale)` from stream `call` of `seed`.
fn uniform(seed: u64, call: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let u = (mask_word(seed, call, i) >> 8) as f32 / (1u32 << 24) as f32;
            (2.0 * u - 1.0) * scale
        })
        .collect()
}

fn block(seed: u64, stream: u64, h: usize, w1: f32, w2: f32, b: f32) -> BlockParams {
    [
        uniform(seed, stream, h * h, w1),
        uniform(seed, stream + 1, h, b),
        uniform(seed, stream + 2, h * h, w2),
        uniform(seed, stream + 3, h, b),
    ]
}

pub(crate) fn host_init(cfg: &MlpConfig) -> HostInit {
    let h = cfg.hidden;
    // Uniform(-a, a) has variance a^2 / 3: a = sqrt(3 / h) keeps unit-variance activations.
    let unit = (3.0 / h as f32).sqrt();
    // The student's branches start small (scaled by 1 / sqrt(2 L)) so the deep residual stream
    // starts near the identity; the teacher's are full-size, so there is a function to learn.
    let branch = unit / (2.0 * cfg.blocks as f32).sqrt();
    let student = (0..cfg.blocks)
        .map(|l| block(cfg.seed, 16 * l as u64, h, unit, branch, 0.01))
        .collect();
    let teacher = (0..cfg.teacher_blocks)
        .map(|l| {
            block(
                cfg.seed,
                (1 << 32) + 16 * l as u64,
                h,
                2.0 * unit,
                unit,
                0.1,
            )
        })
        .collect();
    let inputs = (0..cfg.batches)
        .map(|b| uniform(cfg.seed, (2 << 32) + b as u64, cfg.tokens * h, 3f32.sqrt()))
        .collect();
    HostInit {
        student,
        teacher,
        inputs,
    }
}

/// The student's optimizer tensors in order with their weight decay: per block W1, b1, W2, b2
/// (decay on the matrices only), then for the pre-norm variant gamma = 1 and beta = 0 (no
/// decay). Both backends register exactly this list.
pub(crate) fn student_tensors(cfg: &MlpConfig, student: Vec<BlockParams>) -> Vec<(Vec<f32>, f32)> {
    let mut out = Vec::with_capacity(cfg.blocks * cfg.tensors_per_block());
    for block in student {
        for (k, v) in block.into_iter().enumerate() {
            out.push((v, if k % 2 == 0 { cfg.weight_decay } else { 0.0 }));
        }
        if cfg.prenorm.is_some() {
            out.push((vec![1.0; cfg.hidden], 0.0));
            out.push((vec![0.0; cfg.hidden], 0.0));
        }
    }
    out
}
