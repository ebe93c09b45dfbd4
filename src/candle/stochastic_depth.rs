//! Stochastic depth for candle modules: see [`StochasticDepth`].

use candle_core::Tensor;

use super::{wrap, StepKeys};
use crate::stochastic_depth::{self as sd, Mode, Plan, Schedule};

/// A stochastic-depth schedule over `blocks` residual blocks: a per-step plan of which residual
/// blocks run.
///
/// A thin layer over [`crate::stochastic_depth`] in its batch mode (the whole block dropped for
/// the whole batch, torchvision's `mode="batch"`, fairseq's LayerDrop), keyed by the run's
/// [`StepKeys`]: the plan of step `s` is drawn on the host from Philox with the keys' seed
/// (tagged, so it never shares a stream with a dropout mask) and `s`, so it needs no device work
/// and is the same on every rerun and on every device. A dropped block is not called at all
/// ([`DepthPlan::residual`] skips its closure), so its forward and backward never run; its Vars
/// get no gradient, which the optimizer treats as a skip, and [`DepthPlan::skip_flags`] gives the
/// same flags explicitly for [`AdamW::set_skip`](super::AdamW::set_skip) (e.g. for weights a
/// dropped block shares with a running one, which would otherwise get a gradient). A kept block's
/// branch is scaled by `1 / (1 - p_l)`, so the expected output is unchanged.
///
/// Per-sample stochastic depth (timm's `DropPath`: every block runs, each row dropped) is the
/// adapter ops' drop path instead: `with_drop_path(p, rows_per_sample)` on the block's last
/// dropout site, with `p` from [`StochasticDepth::probabilities`].
///
/// # Examples
///
/// ```
/// use fusedreg::candle::{StepKeys, StochasticDepth};
/// use fusedreg::stochastic_depth::Schedule;
/// # fn main() -> candle_core::Result<()> {
/// let depth = StochasticDepth::new(Schedule::linear(0.5), 6)?; // block l drops w.p. 0.5 (l+1)/6
/// let keys = StepKeys::new(42, 0);
/// let plan = depth.plan(&keys)?;
/// for block in 0..6 {
///     if plan.runs(block) {
///         assert!(plan.residual_scale(block) >= 1.0);
///     }
/// }
/// assert_eq!(plan, depth.plan(&keys)?); // deterministic
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct StochasticDepth {
    schedule: Schedule,
    blocks: usize,
    probabilities: Vec<f64>,
    /// Every block running, scale 1 (the same for every seed).
    eval: Plan,
}

impl StochasticDepth {
    /// A schedule over `blocks` blocks. Errors: no blocks, more than 2^20, a probability outside
    /// `[0, 1)` (a block must be able to run), a custom list of the wrong length.
    ///
    /// ```
    /// use fusedreg::candle::StochasticDepth;
    /// use fusedreg::stochastic_depth::Schedule;
    /// assert!(StochasticDepth::new(Schedule::linear(0.1), 12).is_ok());
    /// assert!(StochasticDepth::new(Schedule::Constant(1.0), 12).is_err());
    /// assert!(StochasticDepth::new(Schedule::linear(0.1), 0).is_err());
    /// ```
    pub fn new(schedule: Schedule, blocks: usize) -> candle_core::Result<Self> {
        // Checks the schedule once (a later plan with another seed cannot fail on it).
        let eval = sd::StochasticDepth::new(schedule.clone(), blocks, 0, Mode::Batch)?.eval_plan();
        let probabilities = schedule.probabilities(blocks)?;
        Ok(StochasticDepth {
            schedule,
            blocks,
            probabilities,
            eval,
        })
    }

    /// The number of blocks.
    ///
    /// ```
    /// use fusedreg::{candle::StochasticDepth, stochastic_depth::Schedule};
    /// assert_eq!(StochasticDepth::new(Schedule::linear(0.2), 4).unwrap().blocks(), 4);
    /// ```
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Each block's drop probability.
    ///
    /// ```
    /// use fusedreg::{candle::StochasticDepth, stochastic_depth::Schedule};
    /// let d = StochasticDepth::new(Schedule::linear(0.2), 2).unwrap();
    /// assert_eq!(d.probabilities(), &[0.1, 0.2]);
    /// ```
    pub fn probabilities(&self) -> &[f64] {
        &self.probabilities
    }

    /// The plan of the step of `keys`, drawn with the keys' seed: the same plan as
    /// `fusedreg::stochastic_depth::StochasticDepth::new(schedule, blocks, keys.seed(),
    /// Mode::Batch)?.plan(keys.step())`.
    ///
    /// ```
    /// use fusedreg::candle::{StepKeys, StochasticDepth};
    /// use fusedreg::stochastic_depth::{self as sd, Mode, Schedule};
    /// # fn main() -> candle_core::Result<()> {
    /// let depth = StochasticDepth::new(Schedule::linear(0.5), 8)?;
    /// let keys = StepKeys::new(7, 3);
    /// let direct = sd::StochasticDepth::new(Schedule::linear(0.5), 8, 7, Mode::Batch).unwrap();
    /// assert_eq!(depth.plan(&keys)?.plan(), &direct.plan(3));
    /// # Ok(()) }
    /// ```
    pub fn plan(&self, keys: &StepKeys) -> candle_core::Result<DepthPlan> {
        let s =
            sd::StochasticDepth::new(self.schedule.clone(), self.blocks, keys.seed(), Mode::Batch)?;
        Ok(DepthPlan {
            plan: s.plan(keys.step()),
        })
    }

    /// The evaluation plan: every block runs, with residual scale 1.
    ///
    /// ```
    /// use fusedreg::{candle::StochasticDepth, stochastic_depth::Schedule};
    /// let p = StochasticDepth::new(Schedule::linear(0.5), 3).unwrap().eval_plan();
    /// assert_eq!(p.running(), 3);
    /// assert_eq!(p.residual_scale(2), 1.0);
    /// ```
    pub fn eval_plan(&self) -> DepthPlan {
        DepthPlan {
            plan: self.eval.clone(),
        }
    }
}

/// Which blocks run at one step, and their residual scales (from [`StochasticDepth::plan`]).
///
/// # Examples
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fusedreg::candle::{StepKeys, StochasticDepth};
/// use fusedreg::stochastic_depth::Schedule;
/// # fn main() -> candle_core::Result<()> {
/// let depth = StochasticDepth::new(Schedule::Constant(0.5), 4)?;
/// let plan = depth.plan(&StepKeys::new(1, 0))?;
/// let mut x = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let mut calls = 0;
/// for block in 0..4 {
///     x = plan.residual(block, &x, |h| { calls += 1; h.affine(0.5, 0.0) })?;
/// }
/// assert_eq!(calls, plan.running()); // dropped blocks were never called
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct DepthPlan {
    plan: Plan,
}

impl DepthPlan {
    /// Whether `block` runs this step (false for a block number out of range).
    ///
    /// ```
    /// use fusedreg::{candle::StochasticDepth, stochastic_depth::Schedule};
    /// let p = StochasticDepth::new(Schedule::linear(0.0), 2).unwrap().eval_plan();
    /// assert!(p.runs(1) && !p.runs(2));
    /// ```
    pub fn runs(&self, block: usize) -> bool {
        self.plan.runs(block)
    }

    /// The factor of a running block's residual branch, `1 / (1 - p)` (1 in the evaluation
    /// plan), or 0 for a dropped block.
    ///
    /// ```
    /// use fusedreg::candle::{StepKeys, StochasticDepth};
    /// use fusedreg::stochastic_depth::Schedule;
    /// let d = StochasticDepth::new(Schedule::Constant(0.5), 1).unwrap();
    /// let p = d.plan(&StepKeys::new(0, 0)).unwrap();
    /// assert!(p.residual_scale(0) == 0.0 || p.residual_scale(0) == 2.0);
    /// ```
    pub fn residual_scale(&self, block: usize) -> f32 {
        self.plan.residual_scale(block)
    }

    /// How many blocks run.
    ///
    /// ```
    /// use fusedreg::{candle::StochasticDepth, stochastic_depth::Schedule};
    /// assert_eq!(StochasticDepth::new(Schedule::linear(0.3), 5).unwrap().eval_plan().running(), 5);
    /// ```
    pub fn running(&self) -> usize {
        self.plan.running()
    }

    /// The underlying [`crate::stochastic_depth::Plan`].
    ///
    /// ```
    /// use fusedreg::{candle::{StepKeys, StochasticDepth}, stochastic_depth::Schedule};
    /// let d = StochasticDepth::new(Schedule::linear(0.3), 5).unwrap();
    /// assert_eq!(d.plan(&StepKeys::new(0, 9)).unwrap().plan().step(), 9);
    /// ```
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The optimizer's skip flags: `block_of_var[i]` is the block Var `i` belongs to (`None`:
    /// outside every block, never skipped); a Var of a dropped block is skipped. Pass the result
    /// to [`AdamW::set_skip`](super::AdamW::set_skip). A block index past the plan's blocks is
    /// an error (a typo there would otherwise freeze that Var for the whole run).
    ///
    /// ```
    /// use fusedreg::{candle::StochasticDepth, stochastic_depth::Schedule};
    /// # fn main() -> candle_core::Result<()> {
    /// let p = StochasticDepth::new(Schedule::linear(0.3), 2)?.eval_plan();
    /// assert_eq!(p.skip_flags(&[None, Some(0), Some(1)])?, vec![false; 3]); // all run
    /// assert!(p.skip_flags(&[Some(2)]).is_err()); // only blocks 0 and 1 exist
    /// # Ok(()) }
    /// ```
    pub fn skip_flags(&self, block_of_var: &[Option<usize>]) -> candle_core::Result<Vec<bool>> {
        let blocks = self.plan.blocks().len();
        if let Some((i, b)) = block_of_var
            .iter()
            .enumerate()
            .find_map(|(i, b)| b.filter(|&b| b >= blocks).map(|b| (i, b)))
        {
            return Err(wrap(crate::Error::invalid(
                "candle::DepthPlan",
                format!("Var {i} belongs to block {b}, but the plan has {blocks} blocks"),
            )));
        }
        Ok(self.plan.skip_flags(block_of_var))
    }

    /// A pre-norm residual block under the plan: `x + residual_scale * branch(x)` when `block`
    /// runs, else `x` itself without calling `branch` (so nothing of the block is computed or
    /// differentiated). With scale 1 the branch is added as it is.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use fusedreg::{candle::StochasticDepth, stochastic_depth::Schedule};
    /// # fn main() -> candle_core::Result<()> {
    /// let p = StochasticDepth::new(Schedule::linear(0.3), 1)?.eval_plan();
    /// let x = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
    /// let y = p.residual(0, &x, |h| h.affine(2.0, 0.0))?;
    /// assert_eq!(y.to_vec1::<f32>()?, vec![3.0, 6.0]);
    /// # Ok(()) }
    /// ```
    pub fn residual(
        &self,
        block: usize,
        x: &Tensor,
        branch: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        if !self.runs(block) {
            return Ok(x.clone());
        }
        let b = branch(x)?;
        let scale = self.residual_scale(block);
        if scale == 1.0 {
            x + b
        } else {
            x + b.affine(f64::from(scale), 0.0)?
        }
    }
}
