//! The device generator, exposed for testing and diagnostics: fills host-visible results so the
//! tests can compare them with [`super::philox4x32_10`] and [`super::mask_word`] bit for bit.

use crate::error::{check_len, Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::Kernel;
use crate::runtime::Handle;

crate::kernel_list! {
    "philox" => {
        [_ PhiloxFill] = "philox_fill",
        [_ PhiloxMaskWords] = "philox_mask_words",
    }
}

device_params! {
    struct PhiloxFillParams(32) {
        counters: u64,
        keys: u64,
        out: u64,
        n: u64,
    }
}

device_params! {
    struct MaskWordsParams(40) {
        seed: u64,
        call: u64,
        start: u64,
        n: u64,
        out: u64,
    }
}

const OP: &str = "philox";
const BLOCK: u32 = 256;

/// Evaluates Philox4x32-10 on the device for each `(counters[i], keys[i])` pair.
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let out = fusedreg::philox::gpu::fill(&h, &[[0; 4]], &[[0; 2]])?;
/// assert_eq!(out[0], fusedreg::philox::philox4x32_10([0; 4], [0; 2]));
/// # Ok(()) }
/// ```
pub fn fill(handle: &Handle, counters: &[[u32; 4]], keys: &[[u32; 2]]) -> Result<Vec<[u32; 4]>> {
    check_len(OP, "keys", keys.len(), counters.len())?;
    let n = counters.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let s = handle.stream();
    let d_c = s
        .clone_htod(counters.as_flattened())
        .map_err(Error::driver(OP))?;
    let d_k = s
        .clone_htod(keys.as_flattened())
        .map_err(Error::driver(OP))?;
    let mut d_o = s.alloc_zeros::<u32>(4 * n).map_err(Error::driver(OP))?;
    {
        let (c, _g1) = handle.read_ptr(OP, "counters", &d_c)?;
        let (k, _g2) = handle.read_ptr(OP, "keys", &d_k)?;
        let (o, _g3) = handle.write_ptr(OP, "out", &mut d_o)?;
        let p = PhiloxFillParams {
            counters: c,
            keys: k,
            out: o,
            n: n as u64,
        };
        handle.launch_strided(Kernel::PhiloxFill, n as u64, BLOCK, &p)?;
    }
    let flat = handle.to_host(OP, &d_o)?;
    Ok(flat
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect())
}

/// The words [`super::mask_word`]`(seed, call, start + j)` for `j < n`, computed on the device.
/// A range running past index `2^64 - 1` is an [`Error::InvalidArgument`].
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let words = fusedreg::philox::gpu::mask_words(&h, 42, 7, 1000, 16)?;
/// assert_eq!(words[3], fusedreg::philox::mask_word(42, 7, 1003));
/// # Ok(()) }
/// ```
pub fn mask_words(handle: &Handle, seed: u64, call: u64, start: u64, n: usize) -> Result<Vec<u32>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // Indices past 2^64 - 1 do not exist: refused rather than wrapped to 0 on the device.
    if u64::try_from(n - 1)
        .ok()
        .and_then(|last| start.checked_add(last))
        .is_none()
    {
        return Err(Error::invalid(
            OP,
            format!("indices {start} + {n} run past 2^64 - 1"),
        ));
    }
    let s = handle.stream();
    let mut d_o = s.alloc_zeros::<u32>(n).map_err(Error::driver(OP))?;
    {
        let (o, _g) = handle.write_ptr(OP, "out", &mut d_o)?;
        let p = MaskWordsParams {
            seed,
            call,
            start,
            n: n as u64,
            out: o,
        };
        handle.launch_strided(Kernel::PhiloxMaskWords, n as u64, BLOCK, &p)?;
    }
    handle.to_host(OP, &d_o)
}
