//! [`WorkspaceView`]: a caller's device byte buffer an op carves its scratch from (the size
//! queries are [`crate::workspace`]'s; the view lives here, below the ops, so the ops and the
//! queries never import each other both ways).

use cudarc::driver::{CudaViewMut, SyncOnDrop};

use super::Handle;
use crate::error::{Error, Result};

/// Alignment a [`WorkspaceView`] must have (bytes): the ops' f32 and u64 scratch, and 16-byte
/// vector access, start at its first byte.
pub const WORKSPACE_ALIGN: usize = 16;

/// A caller-owned device buffer lent to one call for its scratch. Used as given: never grown,
/// never freed. It must be at least the op's size query (e.g. [`crate::workspace::dropout_backward_size`]) and
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

#[cfg(test)]
mod tests {
    use super::*;

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
