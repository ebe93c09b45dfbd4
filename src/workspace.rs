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

pub use crate::runtime::workspace_view::{WorkspaceView, WORKSPACE_ALIGN};

use crate::cross_entropy::Reduction;
use crate::dtype::DtypeKind;
use crate::error::{Error, Result};

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
    crate::cross_entropy::workspace_size(rows, vocab, reduction)
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
        use crate::cross_entropy::gpu::scratch_len;
        for rows in [1, 3, 1000, 1 << 20, (1 << 20) + 7] {
            // Owned: `scratch_len(rows)` f32 for a sum or mean, and one u64 count always.
            for (red, f32s) in [
                (Reduction::Mean, scratch_len(rows)),
                (Reduction::Sum, scratch_len(rows)),
                (Reduction::None, 0),
            ] {
                let n = cross_entropy_size(rows, 10, red).unwrap();
                assert_eq!(n, (4 * f32s).div_ceil(8) * 8 + 8, "{rows} {red:?}");
            }
        }
        assert_eq!(cross_entropy_size(0, 10, Reduction::Sum).unwrap(), 0);
    }
}
