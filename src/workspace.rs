//! Caller-supplied device workspaces: [`WorkspaceView`], a borrowed byte buffer an op carves its
//! device scratch from, and the size queries that say how many bytes each op needs.
//!
//! Without a workspace the ops allocate their scratch stream-ordered per call (or grow an owned
//! `Workspace` once, see [`crate::dropping::Workspace`] and [`crate::cross_entropy::Workspace`]).
//! With a [`WorkspaceView`], the caller's allocator (PyTorch's caching allocator, a CUDA graph's
//! private pool) owns every byte: the view is used as given, never grown and never freed.
//!
//! The sizes are functions of the shape, dtype and options only (no device), and equal what the
//! owned workspaces allocate for the same call (plus the 8-byte alignment of cross-entropy's
//! count). An empty problem needs 0 bytes.
//!
//! ```
//! use fusedreg::workspace;
//! use fusedreg::DtypeKind;
//! # fn main() -> fusedreg::Result<()> {
//! // dropout backward with dbias over [1000, 1024] f32: one f32 per column per dbias slab.
//! assert_eq!(workspace::dropout_backward_size(1000, 1024, DtypeKind::F32, true)?, 4 * 1024 * 63);
//! assert_eq!(workspace::dropout_backward_size(1000, 1024, DtypeKind::F32, false)?, 0);
//! // dropout_add_norm backward: dgamma, dbeta and dbias partials over min(rows, 1024) slabs.
//! assert_eq!(workspace::dropout_add_norm_backward_size(1000, 1024)?, 12 * 1024 * 1000);
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaViewMut, SyncOnDrop};

use crate::cross_entropy::Reduction;
use crate::dtype::DtypeKind;
use crate::error::{Error, Result};
use crate::runtime::Handle;

/// Alignment a [`WorkspaceView`] must have (bytes): the ops' f32 and u64 scratch, and 16-byte
/// vector access, start at its first byte.
pub const WORKSPACE_ALIGN: usize = 16;

/// A caller-owned device buffer lent to one call for its scratch. Used as given: never grown,
/// never freed. It must be at least the op's size query (e.g. [`dropout_backward_size`]) and
/// [`WORKSPACE_ALIGN`]-byte aligned, else the call fails with a clear [`Error`] before launching
/// anything. Its contents on entry do not matter and are garbage on return.
///
/// ```no_run
/// use fusedreg::dropout::{self as dr, BackwardOptions, Config};
/// use fusedreg::workspace::{self, WorkspaceView};
/// use fusedreg::DtypeKind;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(64, 256, 0.1, 42, 7)?;
/// let dy = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut dbias = s.alloc_zeros::<f32>(256).unwrap();
/// let n = workspace::dropout_backward_size(64, 256, DtypeKind::F32, true)?;
/// let mut ws = s.alloc_zeros::<u8>(n).unwrap(); // the caller's allocator
/// let opts = BackwardOptions {
///     dbias: Some(dbias.as_view_mut()),
///     workspace_view: Some(WorkspaceView::new(ws.as_view_mut())),
///     ..Default::default()
/// };
/// dr::backward(&h, &cfg, &dy, &mut dx, opts)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WorkspaceView<'a> {
    buf: CudaViewMut<'a, u8>,
}

impl<'a> WorkspaceView<'a> {
    /// Lends `buf` to a call.
    ///
    /// # Examples
    ///
    /// See [`WorkspaceView`].
    pub fn new(buf: CudaViewMut<'a, u8>) -> Self {
        WorkspaceView { buf }
    }

    /// Size in bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let h = fusedreg::Handle::new(0).unwrap();
    /// let mut b = h.stream().alloc_zeros::<u8>(64).unwrap();
    /// assert_eq!(fusedreg::workspace::WorkspaceView::new(b.as_view_mut()).len(), 64);
    /// ```
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether it holds no bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let h = fusedreg::Handle::new(0).unwrap();
    /// let mut b = h.stream().alloc_zeros::<u8>(64).unwrap();
    /// assert!(!fusedreg::workspace::WorkspaceView::new(b.as_view_mut()).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The raw address of the workspace for a call that needs `need` bytes (`query` names the
    /// size query, for the message), after checking its context, size and alignment. The guard
    /// must outlive the launches.
    pub(crate) fn bind<'b>(
        &'b mut self,
        handle: &'b Handle,
        op: &'static str,
        query: &str,
        need: usize,
    ) -> Result<(u64, SyncOnDrop<'b>)> {
        check_fits(op, query, self.buf.len(), need)?;
        let len = self.buf.len();
        let (p, g) = handle.write_ptr(op, "workspace", &mut self.buf)?;
        check_aligned(op, p, len)?;
        Ok((p, g))
    }
}

/// The size check of a workspace of `have` bytes for a call needing `need` (see
/// [`WorkspaceView`]).
pub(crate) fn check_fits(op: &'static str, query: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::shape(
            op,
            format!(
                "the workspace has {have} bytes, this call needs {need} ({query}); pass a \
                 workspace of at least that many bytes, or none"
            ),
        ));
    }
    Ok(())
}

/// The alignment check of a workspace at `addr` (see [`WORKSPACE_ALIGN`]).
pub(crate) fn check_aligned(op: &'static str, addr: u64, len: usize) -> Result<()> {
    if len > 0 && addr % WORKSPACE_ALIGN as u64 != 0 {
        return Err(Error::invalid(
            op,
            format!(
                "the workspace at {addr:#x} is not {WORKSPACE_ALIGN}-byte aligned; pass the \
                 start of an allocation (allocators return 256-byte aligned blocks)"
            ),
        ));
    }
    Ok(())
}

fn mul(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::shape(op, "the workspace size overflows usize"))
}

/// Bytes of scratch a GPU backward of `dropout` (with or without a residual) needs over `[rows,
/// cols]` of `dtype`: with dbias, one f32 per column per dbias slab
/// (`4 · cols · `[`crate::dropping::slab_count`]), else 0. The same partition serves
/// `bias_act_dropout` ([`bias_act_dropout_backward_size`]).
///
/// ```
/// use fusedreg::workspace::dropout_backward_size;
/// use fusedreg::DtypeKind;
/// # fn main() -> fusedreg::Result<()> {
/// assert_eq!(dropout_backward_size(1000, 1024, DtypeKind::F32, true)?, 4 * 1024 * 63);
/// assert_eq!(dropout_backward_size(0, 1024, DtypeKind::F32, true)?, 0); // empty: nothing
/// assert_eq!(dropout_backward_size(1000, 1024, DtypeKind::Bf16, false)?, 0); // no dbias
/// # Ok(()) }
/// ```
pub fn dropout_backward_size(
    rows: usize,
    cols: usize,
    dtype: DtypeKind,
    dbias: bool,
) -> Result<usize> {
    dbias_partials_size("dropout", rows, cols, dtype, dbias)
}

/// Bytes of scratch a GPU `bias_act_dropout` backward needs: as [`dropout_backward_size`] (the
/// dbias partials of the shared slab partition; 0 without dbias).
///
/// ```
/// use fusedreg::workspace::{bias_act_dropout_backward_size, dropout_backward_size};
/// use fusedreg::DtypeKind;
/// # fn main() -> fusedreg::Result<()> {
/// assert_eq!(
///     bias_act_dropout_backward_size(8192, 4096, DtypeKind::Bf16, true)?,
///     dropout_backward_size(8192, 4096, DtypeKind::Bf16, true)?,
/// );
/// # Ok(()) }
/// ```
pub fn bias_act_dropout_backward_size(
    rows: usize,
    cols: usize,
    dtype: DtypeKind,
    dbias: bool,
) -> Result<usize> {
    dbias_partials_size("bias_act_dropout", rows, cols, dtype, dbias)
}

fn dbias_partials_size(
    op: &'static str,
    rows: usize,
    cols: usize,
    dtype: DtypeKind,
    dbias: bool,
) -> Result<usize> {
    if !dbias || rows == 0 || cols == 0 {
        return Ok(0);
    }
    let slabs = crate::dropping::slab_count(rows, cols, dtype).max(1);
    mul(op, mul(op, 4, cols)?, slabs)
}

/// Bytes of scratch a GPU `dropout_add_norm` backward needs: the dgamma, dbeta and dbias
/// partials, `12 · cols · `[`crate::dropout_add_norm::colsum_slab_count`]`(rows)` (whatever
/// gradients are asked for).
///
/// ```
/// use fusedreg::workspace::dropout_add_norm_backward_size;
/// # fn main() -> fusedreg::Result<()> {
/// assert_eq!(dropout_add_norm_backward_size(4096, 768)?, 12 * 768 * 1024);
/// assert_eq!(dropout_add_norm_backward_size(0, 768)?, 0);
/// # Ok(()) }
/// ```
pub fn dropout_add_norm_backward_size(rows: usize, cols: usize) -> Result<usize> {
    const OP: &str = "dropout_add_norm";
    let slabs = crate::dropout_add_norm::colsum_slab_count(rows);
    mul(OP, mul(OP, 12, cols)?, slabs)
}

/// Bytes of scratch a GPU `cross_entropy` call (forward, or forward with gradient) needs: for a
/// sum or a mean the per-row losses and their chunk sums (f32), rounded up to 8, and then the
/// u64 count of valid rows; 8 bytes (the count) with [`Reduction::None`]; 0 for no rows.
///
/// ```
/// use fusedreg::workspace::cross_entropy_size;
/// use fusedreg::cross_entropy::Reduction;
/// # fn main() -> fusedreg::Result<()> {
/// assert_eq!(cross_entropy_size(3, 50_257, Reduction::Mean)?, 16 + 8); // 3 f32 -> 16, count
/// assert_eq!(cross_entropy_size(3, 50_257, Reduction::None)?, 8);
/// assert_eq!(cross_entropy_size(0, 50_257, Reduction::Mean)?, 0);
/// # Ok(()) }
/// ```
pub fn cross_entropy_size(rows: usize, vocab: usize, reduction: Reduction) -> Result<usize> {
    if rows == 0 || vocab == 0 {
        return Ok(0);
    }
    let f32s = cross_entropy_f32_len(rows, reduction);
    Ok(count_offset(mul("cross_entropy", 4, f32s)?) + 8)
}

/// f32 elements of cross-entropy's reduction scratch (0 with [`Reduction::None`]).
pub(crate) fn cross_entropy_f32_len(rows: usize, reduction: Reduction) -> usize {
    if reduction == Reduction::None {
        0
    } else {
        crate::cross_entropy::scratch_len(rows)
    }
}

/// Byte offset of cross-entropy's u64 count: after `f32_bytes`, rounded up to 8.
pub(crate) fn count_offset(f32_bytes: usize) -> usize {
    f32_bytes.div_ceil(8) * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_sizes_are_the_owned_partials() {
        // launch_backward / bias_act_dropout's backward allocate `slabs * cols` f32 with
        // slabs = ceil(rows / slab_rows) (at least 1) when dbias is wanted.
        for &(rows, cols) in &[(1, 1), (1000, 1024), (17, 33), (70_000, 8), (4096, 50_257)] {
            for dt in [DtypeKind::F32, DtypeKind::F16, DtypeKind::Bf16] {
                let slab = crate::dropping::slab_rows(rows, cols, dt);
                let owned = rows.div_ceil(slab).max(1) * cols;
                assert_eq!(
                    dropout_backward_size(rows, cols, dt, true).unwrap(),
                    4 * owned
                );
                assert_eq!(
                    bias_act_dropout_backward_size(rows, cols, dt, true).unwrap(),
                    4 * owned
                );
                assert_eq!(dropout_backward_size(rows, cols, dt, false).unwrap(), 0);
            }
        }
        assert_eq!(
            dropout_backward_size(5, 0, DtypeKind::F32, true).unwrap(),
            0
        );
        assert!(dropout_backward_size(2, usize::MAX / 2, DtypeKind::F32, true).is_err());
    }

    #[test]
    fn dropout_add_norm_size_is_three_partial_arrays() {
        for &(rows, cols) in &[
            (1, 1),
            (1000, 768),
            (1024, 4096),
            (16_385, 8),
            (0, 8),
            (8, 0),
        ] {
            let slabs = crate::dropout_add_norm::colsum_slab_count(rows);
            assert_eq!(
                dropout_add_norm_backward_size(rows, cols).unwrap(),
                4 * 3 * slabs * cols
            );
        }
    }

    #[test]
    fn cross_entropy_size_is_the_owned_scratch_and_count() {
        use crate::cross_entropy::scratch_len;
        for rows in [1, 3, 1000, 1 << 20, (1 << 20) + 7] {
            // Owned: `scratch_len(rows)` f32 for a sum or mean, and one u64 count always.
            for (red, f32s) in [
                (Reduction::Mean, scratch_len(rows)),
                (Reduction::Sum, scratch_len(rows)),
                (Reduction::None, 0),
            ] {
                let n = cross_entropy_size(rows, 10, red).unwrap();
                assert_eq!(n, (4 * f32s).div_ceil(8) * 8 + 8, "{rows} {red:?}");
                assert_eq!(count_offset(4 * f32s) % 8, 0);
            }
        }
        assert_eq!(cross_entropy_size(0, 10, Reduction::Sum).unwrap(), 0);
    }

    #[test]
    fn too_small_and_misaligned_are_clear_errors() {
        let e = check_fits(
            "dropout",
            "fusedreg::workspace::dropout_backward_size",
            99,
            100,
        )
        .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        let m = e.to_string();
        assert!(
            m.contains("99 bytes")
                && m.contains("needs 100")
                && m.contains("dropout_backward_size"),
            "{m}"
        );
        assert!(check_fits("dropout", "q", 100, 100).is_ok());
        let e = check_aligned("dropout", 0x1008, 64).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().contains("16-byte aligned"), "{e}");
        assert!(check_aligned("dropout", 0x1010, 64).is_ok());
    }
}
