//! CPU tests of the global-norm reference: the kernel-order mirror against plain f64, the
//! reductions, the finalize (clipping, flag, loss scale), validation and the 64-bit layout.

mod common;

use common::{check, close, rng, uniform};
use fusedreg::global_norm::{self, cpu};
use fusedreg::multi_tensor::{Layout, CHUNK, MAX_CHUNKS};
use fusedreg::Dtype;
use half::{bf16, f16};

/// Sizes crossing every vector and chunk boundary, with zero-size tensors first, inside and last.
fn sizes() -> Vec<usize> {
    vec![
        0,
        1,
        3,
        4,
        5,
        7,
        8,
        9,
        511,
        2049,
        65_535,
        0,
        65_536,
        65_537,
        278_011,
        3 * 65_536 + 1,
        0,
    ]
}

fn grads<G: Dtype>(seed: u64) -> Vec<Vec<G>> {
    let mut r = rng(seed);
    sizes()
        .into_iter()
        .map(|n| uniform::<G>(&mut r, n, -2.0, 2.0))
        .collect()
}

fn refs<G>(v: &[Vec<G>]) -> Vec<&[G]> {
    v.iter().map(|x| &x[..]).collect()
}

fn mirror_matches_f64<G: Dtype>(seed: u64) {
    let g = grads::<G>(seed);
    let r = refs(&g);
    let v = cpu::global_norm(&r, None, 1.0).unwrap();
    let exact = cpu::norm_f64(&r);
    check(close(
        &format!("{} norm vs f64", G::KIND.name()),
        &[f64::from(v.norm)],
        &[exact],
        0.0,
        2e-6,
    ));
    // The f64 reduction of the f32 partials is itself within f32 rounding of the exact sum.
    let p = cpu::partials(&r).unwrap();
    let layout = Layout::new(&r.iter().map(|x| x.len() as u64).collect::<Vec<_>>()).unwrap();
    assert_eq!(p.len(), layout.num_chunks());
    for (c, &partial) in p.iter().enumerate() {
        let ch = layout.chunk(c);
        let s = ch.start as usize;
        let exact: f64 = r[ch.tensor][s..s + ch.len]
            .iter()
            .map(|x| f64::from(x.to_f32()).powi(2))
            .sum();
        check(close(
            &format!("chunk {c} partial"),
            &[f64::from(partial)],
            &[exact],
            0.0,
            1e-5,
        ));
    }
    assert_eq!(v.coef, 1.0);
    assert_eq!(v.grad_scale, 1.0);
    assert_eq!(v.nonfinite, 0);
}

#[test]
fn mirror_matches_f64_f32() {
    mirror_matches_f64::<f32>(1);
}

#[test]
fn mirror_matches_f64_bf16() {
    mirror_matches_f64::<bf16>(2);
}

#[test]
fn mirror_matches_f64_f16() {
    mirror_matches_f64::<f16>(3);
}

#[test]
fn chunk_partial_uses_the_fixed_lane_order() {
    // A full chunk of random values: the rounding of 65,536 f32 additions depends on their
    // order. The mirror's result must equal an independent evaluation of the documented order.
    let mut r = rng(4);
    let x: Vec<f32> = uniform(&mut r, 65_536, -1.5, 1.5);
    let got = cpu::chunk_partial(&x);
    // Independent evaluation: thread t lane j sums x[(k*512 + t)*4 + j].
    let mut threads = vec![0f32; 512];
    for (t, th) in threads.iter_mut().enumerate() {
        let mut acc = [0f32; 4];
        for k in 0..32 {
            for (j, a) in acc.iter_mut().enumerate() {
                let v = x[(k * 512 + t) * 4 + j];
                *a = v.mul_add(v, *a);
            }
        }
        *th = (acc[0] + acc[2]) + (acc[1] + acc[3]);
    }
    let tree = |v: &mut Vec<f32>| {
        while v.len() > 1 {
            let h = v.len() / 2;
            for i in 0..h {
                v[i] += v[i + h];
            }
            v.truncate(h);
        }
        v[0]
    };
    let warps: Vec<f32> = threads.chunks(32).map(|w| tree(&mut w.to_vec())).collect();
    let want = tree(&mut warps.clone());
    assert_eq!(got.to_bits(), want.to_bits());
    // A different order (plain sequential) gives different bits here: the order is pinned.
    let seq = x.iter().fold(0f32, |a, &v| v.mul_add(v, a));
    assert_ne!(
        seq.to_bits(),
        got.to_bits(),
        "test data does not exercise the order"
    );
}

#[test]
fn reduce_and_per_tensor_match_f64() {
    let g = grads::<f32>(5);
    let r = refs(&g);
    let p = cpu::partials(&r).unwrap();
    let plain: f64 = p.iter().map(|&x| f64::from(x)).sum();
    check(close("reduce", &[cpu::reduce(&p)], &[plain], 0.0, 1e-14));
    let layout = Layout::new(&r.iter().map(|x| x.len() as u64).collect::<Vec<_>>()).unwrap();
    let (sums, norms) = cpu::per_tensor(&layout, &p);
    for (t, x) in r.iter().enumerate() {
        let exact: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        check(close(
            &format!("tensor {t} sumsq"),
            &[sums[t]],
            &[exact],
            0.0,
            1e-5,
        ));
        assert_eq!(norms[t], sums[t].sqrt() as f32);
        if x.is_empty() {
            assert_eq!(sums[t], 0.0);
        }
    }
    assert_eq!(cpu::reduce(&[]), 0.0);
    // Many partials: the 1024-way strided order and the tree.
    let many: Vec<f32> = (0..5000).map(|i| 1.0 + (i % 13) as f32 * 0.25).collect();
    let plain: f64 = many.iter().map(|&x| f64::from(x)).sum();
    assert_eq!(cpu::reduce(&many), plain); // exactly representable sums
}

#[test]
fn clipping_below_and_above_max_norm() {
    // Norm 5 (3-4-5): below max_norm 10 -> coef 1; above max_norm 1 -> 1 / (5 + 1e-6).
    let a = [3.0f32];
    let b = [4.0f32];
    let below = cpu::global_norm(&[&a[..], &b[..]], Some(10.0), 1.0).unwrap();
    assert_eq!((below.norm, below.coef, below.grad_scale), (5.0, 1.0, 1.0));
    let above = cpu::global_norm(&[&a[..], &b[..]], Some(1.0), 1.0).unwrap();
    assert_eq!(above.coef, 1.0f32 / (5.0f32 + 1e-6));
    assert_eq!(above.grad_scale, above.coef);
    assert!(above.coef < 1.0);
    // Without clipping the coefficient is exactly 1 whatever the norm.
    let none = cpu::global_norm(&[&a[..], &b[..]], None, 1.0).unwrap();
    assert_eq!(none.coef, 1.0);
}

#[test]
fn loss_scale_is_divided_out() {
    let mut r = rng(6);
    let g: Vec<f32> = uniform(&mut r, 100_003, -1.0, 1.0);
    let scaled: Vec<f32> = g.iter().map(|&x| x * 1024.0).collect(); // exact
    let plain = cpu::global_norm(&[&g[..]], Some(0.5), 1.0).unwrap();
    let ls = cpu::global_norm(&[&scaled[..]], Some(0.5), 1024.0).unwrap();
    // Power-of-two scaling commutes with every rounding: identical norm and coefficient.
    assert_eq!(ls.norm.to_bits(), plain.norm.to_bits());
    assert_eq!(ls.coef.to_bits(), plain.coef.to_bits());
    assert_eq!(ls.grad_scale, plain.coef / 1024.0);
    assert_eq!(ls.sumsq, plain.sumsq * 1024.0 * 1024.0);
}

#[test]
fn nonfinite_gradients_set_the_flag() {
    let mut r = rng(7);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e20] {
        let mut g: Vec<f32> = uniform(&mut r, 70_000, -1.0, 1.0);
        g[66_000] = bad;
        let v = cpu::global_norm(&[&g[..]], Some(1.0), 1.0).unwrap();
        assert_eq!(v.nonfinite, 1, "gradient {bad} not flagged");
        assert!(!v.is_finite());
    }
    let v = cpu::finalize(f64::INFINITY, None, 1.0);
    assert_eq!(v.nonfinite, 1);
    let v = cpu::finalize(4.0, None, 1.0);
    assert_eq!(v.nonfinite, 0);
}

#[test]
fn validation_errors() {
    let g = [1.0f32];
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = cpu::global_norm(&[&g[..]], Some(bad), 1.0).unwrap_err();
        assert!(e.to_string().contains("max_norm"), "{e}");
    }
    for bad in [0.0, -2.0, f32::NAN, f32::INFINITY] {
        let e = cpu::global_norm(&[&g[..]], None, bad).unwrap_err();
        assert!(e.to_string().contains("loss_scale"), "{e}");
    }
    let e = cpu::global_norm::<f32>(&[], None, 1.0).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    assert!(global_norm::check_max_norm(None).is_ok());
}

#[test]
fn all_zero_size_tensors_give_norm_zero() {
    let e: [f32; 0] = [];
    let v = cpu::global_norm(&[&e[..], &e[..]], Some(1.0), 1.0).unwrap();
    assert_eq!((v.sumsq, v.norm, v.coef, v.nonfinite), (0.0, 0.0, 1.0, 0));
}

#[test]
fn scale_pass_reference() {
    let mut g = vec![bf16::from_f32(1.0), bf16::from_f32(-3.0)];
    cpu::scale(&mut g, 1.0);
    assert_eq!(g[1].to_f32(), -3.0);
    cpu::scale(&mut g, 0.5);
    assert_eq!((g[0].to_f32(), g[1].to_f32()), (0.5, -1.5));
    let mut f = vec![1.0f32 / 3.0];
    cpu::scale(&mut f, 0.1);
    assert_eq!(f[0], (1.0f32 / 3.0) * 0.1);
}

#[test]
fn layout_uses_64bit_sizes() {
    let big = (1u64 << 33) + 5;
    let l = Layout::new(&[0, big, 0, 1, CHUNK]).unwrap();
    assert_eq!(l.num_chunks() as u64, (1 << 17) + 1 + 1 + 1);
    assert_eq!(l.chunks(0), 0..0);
    assert_eq!(l.chunks(1), 0..(1 << 17) + 1);
    assert_eq!(l.chunks(2), (1 << 17) + 1..(1 << 17) + 1);
    let last_of_big = l.chunk((1 << 17) as usize);
    assert_eq!(last_of_big.tensor, 1);
    assert_eq!(last_of_big.start, 1u64 << 33);
    assert_eq!(last_of_big.len, 5);
    let past_2_32 = l.chunk((1 << 16) + 3);
    assert_eq!(past_2_32.start, (1u64 << 32) + 3 * CHUNK);
    assert_eq!(l.chunk(l.num_chunks() - 1).len, CHUNK as usize);
    assert_eq!(l.total_elements(), big + 1 + CHUNK);

    // A chunk of a tensor far beyond 2^32 elements, evaluated from its 64-bit element indices:
    // the mirror only needs the chunk's own elements.
    let value = |i: u64| ((i % 1000) as f32 - 500.0) * 1e-3;
    let p = cpu::partials_with(&l, |c| {
        let ch = l.chunk(c);
        if ch.tensor != 1 || ch.start < (1u64 << 33) - CHUNK {
            return 0.0;
        }
        let data: Vec<f32> = (0..ch.len as u64).map(|j| value(ch.start + j)).collect();
        cpu::chunk_partial(&data)
    });
    let exact: f64 = ((1u64 << 33) - CHUNK..big)
        .map(|i| f64::from(value(i)).powi(2))
        .sum();
    let got: f64 = p.iter().map(|&x| f64::from(x)).sum();
    check(close(
        "last chunks of a 2^33 tensor",
        &[got],
        &[exact],
        0.0,
        1e-5,
    ));

    // Too many chunks for one launch: an error, before anything is allocated.
    let e = Layout::new(&[MAX_CHUNKS * CHUNK + 1]).unwrap_err();
    assert!(e.to_string().contains("split"), "{e}");
}

#[test]
fn bytes_formulas() {
    use fusedreg::DtypeKind::*;
    assert_eq!(global_norm::norm_min_bytes(10, Bf16), 20);
    assert_eq!(global_norm::norm_min_bytes(10, F32), 40);
    assert_eq!(global_norm::scale_min_bytes(10, Bf16), 40);
    assert_eq!(global_norm::scale_min_bytes(10, F32), 80);
}

// ------------------------------------------------------------------------------------------
// Bad input (issue 17): bad scalars, the norm of nothing (moved from tests/bad_input.rs, which keeps
// what is not one op's).
// ------------------------------------------------------------------------------------------

mod bad_input {
    use crate::common::refused;
    use half::bf16;

    #[test]
    fn global_norm_refuses_bad_scalars() {
        use fusedreg::global_norm::{check_loss_scale, check_max_norm, cpu as gn};
        let g = [3.0f32, 4.0];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, 0.0] {
            refused("max_norm", check_max_norm(Some(bad)));
            refused("max_norm", gn::global_norm(&[&g[..]], Some(bad), 1.0));
            refused("loss_scale", check_loss_scale(bad));
            refused("loss_scale", gn::global_norm(&[&g[..]], None, bad));
        }
        // Non-finite gradients are data, not arguments: the documented result is the flag, and the
        // norm is not a silent finite value.
        for bad in [f32::NAN, f32::INFINITY] {
            let b = [1.0f32, bad];
            let v = gn::global_norm(&[&b[..]], Some(1.0), 1.0).unwrap();
            assert_eq!(v.nonfinite, 1, "{bad}");
            assert!(!v.is_finite());
        }
        // Gradients finite but whose squares overflow the f32 partials: flagged (documented: the
        // flag is set when the norm is not finite), never a wrong finite norm.
        let huge = [f32::MAX; 4];
        let v = gn::global_norm(&[&huge[..]], Some(1.0), 1.0).unwrap();
        assert_eq!(v.nonfinite, 1, "{v:?}");
    }

    /// No tensors is an error (documented: "no tensors"); zero-size tensors have norm 0 and
    /// coefficient 1 (a valid, finite result).
    #[test]
    fn global_norm_of_nothing_is_zero() {
        use fusedreg::global_norm::cpu as gn;
        refused("no tensors", gn::global_norm::<f32>(&[], Some(1.0), 1.0));
        let empty: Vec<f32> = Vec::new();
        for list in [vec![&empty[..]], vec![&empty[..], &empty[..]]] {
            let v = gn::global_norm::<f32>(&list, Some(1.0), 1.0).unwrap();
            assert_eq!((v.sumsq, v.norm, v.coef, v.nonfinite), (0.0, 0.0, 1.0, 0));
        }
        assert_eq!(gn::reduce(&[]), 0.0);
        refused("partials of no tensors", gn::partials::<f32>(&[]));
        assert_eq!(
            gn::partials::<f32>(&[&empty[..]]).unwrap(),
            Vec::<f32>::new()
        );
        assert_eq!(gn::norm_f64::<f32>(&[]), 0.0);
        let mut none: [bf16; 0] = [];
        gn::scale(&mut none, 0.5);
    }
}
