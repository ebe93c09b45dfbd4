//! A small GPT-style, pre-norm, byte-level transformer trained twice from the same seed on the
//! committed corpus (`data/paradise_lost.txt`, Milton, public domain): once with candle's own
//! ops, once through fusedreg's candle adapter. Prints both runs' train and held-out loss curves,
//! time per step and peak memory, and writes them under `--out` (`curves.csv`, `loss.svg`,
//! `summary.txt`).
//!
//! ```text
//! cargo run -p fusedreg --features candle --example train_gpt -- --tiny          # CPU, CI
//! cargo run --release -p fusedreg --features candle-cuda --example train_gpt      # GPU, full size
//! cargo run --release -p fusedreg --features candle-cuda --example train_gpt -- --prune
//! ```
//!
//! `--prune` runs the pruning experiment instead (`experiment.rs`): the model trained with and
//! without stochastic depth, Block Influence per sub-block measured by fusedreg's fused residual
//! adds on the held-out text, and the held-out loss after removing the lowest-BI, random or last
//! sub-blocks, or replacing them by least-squares linear maps (ReplaceMe).
//!
//! Each run is a child process of this one (the same binary with `--child <path>`), so its peak
//! memory is its own: on the CPU the child's peak resident set (`VmHWM`), on CUDA the device
//! memory in use from the driver (`cuMemGetInfo`) sampled after every forward, backward and
//! optimizer step. `--help` lists the flags.

mod experiment;
mod model;
mod plot;
mod prune;
mod train;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use candle_core::Device;
use fusedreg::candle::StepKeys;
use model::{Gpt, GptConfig, Path};
use train::{Corpus, Optim, OptimConfig, Sampler};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Command-line settings (defaults: the full size for a GPU).
#[derive(Clone, Debug)]
struct Args {
    model: GptConfig,
    optim: OptimConfig,
    steps: usize,
    batch: usize,
    seed: u64,
    eval_every: usize,
    eval_windows: usize,
    heldout_fraction: f64,
    out: PathBuf,
    device: String,
    child: Option<Path>,
    tiny: bool,
    prune: bool,
    calib_windows: usize,
}

const HELP: &str = "train_gpt: a small GPT trained with candle's ops and with fusedreg's adapter

  --tiny               CI size on the CPU: 2 blocks, hidden 32, 2 heads, context 32, batch 8,
                       20 steps (other flags given after it still apply)
  --steps N            training steps per run            (default 1000)
  --layers N           transformer blocks                (6)
  --hidden N           hidden size                       (384)
  --heads N            attention heads                   (6)
  --context N          context length in bytes           (256)
  --batch N            sequences per step                (32)
  --lr X               peak learning rate                (1e-3; warm-up 10%, cosine to 10%)
  --weight-decay X     on matrices and embeddings        (0.1)
  --clip X             global gradient-norm clip, 0 off  (1.0)
  --dropout X          every element dropout site        (0.1)
  --attn-dropout X     attention probabilities           (0.1)
  --drop-path X        last block's rate, linear in depth (0.1)
  --label-smoothing X  of the training loss              (0.1)
  --no-lns             LayerNorm Scaling off (on: pre-norms of block l times 1/sqrt(l))
  --seed N             weights, batches and masks        (42)
  --eval-every N       held-out evaluation interval      (100)
  --eval-windows N     held-out windows per evaluation   (64)
  --device D           auto | cpu | cuda                 (auto)
  --out DIR            output folder                     (target/train_gpt)

  --prune              the pruning experiment instead of the side-by-side runs: the fusedreg
                       model trained with drop path (--drop-path, default 0.2 in this mode) and
                       without, Block Influence per sub-block on the held-out text, then held-out
                       loss after removing k = 1, 2, 4 sub-blocks (lowest BI, random, last) and
                       with ReplaceMe; writes prune.md, prune.csv, bi.csv, bi.svg. With --tiny:
                       3 blocks
  --calib-windows N    ReplaceMe calibration windows of the training text (64)";

fn default_args() -> Args {
    Args {
        model: GptConfig {
            vocab: 256,
            layers: 6,
            hidden: 384,
            heads: 6,
            context: 256,
            mlp_ratio: 4,
            dropout: 0.1,
            attn_dropout: 0.1,
            drop_path: 0.1,
            label_smoothing: 0.1,
            layer_norm_scaling: true,
            eps: 1e-5,
        },
        optim: OptimConfig {
            lr: 1e-3,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip: 1.0,
        },
        steps: 1000,
        batch: 32,
        seed: 42,
        eval_every: 100,
        eval_windows: 64,
        heldout_fraction: 0.1,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/train_gpt")),
        device: "auto".into(),
        child: None,
        tiny: false,
        prune: false,
        calib_windows: 64,
    }
}

fn parse_args(argv: &[String]) -> BoxResult<Args> {
    let mut a = default_args();
    if argv.iter().any(|s| s == "--tiny") {
        a.tiny = true;
        a.model.layers = 2;
        a.model.hidden = 32;
        a.model.heads = 2;
        a.model.context = 32;
        a.batch = 8;
        a.steps = 20;
        a.eval_every = 5;
        a.eval_windows = 16;
        a.calib_windows = 16;
        a.device = "cpu".into();
    }
    if argv.iter().any(|s| s == "--prune") {
        a.prune = true;
        // A larger rate than the side-by-side runs' so that the two models differ visibly.
        a.model.drop_path = 0.2;
        if a.tiny {
            a.model.layers = 3; // 6 sub-blocks: removing 4 still leaves two
        }
    }
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--tiny" | "--prune" => {}
            "--calib-windows" => a.calib_windows = val()?.parse()?,
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            "--steps" => a.steps = val()?.parse()?,
            "--layers" => a.model.layers = val()?.parse()?,
            "--hidden" => a.model.hidden = val()?.parse()?,
            "--heads" => a.model.heads = val()?.parse()?,
            "--context" => a.model.context = val()?.parse()?,
            "--batch" => a.batch = val()?.parse()?,
            "--lr" => a.optim.lr = val()?.parse()?,
            "--weight-decay" => a.optim.weight_decay = val()?.parse()?,
            "--clip" => a.optim.clip = val()?.parse()?,
            "--dropout" => a.model.dropout = val()?.parse()?,
            "--attn-dropout" => a.model.attn_dropout = val()?.parse()?,
            "--drop-path" => a.model.drop_path = val()?.parse()?,
            "--label-smoothing" => a.model.label_smoothing = val()?.parse()?,
            "--no-lns" => a.model.layer_norm_scaling = false,
            "--seed" => a.seed = val()?.parse()?,
            "--eval-every" => a.eval_every = val()?.parse()?,
            "--eval-windows" => a.eval_windows = val()?.parse()?,
            "--device" => a.device = val()?,
            "--out" => a.out = PathBuf::from(val()?),
            "--child" => {
                a.child = Some(match val()?.as_str() {
                    "candle" => Path::Candle,
                    "fusedreg" => Path::Fused,
                    other => return Err(format!("--child {other}: candle or fusedreg").into()),
                })
            }
            other => return Err(format!("unknown flag {other} (see --help)").into()),
        }
    }
    a.model.validate()?;
    if a.steps == 0 || a.batch == 0 || a.eval_every == 0 || a.calib_windows == 0 {
        return Err("--steps, --batch, --eval-every and --calib-windows must be positive".into());
    }
    Ok(a)
}

fn main() -> BoxResult<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = parse_args(&argv)?;
    match args.child {
        Some(path) => run_child(&args, path),
        None if args.prune => experiment::run(&args),
        None => run_parent(&args, &argv),
    }
}

fn open_device(choice: &str) -> BoxResult<Device> {
    Ok(match choice {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        "auto" => Device::new_cuda(0).unwrap_or(Device::Cpu),
        other => return Err(format!("--device {other}: auto, cpu or cuda").into()),
    })
}

/// Device memory in use (bytes, the whole device: total - free from the driver).
#[cfg(feature = "candle-cuda")]
fn device_used(dev: &Device) -> Option<u64> {
    let cuda = dev.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as u64)
}

#[cfg(not(feature = "candle-cuda"))]
fn device_used(_dev: &Device) -> Option<u64> {
    None
}

/// This process's peak resident set (`VmHWM` in `/proc/self/status`), in bytes; None off Linux.
fn vm_hwm() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One run (in a child process): trains `path` and writes `run_<path>.csv` and
/// `run_<path>.txt` (key = value) under the output folder.
fn run_child(args: &Args, path: Path) -> BoxResult<()> {
    let dev = open_device(&args.device)?;
    let base_used = device_used(&dev);
    // candle's dropout RNG (the candle path); the CPU device cannot be seeded in candle 0.11, so
    // there the candle run's masks differ from run to run.
    let _ = dev.set_seed(args.seed);
    let corpus = Corpus::load(train::CORPUS, args.heldout_fraction)?;
    let t = args.model.context;
    if corpus.heldout.len() <= t || corpus.train.len() <= t {
        return Err("corpus too short for this context".into());
    }
    let model = Gpt::new(&args.model, args.seed, &dev)?;
    let mut opt = Optim::new(path, &model, &args.optim)?;
    let mut sampler = Sampler(args.seed ^ 0x5EED_BA7C);
    let held = train::even_offsets(corpus.heldout.len(), t, args.eval_windows);
    let mut peak_used = base_used;
    let sample = |peak: &mut Option<u64>| {
        if let Some(u) = device_used(&dev) {
            *peak = Some(peak.map_or(u, |p| p.max(u)));
        }
    };

    let mut csv = String::from("step,train_loss,heldout_loss,step_ms,lr\n");
    let mut step_ms = Vec::with_capacity(args.steps);
    let mut train_losses = Vec::with_capacity(args.steps);
    let mut last_heldout = f64::NAN;
    let mut keys = StepKeys::new(args.seed, 0);
    for step in 0..args.steps {
        let lr = train::lr_at(step, args.steps, args.optim.lr);
        opt.set_lr(lr);
        let t0 = Instant::now();
        let offs = sampler.offsets(corpus.train.len(), args.batch, t);
        let (x, y) = train::batch(&corpus.train, &offs, t, &dev)?;
        let loss = train::train_step_sampled(path, &model, &mut opt, (&x, &y), &keys, || {
            sample(&mut peak_used)
        })?;
        let loss = f64::from(loss.to_scalar::<f32>()?); // syncs the device: the step is done
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        step_ms.push(ms);
        train_losses.push(loss);
        keys = keys.next_step()?;
        let heldout = if (step + 1) % args.eval_every == 0 || step + 1 == args.steps {
            let h = train::eval_loss(path, &model, &corpus.heldout, &held, args.batch, &dev)?;
            last_heldout = h;
            println!(
                "[{:>8}] step {:>5}/{}  train {loss:.4}  held-out {h:.4}  {ms:.1} ms/step",
                path.name(),
                step + 1,
                args.steps
            );
            format!("{h}")
        } else {
            String::new()
        };
        let _ = writeln!(csv, "{},{loss},{heldout},{ms:.3},{lr}", step + 1);
    }
    // Mean step time without the first 10% (allocator and kernel warm-up).
    let skip = (args.steps / 10).min(args.steps - 1);
    let timed = &step_ms[skip..];
    let mean_ms = timed.iter().sum::<f64>() / timed.len() as f64;
    let tail = &train_losses[skip.max(args.steps - (args.steps / 10).max(1))..];
    let (mem, mem_what) = match (peak_used, base_used) {
        (Some(p), Some(b)) => (
            p.saturating_sub(b),
            "device memory in use (cuMemGetInfo total - free) sampled after each forward, backward \
             and optimizer step, peak minus the use before the model was built",
        ),
        _ => (
            vm_hwm().unwrap_or(0),
            "peak resident set of the run's process (VmHWM): binary, corpus, candle's CPU buffers",
        ),
    };
    let mut summary = String::new();
    let _ = writeln!(summary, "path = {}", path.name());
    let _ = writeln!(summary, "device = {dev:?}");
    let _ = writeln!(summary, "params = {}", model.param_count());
    let _ = writeln!(summary, "mean_step_ms = {mean_ms}");
    let _ = writeln!(summary, "peak_mem_bytes = {mem}");
    let _ = writeln!(summary, "peak_mem_what = {mem_what}");
    let _ = writeln!(
        summary,
        "final_train = {}",
        tail.iter().sum::<f64>() / tail.len() as f64
    );
    let _ = writeln!(summary, "final_heldout = {last_heldout}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join(format!("run_{}.csv", path.name())), csv)?;
    std::fs::write(args.out.join(format!("run_{}.txt", path.name())), summary)?;
    Ok(())
}

/// A finished run as read back from its files.
struct RunResult {
    path: Path,
    kv: Vec<(String, String)>,
    /// (step, train loss, held-out loss or NaN, step ms)
    rows: Vec<(f64, f64, f64, f64)>,
}

impl RunResult {
    fn read(out: &std::path::Path, path: Path) -> BoxResult<Self> {
        let txt = std::fs::read_to_string(out.join(format!("run_{}.txt", path.name())))?;
        let kv = txt
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let csv = std::fs::read_to_string(out.join(format!("run_{}.csv", path.name())))?;
        let mut rows = Vec::new();
        for line in csv.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: usize| {
                f.get(i)
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            rows.push((num(0), num(1), num(2), num(3)));
        }
        Ok(RunResult { path, kv, rows })
    }

    fn get(&self, key: &str) -> &str {
        self.kv
            .iter()
            .find(|(k, _)| k == key)
            .map_or("?", |(_, v)| v.as_str())
    }

    fn num(&self, key: &str) -> f64 {
        self.get(key).parse().unwrap_or(f64::NAN)
    }
}

/// Runs both paths as child processes, then merges, prints and plots.
fn run_parent(args: &Args, argv: &[String]) -> BoxResult<()> {
    std::fs::create_dir_all(&args.out)?;
    let exe = std::env::current_exe()?;
    let m = &args.model;
    println!(
        "train_gpt: {} blocks, hidden {}, {} heads, context {}, batch {}, {} steps, seed {}; \
         dropout {} (attention {}), drop path up to {} (linear), label smoothing {}, \
         LayerNorm Scaling {}, clip {}, lr {} wd {}",
        m.layers,
        m.hidden,
        m.heads,
        m.context,
        args.batch,
        args.steps,
        args.seed,
        m.dropout,
        m.attn_dropout,
        m.drop_path,
        m.label_smoothing,
        if m.layer_norm_scaling { "on" } else { "off" },
        args.optim.clip,
        args.optim.lr,
        args.optim.weight_decay
    );
    let mut runs = Vec::new();
    for path in [Path::Candle, Path::Fused] {
        let status = Command::new(&exe)
            .args(argv)
            .args(["--child", path.name()])
            .status()?;
        if !status.success() {
            return Err(format!("the {} run failed ({status})", path.name()).into());
        }
        runs.push(RunResult::read(&args.out, path)?);
    }

    // Merged CSV.
    let mut csv = String::from("run,step,train_loss,heldout_loss,step_ms\n");
    for r in &runs {
        for &(step, tr, ho, ms) in &r.rows {
            let ho = if ho.is_nan() {
                String::new()
            } else {
                format!("{ho}")
            };
            let _ = writeln!(csv, "{},{step},{tr},{ho},{ms}", r.path.name());
        }
    }
    std::fs::write(args.out.join("curves.csv"), csv)?;

    // Summary.
    let (c, f) = (&runs[0], &runs[1]);
    let mib = |r: &RunResult| r.num("peak_mem_bytes") / (1024.0 * 1024.0);
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "device {}, {} parameters",
        c.get("device"),
        c.get("params")
    );
    let _ = writeln!(
        summary,
        "{:<10} {:>12} {:>14} {:>16} {:>14}",
        "run", "ms/step", "peak MiB", "train (last 10%)", "held-out"
    );
    for r in &runs {
        let _ = writeln!(
            summary,
            "{:<10} {:>12.2} {:>14.1} {:>16.4} {:>14.4}",
            r.path.name(),
            r.num("mean_step_ms"),
            mib(r),
            r.num("final_train"),
            r.num("final_heldout")
        );
    }
    let _ = writeln!(
        summary,
        "fusedreg / candle: step time x{:.3}, peak memory x{:.3}, held-out loss {:+.4}",
        f.num("mean_step_ms") / c.num("mean_step_ms"),
        mib(f) / mib(c),
        f.num("final_heldout") - c.num("final_heldout")
    );
    let _ = writeln!(summary, "memory: {}", c.get("peak_mem_what"));
    let _ = writeln!(
        summary,
        "step time: mean wall time per step (batch, forward, backward, clip, optimizer, loss read \
         back) without the first 10% of the steps; held-out: plain cross-entropy in candle ops \
         without dropout on {} fixed windows of the last {}% of the text.",
        args.eval_windows,
        args.heldout_fraction * 100.0
    );
    if args.tiny || c.get("device") == "Cpu" {
        let _ = writeln!(
            summary,
            "note: a CPU run (fusedreg's ops run their CPU references there, written for exactness, \
             not speed): the timings and memory say nothing about the GPU targets; {} steps of a \
             tiny model only show that both paths train.",
            args.steps
        );
    }
    print!("{summary}");
    std::fs::write(args.out.join("summary.txt"), &summary)?;

    // Plot.
    let colors = [("candle", "#1f77b4"), ("fusedreg", "#d62728")];
    let mut series = Vec::new();
    for (r, (name, color)) in runs.iter().zip(colors) {
        series.push(plot::Series {
            label: format!("{name} train (label-smoothed)"),
            color,
            dashed: false,
            points: r.rows.iter().map(|&(s, tr, _, _)| (s, tr)).collect(),
        });
        series.push(plot::Series {
            label: format!("{name} held-out"),
            color,
            dashed: true,
            points: r
                .rows
                .iter()
                .filter(|row| !row.2.is_nan())
                .map(|&(s, _, ho, _)| (s, ho))
                .collect(),
        });
    }
    let notes: Vec<String> = summary.lines().skip(1).take(4).map(String::from).collect();
    let title = format!(
        "byte-level GPT on Paradise Lost: {} blocks, hidden {}, context {}, batch {}",
        m.layers, m.hidden, m.context, args.batch
    );
    std::fs::write(
        args.out.join("loss.svg"),
        plot::svg(&title, &notes, &series),
    )?;
    println!(
        "wrote {}/{{curves.csv, loss.svg, summary.txt}}",
        args.out.display()
    );
    Ok(())
}
