//! The benchmark cases, one module per op (the op's stem), each adding its rows to the report.
//!
//! Every file of this folder is a module (`automod`) that registers its `run` in [`CASES`] with
//! `super::case!(run)`, so a new op's case needs no line here. The report runs them sorted by
//! stem. (A new file is picked up the next time this crate compiles, which adding an op's
//! library code triggers.)

use fusedreg::Handle;

use crate::Ctx;

/// The dropout probability of every dropping op's rows.
const P: f64 = 0.1;
/// The activation shape of the dropping ops' large rows: 16k tokens of hidden 4096.
const ROWS: usize = 16_384;
const COLS: usize = 4096;

/// One op's cases: its module (`fusedreg_bench::cases::<stem>`) and the function that adds its
/// rows.
pub struct Case {
    module: &'static str,
    run: fn(&mut Ctx) -> fusedreg::Result<()>,
}

/// Every case file's [`Case`].
#[linkme::distributed_slice]
pub static CASES: [Case];

/// Registers the case file's `run` in [`CASES`] under its module.
macro_rules! case {
    ($run:path) => {
        #[linkme::distributed_slice(super::CASES)]
        static CASE: super::Case = super::Case {
            module: module_path!(),
            run: $run,
        };
    };
}
use case;

automod::dir!("src/bin/fusedreg-bench/cases");

/// Runs every op's cases, sorted by stem.
pub fn run_all(ctx: &mut Ctx) -> fusedreg::Result<()> {
    let mut cases: Vec<&Case> = CASES.iter().collect();
    cases.sort_by_key(|case| case.module);
    for case in cases {
        (case.run)(ctx)?;
    }
    Ok(())
}

/// Whether GPU case `case` runs: one of its rows `ops` is wanted, and the `need` bytes of
/// device memory it allocates fit (with a fifth left for the allocator and the baseline's
/// temporaries). A case that does not fit is skipped with a line on stderr, so a smaller GPU
/// skips the row instead of failing the whole report; one that runs is announced as `label`.
fn starts(ctx: &Ctx, h: &Handle, label: &str, ops: &[&str], case: &str, need: usize) -> bool {
    if !ops.iter().any(|op| ctx.wants(op, case)) {
        return false;
    }
    let free = h.context().mem_get_info().map(|(f, _)| f).unwrap_or(0);
    if need as f64 > 0.8 * free as f64 {
        eprintln!("\nskipping {case}: needs {need} bytes of device memory");
        return false;
    }
    ctx.progress(label, case);
    true
}
