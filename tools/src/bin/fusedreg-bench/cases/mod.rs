//! The benchmark cases, one module per op (the op's stem), each adding its rows to the report.

mod adamw;
mod dropout_residual;
mod mlp;

use crate::Ctx;

/// Runs every op's cases in report order.
pub fn run_all(ctx: &mut Ctx) -> fusedreg::Result<()> {
    dropout_residual::run(ctx)?;
    adamw::run(ctx)?;
    mlp::run(ctx)?;
    Ok(())
}
