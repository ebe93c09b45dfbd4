//! The meter of the CPU references: the same accumulators as the device's
//! [`Redundancy`](super::Redundancy), in host memory, filled with the same integers.
//!
//! ```
//! use fusedreg::redundancy::{cpu::Redundancy, RowCos};
//! # fn main() -> fusedreg::Result<()> {
//! let mut meter = Redundancy::new(2)?;
//! meter.site(1)?.add(RowCos::Cos(0.5));
//! assert_eq!(meter.bi()?, vec![None, Some(0.5)]);
//! meter.reset();
//! assert_eq!(meter.bi()?, vec![None, None]);
//! assert!(meter.site(2).is_err()); // no such site
//! # Ok(()) }
//! ```

use std::cell::Cell;

use super::{check_out_len, check_site, check_sites, RowCos, SiteStats};
use crate::error::Result;

/// Per-site accumulators for the CPU references (see the [module docs](super)). Sites are
/// handed out as [`Site`] handles that ops add rows to; the meter is single-threaded (`!Sync`).
#[derive(Debug)]
pub struct Redundancy {
    sites: Vec<Cell<SiteStats>>,
}

/// One site of a [`Redundancy`] meter, passed in an op's CPU arguments
/// (e.g. [`crate::dropout_add_norm::cpu::ForwardArgs::redundancy`]).
#[derive(Clone, Copy, Debug)]
pub struct Site<'a> {
    cell: &'a Cell<SiteStats>,
}

impl<'a> Site<'a> {
    /// A site over a caller-owned cell (for the C ABI, whose caller owns the accumulators as
    /// words: [`SiteStats::from_words`] in, [`SiteStats::to_words`] out). A [`Redundancy`] hands
    /// out its own sites.
    #[doc(hidden)]
    pub fn of_cell(cell: &'a Cell<SiteStats>) -> Self {
        Site { cell }
    }

    /// Adds one row's outcome to the site.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::{cpu::Redundancy, RowCos};
    /// # fn main() -> fusedreg::Result<()> {
    /// let meter = Redundancy::new(1)?;
    /// meter.site(0)?.add(RowCos::Cos(1.0));
    /// assert_eq!(meter.stats()?[0].rows, 1);
    /// # Ok(()) }
    /// ```
    pub fn add(self, row: RowCos) {
        let mut s = self.cell.get();
        s.add(row);
        self.cell.set(s);
    }
}

impl Redundancy {
    /// A meter with `sites` zeroed sites.
    ///
    /// Errors: [`crate::Error::InvalidArgument`] for 0 sites or more than `2^32 - 1`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::cpu::Redundancy;
    /// assert_eq!(Redundancy::new(4).unwrap().sites(), 4);
    /// assert!(Redundancy::new(0).is_err());
    /// ```
    pub fn new(sites: usize) -> Result<Self> {
        check_sites(sites)?;
        Ok(Redundancy {
            sites: vec![Cell::new(SiteStats::default()); sites],
        })
    }

    /// Number of sites.
    pub fn sites(&self) -> usize {
        self.sites.len()
    }

    /// Zeroes every site.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::{cpu::Redundancy, RowCos};
    /// let mut m = Redundancy::new(1).unwrap();
    /// m.site(0).unwrap().add(RowCos::NonFinite);
    /// m.reset();
    /// assert_eq!(m.stats().unwrap()[0].nonfinite, 0);
    /// ```
    pub fn reset(&mut self) {
        for s in &self.sites {
            s.set(SiteStats::default());
        }
    }

    /// The handle of site `site` for an op's arguments.
    ///
    /// Errors: [`crate::Error::InvalidArgument`] when `site >= sites()`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::cpu::Redundancy;
    /// let m = Redundancy::new(2).unwrap();
    /// assert!(m.site(1).is_ok() && m.site(2).is_err());
    /// ```
    pub fn site(&self, site: usize) -> Result<Site<'_>> {
        check_site(site, self.sites.len())?;
        Ok(Site {
            cell: &self.sites[site],
        })
    }

    /// Every site's accumulators.
    ///
    /// Errors: [`crate::Error::InvalidArgument`] when a site counted more than
    /// [`super::MAX_ROWS`] rows since the last reset.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::{cpu::Redundancy, SiteStats};
    /// assert_eq!(Redundancy::new(1).unwrap().stats().unwrap(), vec![SiteStats::default()]);
    /// ```
    pub fn stats(&self) -> Result<Vec<SiteStats>> {
        self.sites
            .iter()
            .enumerate()
            .map(|(i, s)| s.get().checked(i))
            .collect()
    }

    /// BI per site ([`SiteStats::bi`]): `None` for a site without counted rows.
    ///
    /// Errors: as [`stats`](Self::stats).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::{cpu::Redundancy, RowCos};
    /// let m = Redundancy::new(1).unwrap();
    /// m.site(0).unwrap().add(RowCos::Cos(0.25));
    /// assert_eq!(m.bi().unwrap(), vec![Some(0.75)]);
    /// ```
    pub fn bi(&self) -> Result<Vec<Option<f64>>> {
        Ok(self.stats()?.iter().map(SiteStats::bi).collect())
    }

    /// BI per site into `out` (NaN for a site without counted rows), for callers that keep one
    /// buffer.
    ///
    /// Errors: [`crate::Error::ShapeMismatch`] when `out.len() != sites()`; as
    /// [`stats`](Self::stats).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::redundancy::cpu::Redundancy;
    /// let m = Redundancy::new(2).unwrap();
    /// let mut out = [0.0; 2];
    /// m.bi_into(&mut out).unwrap();
    /// assert!(out.iter().all(|b| b.is_nan()));
    /// assert!(m.bi_into(&mut [0.0; 3]).is_err());
    /// ```
    pub fn bi_into(&self, out: &mut [f64]) -> Result<()> {
        check_out_len(out.len(), self.sites.len())?;
        for (o, s) in out.iter_mut().zip(self.stats()?) {
            *o = s.bi().unwrap_or(f64::NAN);
        }
        Ok(())
    }
}
