//! [`BlockInfluence`]: fusedreg's Block Influence meter ([`crate::redundancy`]) for
//! [`DropoutAddNorm`](super::DropoutAddNorm) sites on candle tensors.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Device, Result};

use crate::error::Error;
use crate::redundancy::{self, SiteStats};

const OP: &str = "candle::BlockInfluence";

/// A Block Influence meter of `sites` sites on one candle device: every
/// [`DropoutAddNorm`](super::DropoutAddNorm) call run through
/// [`DropoutAddNorm::measured`](super::DropoutAddNorm::measured) adds its rows'
/// `cos(residual, s)` to its site, inside the fused forward (three more row sums, no extra pass
/// and no host sync on CUDA). [`bi`](Self::bi) reads `BI = 1 - mean cos` per site: near 0, the
/// sub-block hardly turns the residual stream (the first candidate for removal; see
/// [`crate::redundancy`] for how to read it, and measure in evaluation, `keys = None`).
///
/// On the CPU device the meter is [`redundancy::cpu::Redundancy`], on CUDA
/// [`redundancy::Redundancy`] on candle's stream; both give the same integers (the statistic is
/// pinned bit for bit). Clones share one meter.
///
/// # Examples
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use fusedreg::candle::{BlockInfluence, DropoutAddNorm};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let meter = BlockInfluence::new(2, &dev)?;
/// let norm = DropoutAddNorm::layer_norm(1e-5, 0)?;
/// let gamma = Tensor::ones(8, DType::F32, &dev)?;
/// let stream = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
/// let small = (Tensor::randn(0f32, 1.0, (4, 8), &dev)? * 0.01)?; // barely turns the stream
/// let large = (Tensor::randn(0f32, 1.0, (4, 8), &dev)? * 100.0)?; // replaces it
/// norm.measured(&meter, 0)?.forward(&small, Some(&stream), None, &gamma, None, None)?;
/// norm.measured(&meter, 1)?.forward(&large, Some(&stream), None, &gamma, None, None)?;
/// let bi = meter.bi()?;
/// assert!(bi[0].unwrap() < 0.01 && bi[1].unwrap() > bi[0].unwrap());
/// meter.reset()?;
/// assert_eq!(meter.bi()?, [None, None]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct BlockInfluence {
    meter: Arc<Mutex<Meter>>,
    sites: usize,
}

/// The meter on the device it counts on.
#[derive(Debug)]
pub(crate) enum Meter {
    Cpu(redundancy::cpu::Redundancy),
    #[cfg(feature = "candle-cuda")]
    Cuda(redundancy::Redundancy),
}

impl Meter {
    /// Site `site` of the meter for a forward of `op` on the CPU; a meter counting on a CUDA
    /// device is an error.
    #[cfg_attr(not(feature = "candle-cuda"), allow(unused_variables))]
    pub(crate) fn cpu_site(
        &self,
        op: &'static str,
        site: usize,
    ) -> Result<redundancy::cpu::Site<'_>> {
        match self {
            Meter::Cpu(m) => Ok(m.site(site)?),
            #[cfg(feature = "candle-cuda")]
            Meter::Cuda(_) => Err(elsewhere(op)),
        }
    }

    /// Site `site` of the meter for a forward of `op` on a CUDA device; a meter counting on the
    /// CPU is an error.
    #[cfg(feature = "candle-cuda")]
    pub(crate) fn cuda_site(
        &mut self,
        op: &'static str,
        site: usize,
    ) -> Result<redundancy::Site<'_>> {
        match self {
            Meter::Cuda(m) => Ok(m.site(site)?),
            Meter::Cpu(_) => Err(elsewhere(op)),
        }
    }
}

/// A forward of `op` on one device measured by a meter on another.
#[cfg(feature = "candle-cuda")]
fn elsewhere(op: &'static str) -> candle_core::Error {
    Error::invalid(
        op,
        "the Block Influence meter is on another device than the tensors",
    )
    .into()
}

impl BlockInfluence {
    /// A meter of `sites` sites (numbered from 0) counting calls on `device`: the CPU or (feature
    /// `candle-cuda`) a CUDA device.
    ///
    /// Errors: `sites` 0 or too many for the accumulators (see [`crate::redundancy`]), another
    /// device.
    pub fn new(sites: usize, device: &Device) -> Result<Self> {
        let meter = match device {
            Device::Cpu => Meter::Cpu(redundancy::cpu::Redundancy::new(sites)?),
            #[cfg(feature = "candle-cuda")]
            Device::Cuda(dev) => {
                let h = super::shell::cuda_handle(dev)?;
                Meter::Cuda(redundancy::Redundancy::new(&h, sites)?)
            }
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "device {:?} is not supported: use the CPU or (feature candle-cuda) a \
                         CUDA device",
                        other.location()
                    ),
                )
                .into())
            }
        };
        Ok(BlockInfluence {
            meter: Arc::new(Mutex::new(meter)),
            sites,
        })
    }

    /// The number of sites.
    pub fn sites(&self) -> usize {
        self.sites
    }

    /// Every site's accumulated statistics (on CUDA: one small copy, which waits for the
    /// forwards queued before it).
    pub fn stats(&self) -> Result<Vec<SiteStats>> {
        Ok(match &*self.lock() {
            Meter::Cpu(m) => m.stats()?,
            #[cfg(feature = "candle-cuda")]
            Meter::Cuda(m) => m.stats()?,
        })
    }

    /// Every site's Block Influence, `None` for a site without counted rows (see
    /// [`SiteStats::bi`]).
    pub fn bi(&self) -> Result<Vec<Option<f64>>> {
        Ok(self.stats()?.iter().map(SiteStats::bi).collect())
    }

    /// Zeroes every site.
    pub fn reset(&self) -> Result<()> {
        match &mut *self.lock() {
            Meter::Cpu(m) => m.reset(),
            #[cfg(feature = "candle-cuda")]
            Meter::Cuda(m) => m.reset()?,
        }
        Ok(())
    }

    /// Checks `site` against the meter's sites.
    pub(crate) fn check_site(&self, site: usize) -> Result<()> {
        Ok(redundancy::check_site(site, self.sites)?)
    }

    /// The meter, locked (a panic elsewhere cannot leave it half-updated: every update is one
    /// call into it).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Meter> {
        self.meter.lock().unwrap_or_else(|e| e.into_inner())
    }
}
