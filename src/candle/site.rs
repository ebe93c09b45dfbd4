//! [`Site`]: what every dropping adapter op holds (its drop rate, its site number and an
//! optional drop path), the keys it draws with at a step ([`Site::draw`]), and the public
//! accessors each op type exposes for it ([`site_methods!`]).

use super::{check_site, StepKeys};
use crate::dropping::{DropPath, DropRate};

/// One dropout site of a model: the element drop rate, the site number that keys its masks, and
/// an optional drop path (stochastic depth, one draw per sample of rows).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Site {
    rate: DropRate,
    site: u32,
    /// (rate, rows per sample); None when there is no drop path or its rate is 0.
    drop_path: Option<(DropRate, usize)>,
}

/// What a [`Site`] draws with at one step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Draw {
    /// The element drop probability.
    pub p: f64,
    /// The run's seed.
    pub seed: u64,
    /// The element mask's call id (random stream 0 of the site).
    pub call: u64,
    /// The drop path keyed by its own call id (random stream 1 of the site), if any.
    pub path: Option<DropPath>,
}

impl Site {
    /// Drops elements with probability `p` (in `[0, 1]`); `site < 2^24`.
    pub fn new(p: f64, site: u32) -> candle_core::Result<Self> {
        check_site(site)?;
        Ok(Site {
            rate: DropRate::new(p)?,
            site,
            drop_path: None,
        })
    }

    /// The element drop probability set to `p`.
    pub fn with_rate(self, p: f64) -> candle_core::Result<Self> {
        Ok(Site {
            rate: DropRate::new(p)?,
            ..self
        })
    }

    /// A drop path of `p_path` over samples of `rows_per_sample` rows (`p_path = 0`: none).
    pub fn with_drop_path(self, p_path: f64, rows_per_sample: usize) -> candle_core::Result<Self> {
        // Validates both through the op's own checks.
        let path = DropPath::new(p_path, 0)?.per_sample(rows_per_sample)?;
        Ok(Site {
            drop_path: (p_path > 0.0).then_some((path.rate(), rows_per_sample)),
            ..self
        })
    }

    pub fn p(&self) -> f64 {
        self.rate.p()
    }

    pub fn site(&self) -> u32 {
        self.site
    }

    pub fn drop_path(&self) -> Option<(f64, usize)> {
        self.drop_path.map(|(r, n)| (r.p(), n))
    }

    /// With `keys` (training), the rates and call ids of that step; without (evaluation),
    /// `None`: nothing is dropped.
    pub fn draw(&self, keys: Option<&StepKeys>) -> candle_core::Result<Option<Draw>> {
        let Some(keys) = keys else { return Ok(None) };
        let path = match self.drop_path {
            None => None,
            Some((rate, per_sample)) => {
                let call = keys.call(self.site, 1)?;
                Some(DropPath::new(rate.p(), call)?.per_sample(per_sample)?)
            }
        };
        Ok(Some(Draw {
            p: self.rate.p(),
            seed: keys.seed(),
            call: keys.call(self.site, 0)?,
            path,
        }))
    }
}

/// The public accessors of an op type that holds its [`Site`] in a field `site`: `p` and `site`;
/// with `drop_path`, also `with_drop_path` and `drop_path`. One definition for every dropping
/// op; the op type's own docs show them in use.
macro_rules! site_methods {
    () => {
        /// The element drop probability in training.
        pub fn p(&self) -> f64 {
            self.site.p()
        }

        /// The site number: with the [`StepKeys`](crate::candle::StepKeys) it keys the masks.
        pub fn site(&self) -> u32 {
            self.site.site()
        }
    };
    (drop_path) => {
        $crate::candle::site::site_methods!();

        /// Adds a drop path in training: whole samples of `rows_per_sample` consecutive rows
        /// (the sequence length of a `[batch, seq, hidden]` tensor; 1 for per-row) are dropped
        /// with probability `p_path`, kept ones scaled by `1 / (1 - p_path)`. `p_path = 0`
        /// means none. Errors: `p_path` outside `[0, 1]` or NaN, `rows_per_sample` 0 or at
        /// least 2^32.
        pub fn with_drop_path(
            self,
            p_path: f64,
            rows_per_sample: usize,
        ) -> candle_core::Result<Self> {
            let mut with = self;
            with.site = self.site.with_drop_path(p_path, rows_per_sample)?;
            Ok(with)
        }

        /// The drop path's `(p_path, rows_per_sample)`, if any.
        pub fn drop_path(&self) -> Option<(f64, usize)> {
            self.site.drop_path()
        }
    };
}
pub(crate) use site_methods;
