//! The tools' own kernels (`tools/kernels/*.cu`), embedded by `tools/build.rs`, and their
//! per-context cache.
//!
//! Each kernel takes one `#[repr(C)]` parameter struct and is launched through
//! [`Handle::launch_function`], so it is counted by [`Handle::launch_count`] like the library's.
//! The modules are loaded once per CUDA context, at first use, and kept for the life of the
//! process (these are tools: a benchmark binary, a trainer, tests).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaFunction, DeviceRepr};
use cudarc::nvrtc::Ptx;
use fusedreg::{Error, Handle, Result};

/// The build script's table of embedded modules (`MODULES`, `NOT_BUILT_REASON`, `ARCHS`;
/// `NVCC_VERSION` is the library's too, reported by [`fusedreg::nvcc_version`]).
#[allow(dead_code)]
mod embedded {
    /// One compiled `tools/kernels/<stem>.cu`.
    pub(crate) struct EmbeddedModule {
        pub stem: &'static str,
        pub fatbin: &'static [u8],
        /// Entry points present for every compiled arch (read from the PTX by the build script).
        pub entries: &'static [&'static str],
    }

    include!(concat!(env!("OUT_DIR"), "/kernel_modules.rs"));
}
use embedded::{ARCHS, MODULES, NOT_BUILT_REASON};

macro_rules! kernels {
    ($( $module:literal => { $( $id:ident = $symbol:literal ),* $(,)? } )*) => {
        /// A launchable tools kernel. Its discriminant indexes the per-context function table.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Kernel { $( $( $id, )* )* }

        impl Kernel {
            /// Every kernel, in declaration order.
            pub(crate) const ALL: &'static [Kernel] = &[ $( $( Kernel::$id, )* )* ];

            /// The `extern "C"` symbol in the module.
            pub(crate) const fn symbol(self) -> &'static str {
                match self { $( $( Kernel::$id => $symbol, )* )* }
            }

            /// The module (kernel file stem) that defines it.
            pub(crate) const fn module(self) -> &'static str {
                match self { $( $( Kernel::$id => $module, )* )* }
            }
        }
    };
}

kernels! {
    "copy" => {
        CopyU128 = "copy_u128",
    }
    "mlp" => {
        MlpBiasGeluFwdF32 = "mlp_bias_gelu_fwd_f32",
        MlpBiasGeluBwdF32 = "mlp_bias_gelu_bwd_f32",
        MlpColsumPartialF32 = "mlp_colsum_partial_f32",
        MlpColsumFinalF32 = "mlp_colsum_final_f32",
        MlpMseGradF32 = "mlp_mse_grad_f32",
    }
}

/// The functions of every tools kernel, loaded into one context.
struct Loaded {
    ctx: usize,
    functions: Vec<CudaFunction>,
}

/// Loaded tables, one per context (kept: the modules hold their context alive, so a context's
/// address is never reused while its entry exists).
static LOADED: Mutex<Vec<Arc<Loaded>>> = Mutex::new(Vec::new());

fn loaded(handle: &Handle) -> Result<Arc<Loaded>> {
    if let Some(reason) = NOT_BUILT_REASON {
        return Err(Error::KernelsNotBuilt { reason });
    }
    let ctx = handle.context();
    let key = ctx.cu_ctx() as usize;
    let mut all = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = all.iter().find(|l| l.ctx == key) {
        return Ok(l.clone());
    }
    let mut functions = Vec::with_capacity(Kernel::ALL.len());
    let mut modules = Vec::new();
    for &k in Kernel::ALL {
        let load_err = |source| Error::ModuleLoad {
            module: k.module(),
            symbol: k.symbol(),
            archs: ARCHS
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join("/sm_"),
            source,
        };
        let embedded =
            MODULES
                .iter()
                .find(|m| m.stem == k.module())
                .ok_or(Error::KernelsNotBuilt {
                    reason: "a tools kernel module is missing from the build",
                })?;
        let module = match modules.iter().find(|(s, _)| *s == embedded.stem) {
            Some((_, m)) => Arc::clone(m),
            None => {
                let m = ctx
                    .load_module(Ptx::from_binary(embedded.fatbin.to_vec()))
                    .map_err(load_err)?;
                modules.push((embedded.stem, m.clone()));
                m
            }
        };
        functions.push(module.load_function(k.symbol()).map_err(load_err)?);
    }
    let l = Arc::new(Loaded {
        ctx: key,
        functions,
    });
    all.push(l.clone());
    Ok(l)
}

/// Loads every tools kernel into the handle's context now (see [`crate::load_all_kernels`]).
pub(crate) fn load_all(handle: &Handle) -> Result<usize> {
    Ok(loaded(handle)?.functions.len())
}

/// Launches tools kernel `k` with its one by-value parameter struct on the handle's stream.
///
/// Callers validate every buffer behind the addresses in `params` against the grid first.
pub(crate) fn launch<P: DeviceRepr>(
    handle: &Handle,
    k: Kernel,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    params: &P,
) -> Result<()> {
    let l = loaded(handle)?;
    let f = &l.functions[k as usize];
    // SAFETY: `f` was loaded into this handle's context; `params` is the kernel's one parameter
    // (its size asserted on both sides) and every address in it was checked by the caller
    // against the buffer lengths the grid covers.
    unsafe { handle.launch_function(f, k.symbol(), grid, block, shared_bytes, params) }
}

// Buffer addresses, grid sizes and length checks are the library's.
pub(crate) use fusedreg::error::check_len;
pub(crate) use fusedreg::grid_for;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every symbol the tools launch exists in the compiled module (for every arch).
    #[test]
    #[cfg_attr(
        not(fusedreg_tools_kernels_built),
        ignore = "kernels not built: run scripts/install-cuda.sh (CI builds them with FUSEDREG_REQUIRE_KERNELS=1)"
    )]
    fn every_kernel_exists_in_its_module() {
        let mut missing = Vec::new();
        for k in Kernel::ALL {
            match MODULES.iter().find(|m| m.stem == k.module()) {
                None => missing.push(format!(
                    "{} (module tools/kernels/{}.cu not built)",
                    k.symbol(),
                    k.module()
                )),
                Some(m) if !m.entries.contains(&k.symbol()) => missing.push(format!(
                    "{} (not an entry of tools/kernels/{}.cu)",
                    k.symbol(),
                    k.module()
                )),
                Some(_) => {}
            }
        }
        assert!(
            missing.is_empty(),
            "kernels the tools launch but the modules lack: {missing:#?}"
        );
    }

    #[test]
    fn symbols_are_unique() {
        let mut names: Vec<_> = Kernel::ALL.iter().map(|k| k.symbol()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a kernel symbol is listed twice");
    }
}
