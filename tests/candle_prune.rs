//! The pruning pieces of the `train_gpt` example (`examples/train_gpt/prune.rs`), on candle's
//! CPU device: the pruned forward with every sub-block kept is the model's own evaluation
//! forward, a skipped sub-block leaves the stream unchanged, ReplaceMe's least-squares map fits
//! the span better than removing it, the Cholesky solve, the selections, and Block Influence
//! from the fused ops' meter against the f64 recomputation from the streams.
#![cfg(feature = "candle")]

mod train_gpt;

use candle_core::{Device, Tensor};
use train_gpt::config;
use train_gpt::model::{Gpt, Path};
use train_gpt::prune::{self, Action};
use train_gpt::train::{self, Corpus, Sampler};

fn max_abs(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// A model whose sub-blocks do something (weights scaled up from the tiny init) and windows of
/// the corpus.
fn setup() -> candle_core::Result<(Gpt, Corpus, Vec<usize>)> {
    let cfg = config();
    let model = Gpt::new(&cfg, 5, &Device::Cpu)?;
    for (v, decay) in model.vars() {
        if decay && v.rank() == 2 {
            v.set(&(v.as_tensor() * 8.0)?)?;
        }
    }
    let corpus = Corpus::load(train::CORPUS, 0.1).expect("corpus readable");
    let offs = Sampler(3).offsets(corpus.train.len(), 6, cfg.context);
    Ok((model, corpus, offs))
}

#[test]
fn the_full_plan_is_the_models_evaluation_forward() -> candle_core::Result<()> {
    let (model, corpus, offs) = setup()?;
    let (x, _) = train::batch(&corpus.train, &offs, model.cfg.context, &Device::Cpu)?;
    let want = model.forward(Path::Candle, &x, None)?;
    let got = prune::hidden(&model, &x, &prune::full_plan(&model), None)?
        .matmul(model.head.as_tensor())?;
    assert_eq!(max_abs(&want, &got)?, 0.0);
    Ok(())
}

#[test]
fn a_skipped_sub_block_leaves_the_stream_and_a_zero_map_is_a_skip() -> candle_core::Result<()> {
    let (model, corpus, offs) = setup()?;
    let (x, _) = train::batch(&corpus.train, &offs, model.cfg.context, &Device::Cpu)?;
    let n = 2 * model.cfg.layers;
    let mut full = Vec::new();
    prune::hidden(&model, &x, &prune::full_plan(&model), Some(&mut full))?;
    assert_eq!(full.len(), n + 1);
    for i in 0..n {
        let mut s = Vec::new();
        let h = prune::hidden(&model, &x, &prune::removal_plan(&model, &[i]), Some(&mut s))?;
        assert_eq!(max_abs(&s[i], &s[i + 1])?, 0.0, "{}", prune::name(i));
        assert!(
            max_abs(&full[i], &full[i + 1])? > 0.0,
            "{} does nothing",
            prune::name(i)
        );
        let mut plan = prune::full_plan(&model);
        plan[i] = Action::Map(Tensor::zeros(
            (24, 24),
            candle_core::DType::F32,
            &Device::Cpu,
        )?);
        assert_eq!(max_abs(&h, &prune::hidden(&model, &x, &plan, None)?)?, 0.0);
    }
    Ok(())
}

/// On its calibration windows the fitted map's misfit is below removal's (the ridge objective at
/// its minimum is at most its value at D = 0), and it changes the output.
#[test]
fn replaceme_fits_each_span_better_than_removing_it() -> candle_core::Result<()> {
    let (model, corpus, offs) = setup()?;
    let dev = Device::Cpu;
    let (x, _) = train::batch(&corpus.train, &offs, model.cfg.context, &dev)?;
    let mut s = Vec::new();
    prune::hidden(&model, &x, &prune::full_plan(&model), Some(&mut s))?;
    let spans = prune::spans(&[4, 1, 2]);
    assert_eq!(spans, vec![(1, 3), (4, 5)]);
    let maps = prune::fit_spans(&model, &spans, &corpus.train, &offs, 4, &dev)?;
    for (&(a, b), dm) in spans.iter().zip(&maps) {
        let skip = (&s[b] - &s[a])?.sqr()?.sum_all()?.to_scalar::<f32>()?;
        let fit = (&s[a] + s[a].matmul(dm)? - &s[b])?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(
            fit < 0.9 * skip,
            "span {a}..{b}: misfit {fit} vs removal {skip}"
        );
    }
    let plan = prune::replaceme_plan(&model, &spans, &maps);
    assert!(matches!(plan[1], Action::Map(_)) && matches!(plan[2], Action::Skip));
    let removed = prune::hidden(&model, &x, &prune::removal_plan(&model, &[1, 2, 4]), None)?;
    assert!(max_abs(&removed, &prune::hidden(&model, &x, &plan, None)?)? > 0.0);
    Ok(())
}

#[test]
fn cholesky_solves_spd_systems_and_refuses_others() {
    let d = 5;
    let mut g = Sampler(9);
    let m: Vec<f64> = (0..d * d)
        .map(|_| g.below(1000) as f64 / 500.0 - 1.0)
        .collect();
    // A = M M^T + I, B random 5 x 3.
    let mut a = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            a[i * d + j] = (0..d).map(|k| m[i * d + k] * m[j * d + k]).sum::<f64>()
                + if i == j { 1.0 } else { 0.0 };
        }
    }
    let b: Vec<f64> = (0..d * 3).map(|i| i as f64 - 7.0).collect();
    let x = prune::solve_spd(&a, &b, d).expect("SPD");
    for i in 0..d {
        for c in 0..3 {
            let ax: f64 = (0..d).map(|k| a[i * d + k] * x[k * 3 + c]).sum();
            assert!((ax - b[i * 3 + c]).abs() < 1e-9, "row {i} col {c}: {ax}");
        }
    }
    let mut not_pd = a.clone();
    not_pd[0] = -1.0;
    assert!(prune::solve_spd(&not_pd, &b, d).is_none());
}

#[test]
fn selections() {
    let bi = [
        Some(0.3),
        None,
        Some(0.1),
        Some(0.2),
        Some(f64::NAN),
        Some(0.1),
    ];
    assert_eq!(prune::lowest(&bi, 2), vec![2, 5]);
    assert_eq!(prune::lowest(&bi, 3), vec![2, 3, 5]);
    assert_eq!(prune::lowest(&bi, 6), vec![0, 1, 2, 3, 4, 5]);
    let mut g = Sampler(1);
    let mut seen = [0usize; 6];
    for _ in 0..200 {
        let r = prune::random(6, 2, &mut g);
        assert!(r.len() == 2 && r[0] < r[1] && r[1] < 6);
        r.iter().for_each(|&i| seen[i] += 1);
    }
    assert!(seen.iter().all(|&c| c > 30), "{seen:?}");
    assert_eq!(prune::name(5), "mlp2");
}

#[test]
fn block_influence_from_streams_is_a_cosine_measure() -> candle_core::Result<()> {
    let (model, corpus, offs) = setup()?;
    let bi = prune::bi_f64(&model, &corpus.train, &offs, 4, &Device::Cpu)?;
    assert_eq!(bi.len(), 6);
    for (i, b) in bi.iter().enumerate() {
        let b = b.expect("every row counts");
        assert!(b > 0.0 && b < 2.0, "{}: {b}", prune::name(i));
    }
    Ok(())
}
