//! The kernels the Rust side can launch: each op lists its own, at the top of its
//! `src/<op>/gpu.rs`, with [`kernel_list!`](crate::kernel_list), one line per symbol family as
//! the `.cu` generates them with one macro per dtype family:
//!
//! ```text
//! crate::kernel_list! {
//!     "<stem>" => {
//!         [_ Single] = "symbol",                              // one symbol, no dtype
//!         [f32 A, f16 B, bf16 C] = "prefix_" [, "_suffix"],    // prefix_f32_suffix, prefix_f16_suffix, ...
//!         [f32 A, f16 B, bf16 C] = "prefix_" => FAM,           // the same, and `const FAM: PerDtype<Kernel>`
//!         [f16 B, bf16 C] = "prefix_", "_suffix" => FAM,       // the same, and `const FAM: [Kernel; 2]`
//!     }
//! }
//! ```
//!
//! Each line adds constants of [`Kernel`] (`Kernel::A`, ...), so call sites name a kernel the
//! same way wherever its op lists it. build.rs registers the list of every `kernels/<stem>.cu`
//! (`crate::<stem>::gpu::KERNELS`, in [`LISTS`]): the lists, in stem order, make the library's
//! table ([`TABLE`]), and a kernel's constant is its fixed index there, the loader's cache slot
//! (no lookup at launch). A `.cu` without a list, or a list without its `.cu`, fails to compile.
//!
//! The symbols are compile-time strings (`concat!`), never assembled at run time, and a unit
//! test checks every one of them against the entry points build.rs found in the compiled modules,
//! so a typo fails CI instead of a user's first launch.

use crate::dtype::PerDtype;

crate::kernel_list! {
    @type
    /// A launchable kernel: its fixed index in the library's [`TABLE`] and in the per-context
    /// function cache. Its values are the constants the ops' lists add (`Kernel::PhiloxFill`).
    pub(crate) struct Kernel
}

// `LISTS`: every `kernels/<stem>.cu`'s `(stem, crate::<stem>::gpu::KERNELS)`, by stem.
include!(concat!(env!("OUT_DIR"), "/kernel_lists.rs"));

/// The number of kernels in [`LISTS`].
const COUNT: usize = {
    let (mut n, mut i) = (0, 0);
    while i < LISTS.len() {
        n += LISTS[i].1.len();
        i += 1;
    }
    n
};

/// `(module, symbol)` of every kernel, in index order: the lists of [`LISTS`] one after another
/// (the loader's [`KernelTable`](super::modules::KernelTable) list).
pub(crate) static TABLE: [(&str, &str); COUNT] = {
    let mut table = [("", ""); COUNT];
    let (mut n, mut i) = (0, 0);
    while i < LISTS.len() {
        let mut j = 0;
        while j < LISTS[i].1.len() {
            table[n] = LISTS[i].1[j];
            n += 1;
            j += 1;
        }
        i += 1;
    }
    table
};

/// The index of the first kernel of `stem`'s list in [`TABLE`] (evaluated at compile time by
/// the list's constants: a list whose `.cu` does not exist fails to compile).
pub(crate) const fn base(stem: &str) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < LISTS.len() {
        if str_eq(LISTS[i].0, stem) {
            return n;
        }
        n += LISTS[i].1.len();
        i += 1;
    }
    panic!("a kernel list names a module that has no kernels/<stem>.cu")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// One list of kernels (the grammar in the [module docs](crate::runtime::kernels)).
///
/// In the library, at the top of an op's `gpu.rs`: one module (the op's stem), whose kernels
/// become constants of the library's `Kernel`. In a crate that embeds kernels of its own with
/// `build/cuda.rs` (the tools): a kernel type declared first, then every module of the crate, in
/// the order of its table; `KERNELS` is then that table's list.
#[doc(hidden)]
#[macro_export]
macro_rules! kernel_list {
    (@type $(#[$m:meta])* $vis:vis struct $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis struct $name(pub(crate) usize);

        impl $name {
            /// Its index in the crate's kernel table (and in the loader's function cache).
            #[allow(dead_code)]
            $vis const fn index(self) -> usize {
                self.0
            }
        }
    };
    (@list $ty:ty, $base:expr; $( $module:literal => {
        $( $(#[$fm:meta])* [$($dt:tt $id:ident),+ $(,)?] = $prefix:literal $(, $suffix:literal)?
            $(=> $fam:ident)?, )*
    } )*) => {
        $( $( $crate::kernel_list!(@family $ty; $(#[$fm])* [$($fam)?]; $($dt $id),+); )* )*

        /// This list's kernels, numbered from 0 in list order.
        #[derive(Clone, Copy)]
        enum KernelIndex { $( $( $( $id, )+ )* )* }

        impl KernelIndex {
            /// The `extern "C"` symbol in the module.
            const fn symbol(self) -> &'static str {
                match self {
                    $( $( $( KernelIndex::$id )|+ =>
                        $crate::kernel_list!(@symbol self; $($dt $id),+; $prefix $(, $suffix)?), )* )*
                }
            }

            /// The module (kernel file stem) that defines it.
            const fn module(self) -> &'static str {
                match self { $( $( $( KernelIndex::$id => $module, )+ )* )* }
            }
        }

        /// `(module, symbol)` of this list's kernels, in list order.
        pub(crate) const KERNELS: &[(&str, &str)] =
            &[ $( $( $( (KernelIndex::$id.module(), KernelIndex::$id.symbol()), )+ )* )* ];

        #[allow(non_upper_case_globals)]
        impl $ty {
            $( $( $(
                pub(crate) const $id: Self = Self($base + KernelIndex::$id as usize);
            )+ )* )*
        }
    };
    // The symbol of `$k`, one of a family line's kernels: `prefix + dtype + suffix` (no dtype
    // for `_`).
    (@symbol $k:expr; $($dt:tt $id:ident),+; $prefix:literal) => {
        $crate::kernel_list!(@symbol $k; $($dt $id),+; $prefix, "")
    };
    (@symbol $k:expr; $($dt:tt $id:ident),+; $prefix:literal, $suffix:literal) => {
        match $k {
            $( KernelIndex::$id => concat!($prefix, $crate::kernel_list!(@dtype $dt), $suffix), )+
            #[allow(unreachable_patterns)]
            _ => unreachable!(),
        }
    };
    // A family line ending in `=> NAME` also declares its kernels as a `PerDtype` constant
    // `NAME` of the module the list is in (its doc comments go with it); others declare nothing.
    (@family $ty:ty; $(#[$fm:meta])* []; $($rest:tt)*) => {};
    (@family $ty:ty; $(#[$fm:meta])* [$fam:ident]; f32 $a:ident, f16 $b:ident, bf16 $c:ident) => {
        $(#[$fm])*
        pub(crate) const $fam: $crate::dtype::PerDtype<$ty> =
            $crate::dtype::PerDtype { f32: <$ty>::$a, f16: <$ty>::$b, bf16: <$ty>::$c };
    };
    (@family $ty:ty; $(#[$fm:meta])* [$fam:ident]; f16 $b:ident, bf16 $c:ident) => {
        $(#[$fm])*
        pub(crate) const $fam: [$ty; 2] = [<$ty>::$b, <$ty>::$c];
    };
    (@dtype _) => {
        ""
    };
    (@dtype $dt:ident) => {
        stringify!($dt)
    };
    // The library: one op's list, at its place in the library's table.
    ($module:literal => { $($lines:tt)* }) => {
        $crate::kernel_list!(@list $crate::runtime::kernels::Kernel,
            $crate::runtime::kernels::base($module); $module => { $($lines)* });
    };
    // Another crate: its own kernel type, numbering one list that is its whole table.
    ($(#[$m:meta])* $vis:vis struct $name:ident; $($lists:tt)*) => {
        $crate::kernel_list!(@type $(#[$m])* $vis struct $name);
        $crate::kernel_list!(@list $name, 0; $($lists)*);
    };
}

/// Builds a [`PerDtype`] of kernels from the three constants named `<Base>F32`, `<Base>F16`,
/// `<Base>Bf16`.
#[allow(unused_macros)]
macro_rules! per_dtype {
    ($f32:ident, $f16:ident, $bf16:ident) => {
        $crate::dtype::PerDtype {
            f32: $crate::runtime::kernels::Kernel::$f32,
            f16: $crate::runtime::kernels::Kernel::$f16,
            bf16: $crate::runtime::kernels::Kernel::$bf16,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use per_dtype;

#[allow(dead_code)]
pub(crate) type KernelFamily = PerDtype<Kernel>;

#[cfg(test)]
mod tests {
    use super::{Kernel, LISTS, TABLE};

    crate::kernel_table_tests!(crate::runtime::modules::LIBRARY);

    /// The table is the ops' lists, by stem, one after another, and each list's constants index
    /// their own symbols in it (first, middle and last list; single and family lines).
    #[test]
    fn constants_index_their_symbols() {
        let stems: Vec<&str> = LISTS.iter().map(|&(stem, _)| stem).collect();
        let mut sorted = stems.clone();
        sorted.sort_unstable();
        assert_eq!(stems, sorted);
        assert!(stems.contains(&"dropout") && stems.contains(&"philox"));
        let flat: Vec<_> = LISTS
            .iter()
            .flat_map(|&(_, list)| list.iter().copied())
            .collect();
        assert_eq!(flat, TABLE);
        for (k, module, symbol) in [
            (Kernel::AdamwPf32Gf32, "adamw", "adamw_pf32_gf32"),
            (
                Kernel::AdamwPbf16Gf16Mbf16Nomaster,
                "adamw",
                "adamw_pbf16_gf16_mbf16_nomaster",
            ),
            (
                Kernel::CrossEntropySum,
                "cross_entropy",
                "cross_entropy_sum",
            ),
            (Kernel::DropoutFwdVecF32, "dropout", "dropout_fwd_vec_f32"),
            (
                Kernel::DropoutUnfusedAddBf16,
                "dropout",
                "dropout_unfused_add_bf16",
            ),
            (
                Kernel::DropoutAddNormFwdF16Sf32,
                "dropout_add_norm",
                "dropout_add_norm_fwd_f16_sf32",
            ),
            (Kernel::PhiloxMaskWords, "philox", "philox_mask_words"),
        ] {
            assert_eq!(TABLE[k.index()], (module, symbol), "{k:?}");
        }
    }
}
