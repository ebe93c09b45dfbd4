//! The embedded fatbins and their per-context cache.
//!
//! Modules are loaded lazily, once per CUDA context, and functions are cached by the fixed index
//! of their [`Kernel`](super::kernels::Kernel). Handles on the same context share one cache; it is dropped (and the
//! modules unloaded) when the last handle on that context goes away. The loader takes any
//! [`KernelTable`], so the tools crate's kernels load through it too.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::kernels::TABLE;
use crate::error::{Error, Result};

/// One compiled `.cu` file, as `build/cuda.rs` embeds it (the library's `kernels/<stem>.cu`, or
/// another crate's built with the same script, like the tools').
#[doc(hidden)]
pub struct EmbeddedModule {
    pub stem: &'static str,
    pub fatbin: &'static [u8],
    /// Entry points present for every compiled arch (read from the PTX by the build script).
    pub entries: &'static [&'static str],
}

/// One crate's launchable kernels: the modules its build script embedded and the module and
/// symbol of every kernel it launches, indexed by the kernel's number. The library has one
/// ([`LIBRARY`]); `fusedreg-tools` builds its own from `tools/kernels/` and loads it through the
/// same cache ([`Loaded`]), so there is one loader and one check of the list.
#[doc(hidden)]
pub struct KernelTable {
    /// The folder of the `.cu` files, for messages ("kernels", "tools/kernels").
    pub dir: &'static str,
    pub modules: &'static [EmbeddedModule],
    pub archs: &'static [u32],
    /// Why the build embedded no kernels (`None` when it did).
    pub not_built_reason: Option<&'static str>,
    /// `(module stem, symbol)` of every kernel, in the order of its number.
    pub kernels: &'static [(&'static str, &'static str)],
}

impl KernelTable {
    /// Every listed kernel whose module was not built or lacks the symbol (for some arch),
    /// described; empty when the list and the compiled modules agree.
    pub fn missing_entries(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for &(module, symbol) in self.kernels {
            match self.modules.iter().find(|m| m.stem == module) {
                None => missing.push(format!(
                    "{symbol} (module {}/{module}.cu not built)",
                    self.dir
                )),
                Some(m) if !m.entries.contains(&symbol) => missing.push(format!(
                    "{symbol} (not an entry of {}/{module}.cu)",
                    self.dir
                )),
                Some(_) => {}
            }
        }
        missing
    }

    /// Symbols listed more than once (empty when every kernel has its own).
    pub fn repeated_symbols(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.kernels.iter().map(|&(_, s)| s).collect();
        names.sort_unstable();
        let mut repeated: Vec<_> = names
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        repeated.dedup();
        repeated
    }
}

/// Unit tests of a crate's [`KernelTable`] (the library's and the tools'): every listed symbol
/// exists in the compiled modules, and none is listed twice. The crate's build script sets
/// `cfg(fusedreg_kernels_built)` when it compiled the modules.
#[doc(hidden)]
#[macro_export]
macro_rules! kernel_table_tests {
    ($table:expr) => {
        /// Every symbol the crate launches exists in the compiled module (for every arch).
        #[test]
        #[cfg_attr(
            not(fusedreg_kernels_built),
            ignore = "kernels not built: run scripts/install-cuda.sh (CI builds them with FUSEDREG_REQUIRE_KERNELS=1)"
        )]
        fn every_kernel_exists_in_its_module() {
            let missing = $table.missing_entries();
            assert!(
                missing.is_empty(),
                "kernels the Rust side launches but the modules lack: {missing:#?}"
            );
        }

        #[test]
        fn symbols_are_unique() {
            assert_eq!(
                $table.repeated_symbols(),
                Vec::<&str>::new(),
                "kernel symbols listed twice"
            );
        }
    };
}

include!(concat!(env!("OUT_DIR"), "/kernel_modules.rs"));

/// The library's kernels (`kernels/*.cu` and the ops' lists, see `runtime/kernels.rs`).
pub(crate) static LIBRARY: KernelTable = KernelTable {
    dir: "kernels",
    modules: MODULES,
    archs: ARCHS,
    not_built_reason: NOT_BUILT_REASON,
    kernels: &TABLE,
};

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

/// The loaded modules and functions of one [`KernelTable`] in one context.
#[doc(hidden)]
pub struct Loaded {
    table: &'static KernelTable,
    ctx: Arc<CudaContext>,
    modules: Vec<OnceLock<Arc<CudaModule>>>,
    functions: Vec<OnceLock<CudaFunction>>,
}

/// A cache's key: the addresses of its CUDA context and of its table.
type CacheKey = (usize, usize);

/// Every live cache, by key.
static REGISTRY: Mutex<Vec<(CacheKey, Weak<Loaded>)>> = Mutex::new(Vec::new());

impl Loaded {
    /// The cache of `table` for `ctx`, shared with every other user of the same table on the
    /// same CUDA context while one of them holds it.
    pub fn for_context(table: &'static KernelTable, ctx: &Arc<CudaContext>) -> Result<Arc<Loaded>> {
        if let Some(reason) = table.not_built_reason {
            return Err(Error::KernelsNotBuilt { reason });
        }
        let key: CacheKey = (ctx.cu_ctx() as usize, table as *const KernelTable as usize);
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
            table,
            ctx: ctx.clone(),
            modules: table.modules.iter().map(|_| OnceLock::new()).collect(),
            functions: table.kernels.iter().map(|_| OnceLock::new()).collect(),
        });
        reg.push((key, Arc::downgrade(&loaded)));
        Ok(loaded)
    }

    /// The symbol of kernel number `index` of the table.
    pub fn symbol(&self, index: usize) -> &'static str {
        self.table.kernels[index].1
    }

    /// Loads every kernel of the table now; returns how many.
    pub fn load_all(&self) -> Result<usize> {
        for index in 0..self.functions.len() {
            self.function(index)?;
        }
        Ok(self.functions.len())
    }

    /// The function of kernel number `index` of the table, loading its module on first use.
    pub fn function(&self, index: usize) -> Result<&CudaFunction> {
        let slot = &self.functions[index];
        if let Some(f) = slot.get() {
            return Ok(f);
        }
        let (module, symbol) = self.table.kernels[index];
        let load_err = |source| Error::ModuleLoad {
            module,
            symbol,
            archs: self
                .table
                .archs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join("/sm_"),
            source,
        };
        let (m, embedded) = self
            .table
            .modules
            .iter()
            .enumerate()
            .find(|(_, m)| m.stem == module)
            .ok_or(Error::KernelsNotBuilt {
                reason: "a kernel module is missing from the build",
            })?;
        let module = match self.modules[m].get() {
            Some(m) => m.clone(),
            None => {
                let loaded = self
                    .ctx
                    .load_module(Ptx::from_binary(embedded.fatbin.to_vec()))
                    .map_err(load_err)?;
                // Another thread may have won the race; either module is equally good.
                self.modules[m].get_or_init(|| loaded).clone()
            }
        };
        let f = module.load_function(symbol).map_err(load_err)?;
        Ok(slot.get_or_init(|| f))
    }
}
