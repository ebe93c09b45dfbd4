//! The tools' own kernels (`tools/kernels/*.cu`), embedded by `tools/build.rs`, as a table for
//! the library's loader (`fusedreg::kernel_table`), listed with the library's `kernel_list!`
//! and checked by its `kernel_table_tests!`: the same list grammar, cache, check and launch as
//! the library's kernels.
//!
//! Each kernel takes one `#[repr(C)]` parameter struct and is launched through the handle, so it
//! is counted by [`Handle::launch_count`] like the library's.
//! The modules are loaded once per CUDA context, at first use, and kept for the life of the
//! process (these are tools: a benchmark binary, a trainer, tests).

use std::sync::{Arc, Mutex};

use cudarc::driver::DeviceRepr;
use fusedreg::kernel_table::{KernelTable, Loaded};
use fusedreg::{Handle, Result};

/// The build script's table of embedded modules (`MODULES`, `NOT_BUILT_REASON`, `ARCHS`;
/// `NVCC_VERSION` is the library's too, reported by [`fusedreg::nvcc_version`]).
#[allow(dead_code)]
mod embedded {
    use fusedreg::kernel_table::EmbeddedModule;

    include!(concat!(env!("OUT_DIR"), "/kernel_modules.rs"));
}

fusedreg::kernel_list! {
    /// A launchable tools kernel: its index in [`TABLE`].
    pub(crate) struct Kernel;
    "copy" => {
        [_ CopyU128] = "copy_u128",
    }
    "mlp" => {
        [_ MlpBiasGeluFwdF32] = "mlp_bias_gelu_fwd_f32",
        [_ MlpBiasGeluBwdF32] = "mlp_bias_gelu_bwd_f32",
        [_ MlpColsumPartialF32] = "mlp_colsum_partial_f32",
        [_ MlpColsumFinalF32] = "mlp_colsum_final_f32",
        [_ MlpMseGradF32] = "mlp_mse_grad_f32",
    }
}

/// The tools' kernels for the library's loader.
static TABLE: KernelTable = KernelTable {
    dir: "tools/kernels",
    modules: embedded::MODULES,
    archs: embedded::ARCHS,
    not_built_reason: embedded::NOT_BUILT_REASON,
    kernels: KERNELS,
};

/// The tools' loaded kernels, one cache per context, kept for the life of the process (the
/// library's loader shares a cache only while someone holds it).
static LOADED: Mutex<Vec<Arc<Loaded>>> = Mutex::new(Vec::new());

fn loaded(handle: &Handle) -> Result<Arc<Loaded>> {
    let fresh = Loaded::for_context(&TABLE, handle.context())?;
    let mut all = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    match all.iter().find(|l| Arc::ptr_eq(l, &fresh)) {
        Some(l) => Ok(l.clone()),
        None => {
            all.push(fresh.clone());
            Ok(fresh)
        }
    }
}

/// Loads every tools kernel into the handle's context now (see [`crate::load_all_kernels`]).
pub(crate) fn load_all(handle: &Handle) -> Result<usize> {
    loaded(handle)?.load_all()
}

/// Threads per block of every tools kernel (the MSE kernel's tree, `MSE_BLOCK` in
/// `tools/kernels/mlp.cu`, is sized for it); none takes dynamic shared memory.
pub(crate) const BLOCK: u32 = 256;

/// Launches tools kernel `k` on `grid` blocks of [`BLOCK`] threads with its one by-value
/// parameter struct on the handle's stream.
///
/// Callers validate every buffer behind the addresses in `params` against the grid first.
pub(crate) fn launch<P: DeviceRepr>(
    handle: &Handle,
    k: Kernel,
    grid: (u32, u32, u32),
    params: &P,
) -> Result<()> {
    let l = loaded(handle)?;
    // SAFETY: `l` was loaded for this handle's context; `params` is the kernel's one parameter
    // (its size asserted on both sides) and every address in it was checked by the caller
    // against the buffer lengths the grid covers.
    unsafe { handle.launch_loaded(&l, k.index(), grid, (BLOCK, 1, 1), 0, params) }
}

/// Declares a tools kernel's one parameter struct: `#[repr(C)]` plain old data whose size is
/// asserted here and in its `.cu` file (so the two layouts cannot drift apart unnoticed), and
/// so launchable by [`launch`].
macro_rules! kernel_params {
    ($(#[$m:meta])* struct $name:ident($size:literal) { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct $name {
            $($field: $ty),*
        }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        // SAFETY: plain old data with the kernel's layout (its size asserted on both sides).
        unsafe impl cudarc::driver::DeviceRepr for $name {}
    };
}
pub(crate) use kernel_params;

// Buffer addresses, grid sizes and length checks are the library's.
pub(crate) use fusedreg::error::check_len;
pub(crate) use fusedreg::grid_for;

#[cfg(test)]
mod tests {
    fusedreg::kernel_table_tests!(super::TABLE);
}
