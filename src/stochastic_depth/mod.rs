//! Stochastic depth: drop schedules and a per-step plan, computed on the host, that says which
//! residual blocks run — so a dropped block is never launched, forward or backward.
//!
//! Two modes:
//!
//! * [`Mode::Batch`] — the whole block is dropped for the whole batch with probability `p_l`
//!   (torchvision's `mode="batch"`, fairseq's LayerDrop). The plan is drawn on the host from our
//!   Philox with `(seed, step, block)`: deterministic, no device work, no sync. A dropped block
//!   launches nothing; a kept block's residual branch is scaled by `1 / (1 - p_l)` (fold it into
//!   the fused residual add), so the expected output is unchanged (torchvision/timm
//!   `scale_by_keep=True`).
//! * [`Mode::Row`] — per sample (timm's `DropPath`): every block runs, and each row's residual
//!   branch is kept or dropped on the device by the dropout op's drop path, with the seed and
//!   call id (distinct per step and block) that [`BlockPlan::row_drop`] carries.
//!
//! ```
//! use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
//! let sd = StochasticDepth::new(Schedule::linear(0.5), 24, 1234, Mode::Batch).unwrap();
//! let plan = sd.plan(0);
//! for block in 0..24 {
//!     if plan.runs(block) {
//!         let scale = plan.residual_scale(block); // 1 / (1 - p_l): fold into the residual add
//!         assert!(scale >= 1.0);
//!     } // else: launch nothing for this block, forward or backward
//! }
//! assert_eq!(plan, sd.plan(0)); // deterministic
//! ```

use crate::dropping::DropRate;
use crate::error::{Error, Result};
use crate::philox::mask_word;

const OP: &str = "stochastic_depth";

/// Domain separation: batch-mode draws and row-mode masks use keys derived from the seed with
/// different tags, so their Philox streams never coincide (with each other or with dropout
/// masks under the plain seed); within a stream the call id carries (step, block) without
/// overlap.
const BATCH_TAG: u64 = 0x5344_4241_7eed_0001; // "SDBA"
const ROW_TAG: u64 = 0x5344_5257_7eed_0002; // "SDRW"
/// Blocks are numbered in the low 20 bits of a row-mode call id.
const MAX_BLOCKS: usize = 1 << 20;

/// How the drop probability grows with depth.
///
/// # Examples
///
/// ```
/// use fusedreg::stochastic_depth::Schedule;
/// assert_eq!(Schedule::Constant(0.1).probabilities(3).unwrap(), vec![0.1; 3]);
/// let custom = Schedule::Custom(vec![0.0, 0.1, 0.2]);
/// assert_eq!(custom.probabilities(3).unwrap(), vec![0.0, 0.1, 0.2]);
/// assert!(custom.probabilities(4).is_err()); // one probability per block
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// Huang et al. (2016): `p_l = (l / L) * p_L` for blocks `l = 1..=L` — the first block is
    /// dropped with probability `p_L / L`, the last with `p_L`. With `p_L = 0.5` about `3L/4`
    /// blocks run on average.
    Linear {
        /// Drop probability of the last block, in `[0, 1)`.
        p_last: f64,
    },
    /// timm's `torch.linspace(0, rate, depth)`: `p_l = rate * l / (L - 1)` for `l = 0..L` — the
    /// first block is never dropped, the last is dropped with probability `rate`.
    Linspace {
        /// Drop probability of the last block, in `[0, 1)`.
        rate: f64,
    },
    /// The same probability for every block.
    Constant(f64),
    /// One probability per block.
    Custom(Vec<f64>),
}

impl Schedule {
    /// [`Schedule::Linear`] (Huang et al.).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::Schedule;
    /// assert_eq!(Schedule::linear(0.2), Schedule::Linear { p_last: 0.2 });
    /// assert_eq!(Schedule::linear(0.2).probabilities(2).unwrap(), vec![0.1, 0.2]);
    /// ```
    pub fn linear(p_last: f64) -> Self {
        Schedule::Linear { p_last }
    }

    /// The drop probability of each of `blocks` blocks, each validated to lie in `[0, 1)` and to
    /// round to a threshold below 2^32 (so p must be below `1 - 2^-33`: a larger p would be
    /// applied as 1 and the block would never run).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::Schedule;
    /// assert_eq!(Schedule::linear(0.5).probabilities(4).unwrap(), vec![0.125, 0.25, 0.375, 0.5]);
    /// assert_eq!(Schedule::Linspace { rate: 0.3 }.probabilities(4).unwrap()[0], 0.0);
    /// assert!(Schedule::Constant(1.0).probabilities(3).is_err()); // a block must be able to run
    /// assert!(Schedule::Constant(0.1).probabilities(usize::MAX).is_err()); // at most 2^20 blocks
    /// // Below 1, but rounds to the threshold 2^32 (drop always): refused as well.
    /// assert!(Schedule::Constant(1.0 - 2f64.powi(-34)).probabilities(3).is_err());
    /// ```
    pub fn probabilities(&self, blocks: usize) -> Result<Vec<f64>> {
        if blocks == 0 {
            return Err(Error::invalid(OP, "a schedule needs at least one block"));
        }
        if blocks > MAX_BLOCKS {
            // Checked before the list of `blocks` probabilities is allocated.
            return Err(Error::invalid(
                OP,
                format!("{blocks} blocks: at most 2^20 are supported"),
            ));
        }
        let l = blocks as f64;
        let probs: Vec<f64> = match self {
            Schedule::Linear { p_last } => (1..=blocks).map(|i| p_last * i as f64 / l).collect(),
            Schedule::Linspace { rate } if blocks == 1 => vec![*rate],
            Schedule::Linspace { rate } => {
                (0..blocks).map(|i| rate * i as f64 / (l - 1.0)).collect()
            }
            Schedule::Constant(p) => vec![*p; blocks],
            Schedule::Custom(v) => {
                if v.len() != blocks {
                    return Err(Error::shape(
                        OP,
                        format!(
                            "custom schedule has {} probabilities for {blocks} blocks",
                            v.len()
                        ),
                    ));
                }
                v.clone()
            }
        };
        for (i, &p) in probs.iter().enumerate() {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::invalid(
                    OP,
                    format!("block {i}: drop probability {p} must lie in [0, 1) (a block must be able to run)"),
                ));
            }
            // The check that matters is on the threshold the draw compares against, not on p:
            // any p in [1 - 2^-33, 1) rounds to the threshold 2^32, which drops every time.
            if DropRate::checked(OP, p)?.threshold() >= 1 << 32 {
                return Err(Error::invalid(
                    OP,
                    format!("block {i}: drop probability {p} rounds to the threshold 2^32, so the block would never run (p must be below 1 - 2^-33)"),
                ));
            }
        }
        Ok(probs)
    }
}

/// Whole-block (batch) or per-sample (row) dropping.
///
/// # Examples
///
/// ```
/// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
/// let row = StochasticDepth::new(Schedule::Constant(0.5), 4, 1, Mode::Row).unwrap();
/// let plan = row.plan(0);
/// assert_eq!(plan.running(), 4); // row mode: every block runs...
/// assert!(plan.blocks().iter().all(|b| b.row_drop.is_some())); // ...and drops rows on the device
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Drop the block for the whole batch: dropped blocks launch nothing.
    Batch,
    /// Drop per sample inside the fused residual add: every block runs.
    Row,
}

/// Stochastic depth over a fixed number of blocks.
///
/// # Examples
///
/// ```
/// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
/// let sd = StochasticDepth::new(Schedule::linear(0.5), 12, 42, Mode::Batch).unwrap();
/// let plan = sd.plan(7);
/// assert_eq!(plan.blocks().len(), sd.blocks());
/// assert_eq!(plan, sd.plan(7)); // a pure function of (seed, step)
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct StochasticDepth {
    rates: Vec<DropRate>,
    seed: u64,
    mode: Mode,
}

impl StochasticDepth {
    /// Validates the schedule for `blocks` blocks.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::Constant(0.2), 8, 0, Mode::Batch).unwrap();
    /// assert_eq!(sd.blocks(), 8);
    /// assert!(StochasticDepth::new(Schedule::Constant(0.2), 0, 0, Mode::Batch).is_err()); // no blocks
    /// assert!(StochasticDepth::new(Schedule::Constant(1.0), 8, 0, Mode::Batch).is_err()); // p < 1
    /// ```
    pub fn new(schedule: Schedule, blocks: usize, seed: u64, mode: Mode) -> Result<Self> {
        if blocks > MAX_BLOCKS {
            return Err(Error::invalid(
                OP,
                format!("{blocks} blocks: at most 2^20 are supported"),
            ));
        }
        let rates = schedule
            .probabilities(blocks)?
            .into_iter()
            .map(|p| DropRate::checked(OP, p))
            .collect::<Result<Vec<_>>>()?;
        Ok(StochasticDepth { rates, seed, mode })
    }

    /// Number of blocks.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::linear(0.5), 24, 0, Mode::Row).unwrap();
    /// assert_eq!(sd.blocks(), 24);
    /// ```
    pub fn blocks(&self) -> usize {
        self.rates.len()
    }

    /// The drop rate of each block.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::linear(0.5), 2, 0, Mode::Batch).unwrap();
    /// let p: Vec<f64> = sd.rates().iter().map(|r| r.p()).collect();
    /// assert_eq!(p, vec![0.25, 0.5]);
    /// assert_eq!(sd.rates()[1].scale(), 2.0); // 1 / (1 - p)
    /// ```
    pub fn rates(&self) -> &[DropRate] {
        &self.rates
    }

    /// The plan for training step `step`: a pure function of (seed, step), computed on the host
    /// without touching the device. Evaluation (no dropping) is [`StochasticDepth::eval_plan`].
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::Constant(0.5), 16, 9, Mode::Batch).unwrap();
    /// let plan = sd.plan(5);
    /// assert_eq!(plan.step(), 5);
    /// for b in plan.blocks() {
    ///     // A kept block is scaled by 1 / (1 - 0.5); a dropped one contributes nothing.
    ///     assert_eq!(b.residual_scale, if b.runs { 2.0 } else { 0.0 });
    /// }
    /// ```
    pub fn plan(&self, step: u64) -> Plan {
        let blocks = self
            .rates
            .iter()
            .enumerate()
            .map(|(l, rate)| match self.mode {
                Mode::Batch => {
                    let runs = rate.keeps(mask_word(self.seed ^ BATCH_TAG, step, l as u64));
                    BlockPlan {
                        runs,
                        residual_scale: if runs { rate.scale() } else { 0.0 },
                        row_drop: None,
                    }
                }
                Mode::Row => BlockPlan {
                    runs: true,
                    residual_scale: 1.0,
                    row_drop: (!rate.keeps_all()).then(|| RowDrop {
                        p: rate.p(),
                        seed: self.seed ^ ROW_TAG,
                        call: row_call(step, l),
                    }),
                },
            })
            .collect();
        Plan { step, blocks }
    }

    /// The plan for inference: every block runs unscaled.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::linear(0.5), 6, 1, Mode::Row).unwrap();
    /// let eval = sd.eval_plan();
    /// assert_eq!(eval.running(), 6);
    /// assert!(eval.blocks().iter().all(|b| b.residual_scale == 1.0 && b.row_drop.is_none()));
    /// ```
    pub fn eval_plan(&self) -> Plan {
        Plan {
            step: u64::MAX,
            blocks: vec![
                BlockPlan {
                    runs: true,
                    residual_scale: 1.0,
                    row_drop: None
                };
                self.rates.len()
            ],
        }
    }
}

/// The device call id of the row-mode drop path of `block` at `step`: distinct for every pair
/// with `step < 2^44` (block < 2^20 is checked at construction).
fn row_call(step: u64, block: usize) -> u64 {
    (step << 20) | block as u64
}

/// Per-sample dropping of one block in row mode: pass it to the fused residual add's drop path.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::DropPath;
/// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
/// # fn main() -> fusedreg::Result<()> {
/// let sd = StochasticDepth::new(Schedule::Constant(0.25), 3, 11, Mode::Row)?;
/// let drop = sd.plan(0).block(2).unwrap().row_drop.unwrap();
/// assert_eq!(drop.p, 0.25);
/// // The drop path of the fused op, keyed by this draw's seed and call id:
/// let s = DropPath::new(drop.p, drop.call)?.row_scale(drop.seed, 17);
/// assert!(s == 0.0 || s == 1.0 / 0.75);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowDrop {
    /// Drop probability of each row.
    pub p: f64,
    /// Seed of the draw.
    pub seed: u64,
    /// Call id of the draw (distinct per step and block).
    pub call: u64,
}

/// What one block does this step.
///
/// # Examples
///
/// ```
/// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
/// let sd = StochasticDepth::new(Schedule::Constant(0.5), 8, 3, Mode::Batch).unwrap();
/// for b in sd.plan(1).blocks() {
///     assert!(b.row_drop.is_none()); // batch mode: nothing to do on the device
///     assert_eq!(b.runs, b.residual_scale != 0.0);
/// }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockPlan {
    /// Whether the block runs at all (always true in row mode).
    pub runs: bool,
    /// Scale of the residual branch: `1 / (1 - p_l)` for a kept block in batch mode, 1 in row
    /// mode (the drop path scales per row), 0 for a dropped block.
    pub residual_scale: f32,
    /// Row mode: the per-sample drop to apply in the residual add.
    pub row_drop: Option<RowDrop>,
}

/// Which blocks run at one step.
///
/// # Examples
///
/// ```
/// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
/// let sd = StochasticDepth::new(Schedule::Constant(0.5), 10, 5, Mode::Batch).unwrap();
/// let plan = sd.plan(2);
/// let running = (0..10).filter(|&l| plan.runs(l)).count();
/// assert_eq!(running, plan.running());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    step: u64,
    blocks: Vec<BlockPlan>,
}

impl Plan {
    /// The step this plan is for.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::linear(0.3), 4, 0, Mode::Batch).unwrap();
    /// assert_eq!(sd.plan(123).step(), 123);
    /// ```
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Whether block `block` runs (launch nothing for it, forward or backward, if not).
    /// Out-of-range blocks do not run.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::Constant(0.0), 4, 0, Mode::Batch).unwrap();
    /// let plan = sd.plan(0);
    /// assert!(plan.runs(3)); // p = 0: every block runs
    /// assert!(!plan.runs(4)); // out of range
    /// ```
    pub fn runs(&self, block: usize) -> bool {
        self.blocks.get(block).is_some_and(|b| b.runs)
    }

    /// The residual scale of `block` (0 if it does not run).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::Constant(0.5), 4, 8, Mode::Batch).unwrap();
    /// let plan = sd.plan(0);
    /// for l in 0..4 {
    ///     assert_eq!(plan.residual_scale(l), if plan.runs(l) { 2.0 } else { 0.0 });
    /// }
    /// assert_eq!(plan.residual_scale(99), 0.0);
    /// ```
    pub fn residual_scale(&self, block: usize) -> f32 {
        self.blocks.get(block).map_or(0.0, |b| b.residual_scale)
    }

    /// Everything about `block`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::linear(0.5), 4, 0, Mode::Row).unwrap();
    /// let plan = sd.plan(0);
    /// assert_eq!(plan.block(3).unwrap().row_drop.unwrap().p, 0.5);
    /// assert!(plan.block(4).is_none());
    /// ```
    pub fn block(&self, block: usize) -> Option<&BlockPlan> {
        self.blocks.get(block)
    }

    /// All blocks.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::Constant(0.5), 5, 2, Mode::Batch).unwrap();
    /// let plan = sd.plan(4);
    /// assert_eq!(plan.blocks().len(), 5);
    /// assert_eq!(plan.blocks().iter().filter(|b| b.runs).count(), plan.running());
    /// ```
    pub fn blocks(&self) -> &[BlockPlan] {
        &self.blocks
    }

    /// How many blocks run.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::Constant(0.5), 64, 1, Mode::Batch).unwrap();
    /// let n = sd.plan(0).running(); // about half of the 64 blocks
    /// assert!(n > 16 && n < 48);
    /// assert_eq!(sd.eval_plan().running(), 64);
    /// ```
    pub fn running(&self) -> usize {
        self.blocks.iter().filter(|b| b.runs).count()
    }

    /// Per-tensor "skip this optimizer step" flags: `block_of_tensor[i]` names the block owning
    /// optimizer tensor `i` (`None` for tensors outside the blocks, which always step). Tensors
    /// of dropped blocks got no gradient this step; skipping them keeps momentum from moving
    /// them anyway.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
    /// let sd = StochasticDepth::new(Schedule::Constant(0.5), 2, 7, Mode::Batch).unwrap();
    /// let plan = sd.plan(3);
    /// let flags = plan.skip_flags(&[None, Some(0), Some(1)]);
    /// assert_eq!(flags, vec![false, !plan.runs(0), !plan.runs(1)]);
    /// ```
    pub fn skip_flags(&self, block_of_tensor: &[Option<usize>]) -> Vec<bool> {
        block_of_tensor
            .iter()
            .map(|b| b.is_some_and(|b| !self.runs(b)))
            .collect()
    }
}
