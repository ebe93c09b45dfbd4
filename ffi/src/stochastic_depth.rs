//! `fr_stochastic_depth_plan`: which blocks run at a step (host only, no device work).

use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};

use crate::{boundary, FfiError, FrStatus};

const OP: &str = "stochastic_depth";

/// Schedule code: `p_l = (l / L) · p` for the 1-based block `l` (Huang et al. 2016).
pub const FR_DEPTH_LINEAR: u32 = 0;
/// `linspace(0, p, L)` (timm): the first block is never dropped.
pub const FR_DEPTH_LINSPACE: u32 = 1;
/// `p` for every block.
pub const FR_DEPTH_CONSTANT: u32 = 2;
/// `probs[l]` given per block.
pub const FR_DEPTH_CUSTOM: u32 = 3;

/// Mode code: a dropped block is skipped for the whole batch (nothing launched).
pub const FR_DEPTH_BATCH: u32 = 0;
/// Every block runs; samples are dropped on the device through the drop path.
pub const FR_DEPTH_ROW: u32 = 1;

/// The plan of step `step` for `blocks` blocks: `runs[l]` (1 = run block `l`),
/// `residual_scale[l]` (`1/(1-p_l)` for a kept block, 0 for a dropped one: fold it into the
/// residual add), and in row mode `row_p[l]` / `row_call[l]`, the drop-path probability and call
/// id to pass to the block's fused residual op (0 / 0 in batch mode). Deterministic in
/// `(seed, step, block)`. `probs` is read only for `FR_DEPTH_CUSTOM` (`blocks` values);
/// `row_p` and `row_call` may be null.
#[no_mangle]
pub unsafe extern "C" fn fr_stochastic_depth_plan(
    schedule: u32,
    p: f64,
    probs: *const f64,
    blocks: i64,
    seed: u64,
    step: u64,
    mode: u32,
    runs: *mut u8,
    residual_scale: *mut f32,
    row_p: *mut f64,
    row_call: *mut u64,
) -> FrStatus {
    boundary(|| {
        if blocks <= 0 {
            return Err(FfiError::invalid(format!(
                "{OP}: blocks = {blocks} must be >= 1"
            )));
        }
        let n = blocks as usize;
        let schedule = match schedule {
            FR_DEPTH_LINEAR => Schedule::Linear { p_last: p },
            FR_DEPTH_LINSPACE => Schedule::Linspace { rate: p },
            FR_DEPTH_CONSTANT => Schedule::Constant(p),
            FR_DEPTH_CUSTOM if !probs.is_null() => {
                // SAFETY: `blocks` values (the C contract).
                Schedule::Custom(unsafe { std::slice::from_raw_parts(probs, n) }.to_vec())
            }
            FR_DEPTH_CUSTOM => {
                return Err(FfiError::invalid(format!(
                    "{OP}: a custom schedule needs `probs`"
                )))
            }
            s => {
                return Err(FfiError::invalid(format!(
                    "{OP}: schedule = {s}; use 0 (linear), 1 (linspace), 2 (constant) or 3 (custom)"
                )))
            }
        };
        let mode = match mode {
            FR_DEPTH_BATCH => Mode::Batch,
            FR_DEPTH_ROW => Mode::Row,
            m => {
                return Err(FfiError::invalid(format!(
                    "{OP}: mode = {m}; use 0 (batch) or 1 (row)"
                )))
            }
        };
        if runs.is_null() || residual_scale.is_null() {
            return Err(FfiError::invalid(format!(
                "{OP}: `runs` and `residual_scale` are required"
            )));
        }
        let plan = StochasticDepth::new(schedule, n, seed, mode)?.plan(step);
        for (l, b) in plan.blocks().iter().enumerate() {
            // SAFETY: each output holds `blocks` elements (the C contract).
            unsafe {
                *runs.add(l) = u8::from(b.runs);
                *residual_scale.add(l) = b.residual_scale;
                if !row_p.is_null() {
                    *row_p.add(l) = b.row_drop.map_or(0.0, |r| r.p);
                }
                if !row_call.is_null() {
                    *row_call.add(l) = b.row_drop.map_or(0, |r| r.call);
                }
            }
        }
        Ok(())
    })
}
