//! The C ABI's default keying on the CPU: `mask_bits = 0` (what `fr_options_default` sets) is
//! the op's default for the dtype (16-bit keys for bf16 and f16, 32-bit for f32, the library's
//! `MaskResolution::default_for`), bit for bit the explicit choice, and forward and backward
//! resolve it alike.

use std::ptr::null;

use fusedreg::bias_act_dropout::{self as bad, Activation};
use fusedreg::dropout::{cpu, Config};
use fusedreg::dropping::MaskResolution;
use fusedreg_ffi::*;

mod common;
use common::{randn, t, CPU};
use half::bf16;

fn options(rows: usize, cols: usize, mask_bits: u32) -> FrOptions {
    let mut o = fr_options_default();
    (o.rows, o.cols, o.p, o.seed, o.call) = (rows as i64, cols as i64, 0.3, 5, 91);
    o.mask_bits = mask_bits;
    o
}

/// `fr_dropout_forward` without bias, residual or row scale: the output.
fn dropout_y<T: Copy + Default>(o: &FrOptions, x: &mut [T], dtype: FrDtype) -> Vec<T> {
    let mut y = vec![T::default(); x.len()];
    // SAFETY: every descriptor points at a live buffer of its stated length.
    let st = unsafe {
        fr_dropout_forward(
            o,
            CPU,
            &t(x, dtype),
            null(),
            null(),
            null(),
            &t(&mut y, dtype),
            null(),
            null(),
        )
    };
    assert_eq!(st, FR_OK);
    y
}

#[test]
fn options_default_leaves_the_resolution_to_the_dtype() {
    assert_eq!(fr_options_default().mask_bits, 0);
}

#[test]
fn mask_bits_0_is_16_bit_keys_for_bf16_and_32_for_f32() {
    let (rows, cols) = (3usize, 77usize);
    let n = rows * cols;
    let mut x: Vec<bf16> = randn(n, 3).into_iter().map(bf16::from_f32).collect();
    let y0 = dropout_y(&options(rows, cols, 0), &mut x, FR_BF16);
    let y16 = dropout_y(&options(rows, cols, 16), &mut x, FR_BF16);
    let y32 = dropout_y(&options(rows, cols, 32), &mut x, FR_BF16);
    assert_eq!(y0, y16, "bf16: mask_bits 0 keys as 16");
    assert_ne!(y0, y32, "bf16: 16- and 32-bit keys give other outputs here");
    // The library's CPU reference with an unset resolution gives the same bits.
    let cfg = Config::new(rows, cols, 0.3, 5, 91).unwrap();
    assert_eq!(
        cfg.resolution_for(fusedreg::DtypeKind::Bf16),
        MaskResolution::Bits16
    );
    let mut y = vec![bf16::ZERO; n];
    cpu::forward(&cfg, &x, &mut y, Default::default()).unwrap();
    assert_eq!(y, y0);

    // f32: mask_bits 0 keys as 32.
    let mut xf = randn(n, 4);
    let f0 = dropout_y(&options(rows, cols, 0), &mut xf, FR_F32);
    assert_eq!(f0, dropout_y(&options(rows, cols, 32), &mut xf, FR_F32));
    assert_ne!(f0, dropout_y(&options(rows, cols, 16), &mut xf, FR_F32));
}

#[test]
fn bias_act_dropout_mask_bits_0_forward_and_backward_resolve_alike() {
    let (rows, cols) = (4usize, 40usize);
    let n = rows * cols;
    let x: Vec<bf16> = randn(n, 7).into_iter().map(bf16::from_f32).collect();
    let dy: Vec<bf16> = randn(n, 8).into_iter().map(bf16::from_f32).collect();
    let mut o = options(rows, cols, 0);
    o.activation = FR_ACT_RELU;
    let mut o16 = o;
    o16.mask_bits = 16;
    let fwd = |o: &FrOptions| {
        let (mut x, mut y) = (x.clone(), vec![bf16::ZERO; n]);
        // SAFETY: every descriptor points at a live buffer of its stated length.
        let st = unsafe {
            fr_bias_act_dropout_forward(
                o,
                CPU,
                &t(&mut x, FR_BF16),
                null(),
                &t(&mut y, FR_BF16),
                null(),
            )
        };
        assert_eq!(st, FR_OK);
        y
    };
    let bwd = |o: &FrOptions| {
        let (mut x, mut dy, mut dx) = (x.clone(), dy.clone(), vec![bf16::ZERO; n]);
        // SAFETY: as above.
        let st = unsafe {
            fr_bias_act_dropout_backward(
                o,
                CPU,
                &t(&mut dy, FR_BF16),
                &t(&mut x, FR_BF16),
                null(),
                null(),
                &t(&mut dx, FR_BF16),
                null(),
                null(),
            )
        };
        assert_eq!(st, FR_OK);
        dx
    };
    let (y, dx) = (fwd(&o), bwd(&o));
    assert_eq!(y, fwd(&o16));
    assert_eq!(dx, bwd(&o16));
    // Forward and backward drop the same elements (ReLU: a kept element with x > 0 is non-zero
    // both ways), and the library's default keying for bf16 is what decides them.
    let cfg = bad::Config::new(rows, cols, Activation::Relu, 0.3, 5, 91).unwrap();
    let k = cfg.keying(fusedreg::DtypeKind::Bf16);
    assert_eq!(k.resolution(), MaskResolution::Bits16);
    for i in 0..n {
        let live = x[i].to_f32() > 0.0 && dy[i].to_f32() != 0.0;
        if live {
            assert_eq!(y[i].to_f32() != 0.0, k.keeps(i as u64), "y[{i}]");
            assert_eq!(dx[i].to_f32() != 0.0, k.keeps(i as u64), "dx[{i}]");
        }
    }
}
