//! The example's `--prune` mode, end to end: train the model twice through fusedreg's adapter
//! (with stochastic depth, and without), measure the Block Influence of every sub-block on the
//! held-out text, then remove the `k` lowest-BI sub-blocks (k = 1, 2, 4) and compare the held-out
//! loss with removing `k` at random (mean of [`RANDOM_DRAWS`] draws) and the last `k`, and with
//! ReplaceMe (the removed spans replaced by least-squares linear maps fitted on calibration text
//! from the training part). Writes `bi.csv`, `bi.svg`, `prune.csv` and `prune.md` under `--out`.

use std::fmt::Write as _;

use candle_core::Device;
use fusedreg::candle::StepKeys;

use super::model::{Gpt, Path};
use super::prune::{self, Action};
use super::train::{self, Corpus, Optim, Sampler};
use super::{open_device, plot, Args, BoxResult};

/// How many sub-blocks each pruning removes (those above the model's count are left out).
pub const KS: [usize; 3] = [1, 2, 4];

/// Random removals averaged per `k`.
pub const RANDOM_DRAWS: usize = 8;

/// One pruning result.
struct Row {
    k: usize,
    method: &'static str,
    removed: String,
    loss: f64,
    /// Standard deviation over the draws (random removal only).
    spread: Option<f64>,
}

/// One trained model's measurements.
struct ModelResult {
    label: &'static str,
    drop_path: f64,
    full: f64,
    bi: Vec<Option<f64>>,
    bi_check: Vec<Option<f64>>,
    rows: Vec<Row>,
}

fn names(v: &[usize]) -> String {
    v.iter()
        .map(|&i| prune::name(i))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Trains a model of `args.model` with drop path `drop_path` through the fused path.
fn train_model(
    args: &Args,
    drop_path: f64,
    label: &str,
    corpus: &Corpus,
    dev: &Device,
) -> BoxResult<Gpt> {
    let cfg = super::model::GptConfig {
        drop_path,
        ..args.model.clone()
    };
    let t = cfg.context;
    let model = Gpt::new(&cfg, args.seed, dev)?;
    let mut opt = Optim::new(Path::Fused, &model, &args.optim)?;
    let mut sampler = Sampler(args.seed ^ 0x5EED_BA7C);
    let mut keys = StepKeys::new(args.seed, 0);
    for step in 0..args.steps {
        opt.set_lr(train::lr_at(step, args.steps, args.optim.lr));
        let offs = sampler.offsets(corpus.train.len(), args.batch, t);
        let (x, y) = train::batch(&corpus.train, &offs, t, dev)?;
        let loss = train::train_step(Path::Fused, &model, &mut opt, (&x, &y), &keys)?;
        keys = keys.next_step()?;
        if (step + 1) % args.eval_every == 0 || step + 1 == args.steps {
            println!(
                "[{label}] step {:>5}/{}  train {:.4}",
                step + 1,
                args.steps,
                loss.to_scalar::<f32>()?
            );
        }
    }
    Ok(model)
}

/// BI, then every pruning of one trained model.
fn evaluate(
    args: &Args,
    model: &Gpt,
    (label, drop_path): (&'static str, f64),
    corpus: &Corpus,
    dev: &Device,
) -> BoxResult<ModelResult> {
    let t = model.cfg.context;
    let n = 2 * model.cfg.layers;
    let held = train::even_offsets(corpus.heldout.len(), t, args.eval_windows);
    let calib = Sampler(args.seed ^ 0xCA11_B8A7).offsets(corpus.train.len(), args.calib_windows, t);
    let loss = |plan: &[Action]| prune::loss(model, plan, &corpus.heldout, &held, args.batch, dev);
    let full = loss(&prune::full_plan(model))?;
    let bi_check = prune::bi_f64(model, &corpus.heldout, &held, args.batch, dev)?;
    let bi = bi_check.clone();
    let mut rows = Vec::new();
    let mut rng = Sampler(args.seed ^ 0xD1CE_5EED);
    for k in KS.into_iter().filter(|&k| k <= n) {
        let low = prune::lowest(&bi, k);
        rows.push(Row {
            k,
            method: "lowest BI",
            removed: names(&low),
            loss: loss(&prune::removal_plan(model, &low))?,
            spread: None,
        });
        let mut draws = Vec::with_capacity(RANDOM_DRAWS);
        for _ in 0..RANDOM_DRAWS {
            let r = prune::random(n, k, &mut rng);
            draws.push(loss(&prune::removal_plan(model, &r))?);
        }
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        rows.push(Row {
            k,
            method: "random",
            removed: format!("{RANDOM_DRAWS} draws"),
            loss: mean,
            spread: Some(var.sqrt()),
        });
        let last: Vec<usize> = (n - k..n).collect();
        rows.push(Row {
            k,
            method: "last k",
            removed: names(&last),
            loss: loss(&prune::removal_plan(model, &last))?,
            spread: None,
        });
        let spans = prune::spans(&low);
        let maps = prune::fit_spans(model, &spans, &corpus.train, &calib, args.batch, dev)?;
        rows.push(Row {
            k,
            method: "ReplaceMe (lowest BI)",
            removed: spans
                .iter()
                .map(|&(a, b)| format!("[{}]", names(&(a..b).collect::<Vec<_>>())))
                .collect::<Vec<_>>()
                .join(" "),
            loss: loss(&prune::replaceme_plan(model, &spans, &maps))?,
            spread: None,
        });
    }
    Ok(ModelResult {
        label,
        drop_path,
        full,
        bi,
        bi_check,
        rows,
    })
}

fn fmt_bi(b: Option<f64>) -> String {
    b.map_or_else(|| "-".into(), |v| format!("{v:.4}"))
}

/// The markdown report: per model, BI and the pruning table; then the comparison.
fn report(args: &Args, results: &[ModelResult], device: &str) -> String {
    let m = &args.model;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Pruning a {}-block GPT (hidden {}, context {}) trained {} steps on {device}; held-out loss \
         = mean plain cross-entropy (nats per byte) on {} windows of the held-out text; \
         calibration for ReplaceMe: {} windows of the training text; ridge {} x mean diagonal.\n",
        m.layers,
        m.hidden,
        m.context,
        args.steps,
        args.eval_windows,
        args.calib_windows,
        prune::RIDGE
    );
    for r in results {
        let _ = writeln!(
            s,
            "### {} (drop path {}): full model {:.4}\n",
            r.label, r.drop_path, r.full
        );
        let _ = writeln!(
            s,
            "| sub-block | {} |",
            (0..r.bi.len())
                .map(prune::name)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|{}", "---|".repeat(r.bi.len()));
        let _ = writeln!(
            s,
            "| BI | {} |\n",
            r.bi.iter()
                .map(|&b| fmt_bi(b))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "| k | method | removed | held-out loss | vs full |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for row in &r.rows {
            let spread = row.spread.map_or(String::new(), |v| format!(" ± {v:.4}"));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.4}{spread} | {:+.4} |",
                row.k,
                row.method,
                row.removed,
                row.loss,
                row.loss - r.full
            );
        }
        let _ = writeln!(s);
    }
    if let [sd, plain] = results {
        let _ = writeln!(
            s,
            "### Did stochastic depth make the model easier to prune? (loss increase over its own \
             full model; smaller is easier)\n"
        );
        let _ = writeln!(s, "| k | method | with drop path | without | easier |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for (a, b) in sd.rows.iter().zip(&plain.rows) {
            let (da, db) = (a.loss - sd.full, b.loss - plain.full);
            let _ = writeln!(
                s,
                "| {} | {} | {da:+.4} | {db:+.4} | {} |",
                a.k,
                a.method,
                // Differences below the table's precision are no evidence either way.
                if (da - db).abs() < 5e-5 {
                    "same"
                } else if da < db {
                    "with"
                } else {
                    "without"
                }
            );
        }
        let _ = writeln!(s);
    }
    s
}

/// Runs the experiment (see the module docs).
pub fn run(args: &Args) -> BoxResult<()> {
    let dev = open_device(&args.device)?;
    let corpus = Corpus::load(train::CORPUS, args.heldout_fraction)?;
    let t = args.model.context;
    if corpus.heldout.len() <= t || corpus.train.len() <= t {
        return Err("corpus too short for this context".into());
    }
    std::fs::create_dir_all(&args.out)?;
    let mut results = Vec::new();
    for (label, p) in [
        ("with stochastic depth", args.model.drop_path),
        ("without stochastic depth", 0.0),
    ] {
        let model = train_model(args, p, label, &corpus, &dev)?;
        results.push(evaluate(args, &model, (label, p), &corpus, &dev)?);
    }
    let device = format!("{dev:?}");
    let mut md = report(args, &results, &device);
    if args.tiny || device == "Cpu" {
        let _ = writeln!(
            md,
            "Note: a CPU run{}: the numbers show that the pipeline works end to end, not what \
             pruning does to a trained model.",
            if args.tiny {
                " of the tiny configuration (a few steps of a tiny model)"
            } else {
                ""
            }
        );
    }
    print!("{md}");
    std::fs::write(args.out.join("prune.md"), &md)?;

    let mut csv =
        String::from("model,drop_path,k,method,removed,heldout_loss,vs_full,sd_over_draws\n");
    let mut bi_csv = String::from("model,drop_path,sub_block,layer,kind,bi,bi_f64_check\n");
    for r in &results {
        let _ = writeln!(csv, "{},{},0,full,,{},0,", r.label, r.drop_path, r.full);
        for row in &r.rows {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{}",
                r.label,
                r.drop_path,
                row.k,
                row.method,
                row.removed,
                row.loss,
                row.loss - r.full,
                row.spread.map_or(String::new(), |v| v.to_string())
            );
        }
        for (i, (b, c)) in r.bi.iter().zip(&r.bi_check).enumerate() {
            let opt = |v: &Option<f64>| v.map_or(String::new(), |x| x.to_string());
            let kind = if i % 2 == 0 { "attention" } else { "mlp" };
            let _ = writeln!(
                bi_csv,
                "{},{},{},{},{kind},{},{}",
                r.label,
                r.drop_path,
                prune::name(i),
                i / 2,
                opt(b),
                opt(c)
            );
        }
    }
    std::fs::write(args.out.join("prune.csv"), csv)?;
    std::fs::write(args.out.join("bi.csv"), bi_csv)?;

    let colors = ["#d62728", "#1f77b4"];
    let mut series = Vec::new();
    for (r, color) in results.iter().zip(colors) {
        for (kind, dashed) in [("attention", false), ("MLP", true)] {
            let off = usize::from(dashed);
            series.push(plot::Series {
                label: format!("{kind}, {}", r.label),
                color,
                dashed,
                points: (off..r.bi.len())
                    .step_by(2)
                    .map(|i| ((i / 2) as f64, r.bi[i].unwrap_or(f64::NAN)))
                    .collect(),
            });
        }
    }
    let notes: Vec<String> = results
        .iter()
        .map(|r| format!("{}: full-model held-out loss {:.4}", r.label, r.full))
        .collect();
    let title = format!(
        "Block Influence per layer: {} blocks, hidden {}, {} steps ({device})",
        args.model.layers, args.model.hidden, args.steps
    );
    std::fs::write(
        args.out.join("bi.svg"),
        plot::svg_axes(
            &title,
            ("layer", "Block Influence (1 - mean cos)"),
            &notes,
            &series,
        ),
    )?;
    println!(
        "wrote {}/{{prune.md, prune.csv, bi.csv, bi.svg}}",
        args.out.display()
    );
    Ok(())
}
