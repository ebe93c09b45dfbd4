//! The benchmark cases, one module per op (the op's stem), each adding its rows to the report.

mod adamw;
mod bias_act_dropout;
mod cross_entropy;
mod dropout;
mod dropout_add_norm;
mod mlp;

use fusedreg::Handle;

use crate::Ctx;

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

/// Whether a case needing `need` bytes of device memory fits (with a fifth left for the
/// allocator and the baseline's temporaries); says so on stderr when it does not, so a smaller
/// GPU skips the row instead of failing the whole report.
fn fits(h: &Handle, need: usize, case: &str) -> bool {
    let free = h.context().mem_get_info().map(|(f, _)| f).unwrap_or(0);
    let ok = need as f64 <= 0.8 * free as f64;
    if !ok {
        eprintln!("\nskipping {case}: needs {need} bytes of device memory");
    }
    ok
}
