//! The embedded fatbins and their per-context cache.
//!
//! Modules are loaded lazily, once per CUDA context, and functions are cached by the fixed index
//! of their [`Kernel`]. Handles on the same context share one cache; it is dropped (and the
//! modules unloaded) when the last handle on that context goes away.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::kernels::Kernel;
use crate::error::{Error, Result};

/// One compiled `kernels/<stem>.cu`.
pub(crate) struct EmbeddedModule {
    pub stem: &'static str,
    pub fatbin: &'static [u8],
    /// Entry points present for every compiled arch (read from the PTX by build.rs).
    #[cfg_attr(not(test), allow(dead_code))]
    pub entries: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/kernel_modules.rs"));

/// Whether this build embeds the CUDA kernels.
///
/// # Examples
///
/// ```
/// // Built without nvcc, the crate embeds no kernels and reports no archs and no compiler.
/// assert_eq!(fusedreg::kernels_built(), !fusedreg::compiled_archs().is_empty());
/// if !fusedreg::kernels_built() {
///     assert!(fusedreg::Handle::new(0).is_err());
/// }
/// ```
pub fn kernels_built() -> bool {
    NOT_BUILT_REASON.is_none()
}

/// The SASS archs the kernels were compiled for (PTX is embedded for the last one).
///
/// # Examples
///
/// ```
/// let archs: Vec<String> = fusedreg::compiled_archs().iter().map(|a| format!("sm_{a}")).collect();
/// println!("kernels for {}", archs.join("/")); // "sm_80/sm_90" by default
/// assert!(fusedreg::compiled_archs().iter().all(|&a| a >= 75)); // CUDA 13's oldest
/// ```
pub fn compiled_archs() -> &'static [u32] {
    ARCHS
}

/// The nvcc release line that compiled the kernels, or "" when they were not built.
///
/// # Examples
///
/// ```
/// let v = fusedreg::nvcc_version(); // e.g. "Cuda compilation tools, release 13.0, V13.0.88"
/// assert_eq!(v.is_empty(), !fusedreg::kernels_built());
/// ```
pub fn nvcc_version() -> &'static str {
    NVCC_VERSION
}

/// Loaded modules and functions of one context.
pub(crate) struct Loaded {
    ctx: Arc<CudaContext>,
    modules: Vec<OnceLock<Arc<CudaModule>>>,
    functions: Vec<OnceLock<CudaFunction>>,
}

static REGISTRY: Mutex<Vec<(usize, Weak<Loaded>)>> = Mutex::new(Vec::new());

impl Loaded {
    /// The cache for `ctx`, shared with every other handle on the same CUDA context.
    pub(crate) fn for_context(ctx: &Arc<CudaContext>) -> Result<Arc<Loaded>> {
        if let Some(reason) = NOT_BUILT_REASON {
            return Err(Error::KernelsNotBuilt { reason });
        }
        let key = ctx.cu_ctx() as usize;
        let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        reg.retain(|(_, w)| w.strong_count() > 0);
        if let Some(l) = reg
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(l);
        }
        let loaded = Arc::new(Loaded {
            ctx: ctx.clone(),
            modules: MODULES.iter().map(|_| OnceLock::new()).collect(),
            functions: Kernel::ALL.iter().map(|_| OnceLock::new()).collect(),
        });
        reg.push((key, Arc::downgrade(&loaded)));
        Ok(loaded)
    }

    /// The function for `k`, loading its module on first use.
    pub(crate) fn function(&self, k: Kernel) -> Result<&CudaFunction> {
        let slot = &self.functions[k as usize];
        if let Some(f) = slot.get() {
            return Ok(f);
        }
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
        let (index, embedded) = MODULES
            .iter()
            .enumerate()
            .find(|(_, m)| m.stem == k.module())
            .ok_or(Error::KernelsNotBuilt {
                reason: "a kernel module is missing from the build",
            })?;
        let module = match self.modules[index].get() {
            Some(m) => m.clone(),
            None => {
                let m = self
                    .ctx
                    .load_module(Ptx::from_binary(embedded.fatbin.to_vec()))
                    .map_err(load_err)?;
                // Another thread may have won the race; either module is equally good.
                self.modules[index].get_or_init(|| m).clone()
            }
        };
        let f = module.load_function(k.symbol()).map_err(load_err)?;
        Ok(slot.get_or_init(|| f))
    }
}
