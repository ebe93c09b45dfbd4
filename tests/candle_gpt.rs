//! The `train_gpt` example's model (`examples/train_gpt/`), on candle's CPU device: the
//! candle-only path and the fusedreg path compute the same function with dropout off, and
//! training through either lowers the loss within a few steps.
#![cfg(feature = "candle")]

mod train_gpt;

use candle_core::{DType, Device, Tensor};
use fusedreg::candle::StepKeys;
use train_gpt::config;
use train_gpt::model::{cross_entropy, Gpt, GptConfig, Path};
use train_gpt::train::{self, Corpus, Optim, OptimConfig, Sampler};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    let a = a.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    Ok(a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale)
}

/// Random tokens (not a constant sequence), from the corpus so the test also reads it.
fn tokens(cfg: &GptConfig, batch: usize, seed: u64) -> candle_core::Result<(Tensor, Tensor)> {
    let corpus = Corpus::load(train::CORPUS, 0.1).expect("corpus readable");
    let offs = Sampler(seed).offsets(corpus.train.len(), batch, cfg.context);
    train::batch(&corpus.train, &offs, cfg.context, &Device::Cpu)
}

/// The two paths agree in evaluation (keys = None: no dropout, no drop path), logits and the
/// gradients of every parameter, on a model with trained-looking (non-default) norm parameters.
#[test]
fn paths_agree_without_dropout() -> candle_core::Result<()> {
    let cfg = config();
    let dev = Device::Cpu;
    let model = Gpt::new(&cfg, 7, &dev)?;
    // Move the norm gains and biases off 1 and 0 so that their use is checked too.
    for (v, decay) in model.vars() {
        if !decay {
            let noise = Tensor::randn(0f32, 0.3, v.shape(), &dev)?;
            v.set(&(v.as_tensor() + noise)?)?;
        }
    }
    let (x, y) = tokens(&cfg, 3, 11)?;
    let a = model.forward(Path::Candle, &x, None)?;
    let b = model.forward(Path::Fused, &x, None)?;
    assert_eq!(a.dims(), &[3 * cfg.context, cfg.vocab]);
    let d = max_rel_diff(&a, &b)?;
    assert!(d < 1e-5, "logits differ by {d} (relative to the largest)");
    assert!(max_rel_diff(&a, &a.zeros_like()?)? > 0.0);

    // The training losses of the two paths agree too (candle ops vs fusedreg's CrossEntropy).
    let la = cross_entropy(&a, &y, cfg.label_smoothing)?;
    let lf = fusedreg::candle::CrossEntropy::new()
        .with_label_smoothing(cfg.label_smoothing)?
        .forward(&a, &y)?;
    let (la_v, lf_v) = (la.to_scalar::<f32>()?, lf.to_scalar::<f32>()?);
    assert!(
        (la_v - lf_v).abs() <= 1e-5 * la_v.abs(),
        "loss {la_v} vs {lf_v}"
    );

    let ga = la.backward()?;
    let gb = cross_entropy(&b, &y, cfg.label_smoothing)?.backward()?;
    for (i, (v, _)) in model.vars().iter().enumerate() {
        let (ga, gb) = (ga.get(v).expect("grad"), gb.get(v).expect("grad"));
        let d = max_rel_diff(ga, gb)?;
        assert!(
            d < 1e-4,
            "gradient of parameter {i} {:?} differs by {d}",
            v.dims()
        );
    }
    Ok(())
}

/// With dropout on, the fused path's forward is a pure function of the keys (every site is keyed):
/// the same keys give the same logits, the next step's keys other ones, evaluation others again.
#[test]
fn fused_masks_follow_the_keys() -> candle_core::Result<()> {
    let cfg = config();
    let model = Gpt::new(&cfg, 3, &Device::Cpu)?;
    let (x, _) = tokens(&cfg, 2, 5)?;
    let keys = StepKeys::new(9, 4);
    let a = model.forward(Path::Fused, &x, Some(&keys))?;
    let eval = model.forward(Path::Fused, &x, None)?;
    let next = model.forward(Path::Fused, &x, Some(&keys.next_step()?))?;
    let again = model.forward(Path::Fused, &x, Some(&keys))?;
    assert_eq!(max_rel_diff(&a, &again)?, 0.0);
    assert!(max_rel_diff(&a, &eval)? > 0.0);
    assert!(max_rel_diff(&a, &next)? > 0.0);
    Ok(())
}

/// Each path lowers the training loss over a few steps on a fixed batch (with every
/// regulariser on).
#[test]
fn loss_falls_on_both_paths() -> candle_core::Result<()> {
    let cfg = config();
    let dev = Device::Cpu;
    let opt_cfg = OptimConfig {
        lr: 3e-3,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        clip: 1.0,
    };
    let (x, y) = tokens(&cfg, 4, 21)?;
    for path in [Path::Candle, Path::Fused] {
        let model = Gpt::new(&cfg, 1, &dev)?;
        let mut opt = Optim::new(path, &model, &opt_cfg)?;
        let eval = |m: &Gpt| -> candle_core::Result<f32> {
            cross_entropy(&m.forward(path, &x, None)?, &y, 0.0)?.to_scalar::<f32>()
        };
        let before = eval(&model)?;
        let mut keys = StepKeys::new(2, 0);
        for _ in 0..8 {
            let loss = train::train_step(path, &model, &mut opt, (&x, &y), &keys)?;
            assert!(loss.to_scalar::<f32>()?.is_finite());
            keys = keys.next_step()?;
        }
        let after = eval(&model)?;
        // ln(256) = 5.55 at the start; 8 steps at lr 3e-3 on one batch move it well below.
        assert!(
            after < before - 0.1,
            "{}: loss {before} -> {after}",
            path.name()
        );
        assert_eq!(model.tok.dtype(), DType::F32);
    }
    Ok(())
}

/// The corpus loads, its header is gone, and the split is deterministic and disjoint.
#[test]
fn corpus_split() {
    let c = Corpus::load(train::CORPUS, 0.1).expect("corpus readable");
    assert!(
        c.train.starts_with(b"\nPARADISE LOST"),
        "header not stripped"
    );
    assert!(c.heldout.len() * 9 <= c.train.len() + 9);
    assert!(!c.train.windows(12).any(|w| w == b"=== TEXT ===".as_slice()));
    let again = Corpus::load(train::CORPUS, 0.1).expect("corpus readable");
    assert_eq!(c.heldout, again.heldout);
    assert!(c.train.len() + c.heldout.len() < 2 << 20);
}
