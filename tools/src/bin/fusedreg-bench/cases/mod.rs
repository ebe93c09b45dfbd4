//! The benchmark cases, one module per op (the op's stem), each adding its rows to the report.

mod adamw;
mod bias_act_dropout;
mod cross_entropy;
mod dropout;
mod dropout_add_norm;
mod mlp;

use fusedreg::Handle;

use crate::Ctx;

/// The dropout probability of every dropping op's rows.
const P: f64 = 0.1;
/// The activation shape of the dropping ops' large rows: 16k tokens of hidden 4096.
const ROWS: usize = 16_384;
const COLS: usize = 4096;

/// Runs every op's cases in report order.
pub fn run_all(ctx: &mut Ctx) -> fusedreg::Result<()> {
    dropout::run(ctx)?;
    bias_act_dropout::run(ctx)?;
    dropout_add_norm::run(ctx)?;
    cross_entropy::run(ctx)?;
    adamw::run(ctx)?;
    mlp::run(ctx)?;
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
