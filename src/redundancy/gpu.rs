//! The device meter: per-site integer accumulators in device memory that the kernels add to.

use cudarc::driver::{CudaSlice, CudaViewMut};

use super::{check_out_len, check_site, check_sites, SiteStats, OP, WORDS_PER_SITE};
use crate::error::{Error, Result};
use crate::runtime::Handle;

/// Per-site Block Influence accumulators on the device (see the [module docs](super)): `3 *
/// sites` u64 words (`cos_sum`, `rows`, `nonfinite` per site), allocated once, zeroed by
/// [`reset`](Self::reset), added to by the kernels of the ops a [`Site`] is passed to (integer
/// atomics, one per block: no float atomics, no host synchronisation), and read back with one
/// small copy by [`stats`](Self::stats) / [`bi`](Self::bi).
///
/// Everything runs on the handle's stream, in stream order: a read waits for every launch
/// enqueued before it.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout_add_norm::{self as dan, Config, ForwardArgs, ForwardOut, Norm};
/// use fusedreg::redundancy::Redundancy;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let layers = 12;
/// let mut meter = Redundancy::new(&h, 2 * layers)?; // attention and MLP adds of each block
/// let cfg = Config::new(64, 1024, Norm::LayerNorm, 1e-5)?;
/// let z = |n| s.alloc_zeros::<f32>(n).unwrap();
/// let (x, r, gamma) = (z(cfg.len()), z(cfg.len()), z(1024));
/// let (mut out, mut st, mut mean, mut rstd) = (z(cfg.len()), z(cfg.len()), z(64), z(64));
/// // ... in the model, the attention add of block 3:
/// let args = ForwardArgs {
///     residual: Some(r.as_view()),
///     redundancy: Some(meter.site(2 * 3)?),
///     ..ForwardArgs::new(x.as_view(), gamma.as_view())
/// };
/// let outs = ForwardOut { out: out.as_view_mut(), s: st.as_view_mut(), mean: mean.as_view_mut(), rstd: rstd.as_view_mut() };
/// dan::forward(&h, &cfg, args, outs)?;
/// // ... after the evaluation pass: one copy of 24 * 24 bytes.
/// for (site, bi) in meter.bi()?.iter().enumerate() {
///     println!("site {site}: BI {bi:?}");
/// }
/// meter.reset()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Redundancy {
    handle: Handle,
    acc: CudaSlice<u64>,
    sites: usize,
}

/// One site of a [`Redundancy`] meter, passed in an op's GPU arguments (e.g.
/// [`crate::dropout_add_norm::ForwardArgs::redundancy`]); borrows the meter for the call.
pub struct Site<'a> {
    pub(crate) words: CudaViewMut<'a, u64>,
}

impl<'a> Site<'a> {
    /// A site over `WORDS_PER_SITE` caller-owned device words (`cos_sum`, `rows`, `nonfinite`;
    /// zero them to start), for callers that own the accumulators themselves: the C ABI and
    /// the Python package, whose meter is a tensor. A [`Redundancy`] hands out its own sites.
    ///
    /// Errors: [`Error::ShapeMismatch`] when `words` is not 3 words long.
    #[doc(hidden)]
    pub fn from_words(words: CudaViewMut<'a, u64>) -> Result<Self> {
        crate::error::check_len(OP, "site words", words.len(), WORDS_PER_SITE)?;
        Ok(Site { words })
    }
}

impl std::fmt::Debug for Site<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site").finish_non_exhaustive()
    }
}

impl Redundancy {
    /// A meter of `sites` zeroed sites on `handle`'s context and stream.
    ///
    /// Errors: [`Error::InvalidArgument`] for 0 sites or more than `2^32 - 1`; driver errors.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let meter = fusedreg::redundancy::Redundancy::new(&h, 8)?;
    /// assert_eq!(meter.sites(), 8);
    /// assert!(fusedreg::redundancy::Redundancy::new(&h, 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(handle: &Handle, sites: usize) -> Result<Self> {
        check_sites(sites)?;
        let acc = handle
            .stream()
            .alloc_zeros::<u64>(sites * WORDS_PER_SITE)
            .map_err(Error::driver(OP))?;
        Ok(Redundancy {
            handle: handle.clone(),
            acc,
            sites,
        })
    }

    /// Number of sites.
    ///
    /// # Examples
    ///
    /// See [`new`](Self::new).
    pub fn sites(&self) -> usize {
        self.sites
    }

    /// Zeroes every site (a memset on the stream; nothing waits).
    ///
    /// Errors: driver errors.
    ///
    /// # Examples
    ///
    /// See [`Redundancy`].
    pub fn reset(&mut self) -> Result<()> {
        self.handle
            .stream()
            .memset_zeros(&mut self.acc)
            .map_err(Error::driver(OP))
    }

    /// The handle of site `site` for an op's arguments.
    ///
    /// Errors: [`Error::InvalidArgument`] when `site >= sites()`.
    ///
    /// # Examples
    ///
    /// See [`Redundancy`].
    pub fn site(&mut self, site: usize) -> Result<Site<'_>> {
        check_site(site, self.sites)?;
        let start = site * WORDS_PER_SITE;
        Ok(Site {
            words: self.acc.slice_mut(start..start + WORDS_PER_SITE),
        })
    }

    /// Every site's accumulators: one device-to-host copy of `24 * sites` bytes, which waits
    /// for the work enqueued on the stream before it.
    ///
    /// Errors: [`Error::InvalidArgument`] when a site counted more than
    /// [`super::MAX_ROWS`] rows since the last reset; driver errors.
    ///
    /// # Examples
    ///
    /// See [`Redundancy`].
    pub fn stats(&self) -> Result<Vec<SiteStats>> {
        let words = self.handle.to_host(OP, &self.acc)?;
        words
            .chunks_exact(WORDS_PER_SITE)
            .enumerate()
            .map(|(i, w)| SiteStats::from_words([w[0], w[1], w[2]]).checked(i))
            .collect()
    }

    /// BI per site ([`SiteStats::bi`]; `None` for a site without counted rows), with one copy.
    ///
    /// Errors: as [`stats`](Self::stats).
    ///
    /// # Examples
    ///
    /// See [`Redundancy`].
    pub fn bi(&self) -> Result<Vec<Option<f64>>> {
        Ok(self.stats()?.iter().map(SiteStats::bi).collect())
    }

    /// BI per site into `out` (NaN for a site without counted rows).
    ///
    /// Errors: [`Error::ShapeMismatch`] when `out.len() != sites()`; as [`stats`](Self::stats).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let meter = fusedreg::redundancy::Redundancy::new(&h, 4)?;
    /// let mut bi = [0.0; 4];
    /// meter.bi_into(&mut bi)?;
    /// assert!(meter.bi_into(&mut [0.0; 3]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn bi_into(&self, out: &mut [f64]) -> Result<()> {
        check_out_len(out.len(), self.sites)?;
        for (o, s) in out.iter_mut().zip(self.stats()?) {
            *o = s.bi().unwrap_or(f64::NAN);
        }
        Ok(())
    }
}
