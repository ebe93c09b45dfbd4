//! Bad input at the public CPU entry points that are not one op's (issue 17): the keying
//! (`philox4x32_10`, `block`, `mask_word`, `DropRate::{new, p, threshold, effective_p, keeps,
//! keeps_all, drops_all, scale}`, `dropping::{mask_bit, set_mask_bit, mask_words}`) and the
//! `Dtype` conversions of non-finite values (`from_f32_rn` keeps NaN and infinities). Each case
//! ends in an `Error`, a documented valid result, or a documented result (named in the case) —
//! never an undocumented panic, a NaN, or a silently wrong value. The test profile runs with
//! overflow checks (`[profile.test] overflow-checks = true`), so arithmetic that wraps shows up
//! here as a panic.
//!
//! An op's bad input lives with the op, in `tests/<op>.rs` (the helpers `refused` and `BAD_P`
//! are in `tests/common/`), so a new op does not touch this file:
//!
//! * `dropout`: `tests/dropout.rs`, module `bad_input` (`Config::{new, flat, with_drop_path,
//!   len, mask_words, keeps}`, `DropPath::{new, per_sample, row_scale}`, `slab_rows`,
//!   `slab_count`, the byte counts, `cpu::{forward, forward_inplace, backward}` with every
//!   option and a residual), and `bad_input_is_an_error` there and in `tests/gpu/dropout.rs`.
//! * `stochastic_depth`: `tests/stochastic_depth.rs`, module `bad_input`
//!   (`Schedule::{probabilities, linear}`, `StochasticDepth::{new, plan, eval_plan, rates}`,
//!   `Plan::{runs, residual_scale, block, running, skip_flags}`).
//! * `global_norm`: `tests/global_norm.rs`, module `bad_input` (`check_max_norm`,
//!   `check_loss_scale`, `cpu::{global_norm, partials, reduce, norm_f64, scale}`). Not covered:
//!   `cpu::finalize`, a building block that does not validate its scalars (the validating entry
//!   point is `cpu::global_norm`).
//! * `adamw`: `tests/adamw.rs`, module `bad_input` (`check_lr`, `AdamWConfig::validate`,
//!   `cpu::{CpuTensor::new, step, save_state, restore_state, bias_corrections,
//!   pow_by_squaring}`, `state::{peek, decode, StateHeader::{total, encoded_len}}`,
//!   `multi_tensor::Layout::{new, chunks, num_chunks}`, the byte counts of adamw and
//!   global_norm).
//! * `bias_act_dropout`: `tests/bias_act_dropout.rs::bad_input_is_an_error` and its GPU twin
//!   (finding 2 of issue 25 is still below, to move there).
//! * `dropout_add_norm`: `tests/dropout_add_norm.rs::bad_input_is_an_error` (shapes, eps <= 0
//!   or non-finite, non-finite layer scale, stream dtype, row scale with drop path) and its GPU
//!   twin.
//! * `cross_entropy`: `tests/cross_entropy.rs::bad_input_is_an_error` (alpha and z-loss out of
//!   range, shape mismatches, upstream with mean, out-of-range targets: nothing written) and its
//!   GPU twin (out-of-range targets raise the device flag).
//! * `candle` (feature `candle`): `tests/candle_dropout.rs::residual_bad_input_is_an_error` and
//!   the other `tests/candle_<op>.rs`.
//! * `fmath`: total over f32 (NaN, infinities, subnormals), `tests/fmath.rs`.
//!
//! GPU entry points: `tests/gpu/bad_input.rs` (ignored without a device). The tools (`report`,
//! `timing`, `mlp`): `tools/tests/tools_bad_input.rs` and `tools/tests/gpu/bad_input.rs`.

mod common;

use common::{refused, BAD_P};
use fusedreg::dropping::DropRate;
use fusedreg::philox::{block, mask_word, philox4x32_10};
use half::{bf16, f16};

// ------------------------------------------------------------------------------------------
// philox
// ------------------------------------------------------------------------------------------

#[test]
fn drop_rate_refuses_bad_probabilities() {
    for p in BAD_P {
        refused(&format!("DropRate::new({p})"), DropRate::new(p));
    }
    // -0.0 compares equal to 0: documented valid, p = 0 (threshold 0, keeps everything).
    let z = DropRate::new(-0.0).unwrap();
    assert_eq!((z.threshold(), z.keeps_all(), z.scale()), (0, true, 1.0));
    // A tiny p rounds to threshold 0: keeps everything, scale 1 (applied p = 0, within 2^-33).
    let tiny = DropRate::new(1e-300).unwrap();
    assert_eq!((tiny.threshold(), tiny.scale()), (0, 1.0));
    // Just below 1 rounds to 2^32 for dropout: drops everything (applied p = 1, documented
    // within 2^-33 of p); the scale stays finite and is never applied.
    let near1 = DropRate::new(1.0 - 2f64.powi(-34)).unwrap();
    assert!(near1.drops_all() && near1.effective_p() == 1.0 && near1.scale().is_finite());
}

#[test]
fn philox_takes_every_64_bit_index() {
    for (seed, call, i) in [(0, 0, 0), (u64::MAX, u64::MAX, u64::MAX), (1, 2, 1 << 63)] {
        assert_eq!(
            mask_word(seed, call, i),
            block(seed, call, i >> 2)[(i & 3) as usize]
        );
    }
    let _ = philox4x32_10([u32::MAX; 4], [u32::MAX; 2]);
}

// ------------------------------------------------------------------------------------------
// dtypes
// ------------------------------------------------------------------------------------------

#[test]
fn dtype_conversions_keep_non_finite_values() {
    use fusedreg::Dtype;
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for got in [bf16::from_f32_rn(v).to_f32(), f16::from_f32_rn(v).to_f32()] {
            assert!(
                got.is_nan() == v.is_nan() && (v.is_nan() || got == v),
                "{v} -> {got}"
            );
        }
    }
    // Out of f16's range rounds to infinity (IEEE), documented by the conversion.
    assert_eq!(f16::from_f32_rn(1e6).to_f32(), f32::INFINITY);
}

// ------------------------------------------------------------------------------------------
// issue 25: the findings of the second probe (item 1, the cross-entropy NaN logit, is tested in
// tests/cross_entropy.rs; item 4, StepKeys, in tests/candle_dropout.rs)
// ------------------------------------------------------------------------------------------

/// Finding 2: `bias_act_dropout::cpu::backward` with no rows and a huge column count allocated
/// its per-column scratch before looking at the sizes ("capacity overflow" at `usize::MAX`, an
/// abort at 2^40). Empty problems now allocate nothing; without `dbias` no scratch is needed.
#[test]
fn bias_act_dropout_backward_allocates_nothing_when_empty() {
    use fusedreg::bias_act_dropout::{cpu as bad, Activation, Config as BConfig, Preact};
    for cols in [1usize << 40, usize::MAX] {
        let cfg = BConfig::new(0, cols, Activation::GeluErf, 0.1, 1, 2).unwrap();
        let pre = Preact::X {
            x: &[][..],
            bias: None,
        };
        bad::backward::<f32>(&cfg, &[], pre, &mut [], None).unwrap();
        let pre_h = Preact::H(&[][..]);
        bad::backward::<bf16>(&cfg, &[], pre_h, &mut [], None).unwrap();
    }
    // No columns, many rows: nothing to do either.
    let cfg = BConfig::new(1 << 40, 0, Activation::Relu, 0.5, 1, 2).unwrap();
    let mut db: [f32; 0] = [];
    let pre = Preact::X {
        x: &[][..],
        bias: Some(&[][..]),
    };
    bad::backward::<f32>(&cfg, &[], pre, &mut [], Some(&mut db)).unwrap();
    // Zero rows with dbias: the column sums are zero.
    let cfg = BConfig::new(0, 5, Activation::Silu, 0.1, 1, 2).unwrap();
    let mut db = [f16::from_f32(f32::NAN); 5];
    let pre = Preact::X {
        x: &[][..],
        bias: Some(&[f16::ONE; 5][..]),
    };
    bad::backward::<f16>(&cfg, &[], pre, &mut [], Some(&mut db)).unwrap();
    assert!(
        db.iter().all(|d| d.to_bits() == 0),
        "dbias over no rows: {db:?}"
    );
}

/// Finding 3: `mask_bit` / `set_mask_bit` past the mask are `None` / an error (they panicked
/// with an index out of bounds); the mask is not changed.
#[test]
fn mask_bits_past_the_mask_are_refused() {
    use fusedreg::dropping::{mask_bit, mask_words, set_mask_bit};
    for words in [0usize, 1, 3] {
        let mut m = vec![0u32; words];
        for i in [words * 32, words * 32 + 1, usize::MAX] {
            assert_eq!(mask_bit(&m, i), None, "{words} words, bit {i}");
            refused(&format!("set bit {i}"), set_mask_bit(&mut m, i));
        }
        assert!(m.iter().all(|&w| w == 0));
        if words > 0 {
            let last = words * 32 - 1;
            set_mask_bit(&mut m, last).unwrap();
            assert_eq!(mask_bit(&m, last), Some(true));
            assert_eq!(m[words - 1], 1 << 31);
        }
    }
    assert_eq!(mask_words(usize::MAX), usize::MAX.div_ceil(32));
}
