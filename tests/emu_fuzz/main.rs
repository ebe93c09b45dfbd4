//! Differential fuzzing of every kernel file under host emulation against the Rust CPU reference
//! (issue 25): random shapes (0, 1, primes, sizes at and around every vector / group / tile /
//! slab / chunk boundary), random options, views starting at any element, random data with
//! infinities and NaNs of random sign and payload. Each stem's emulated kernels
//! (`scripts/emu/fuzz/<stem>.cpp`, built with g++ against `kernels/<stem>.cu` and the emulation
//! of `scripts/emu/shim.h`) must produce the CPU reference's bits (NaN compared as NaN), or stay
//! within the math mode's stated bound.
//!
//! Ignored by default (it needs g++ >= 11 and takes minutes); CI runs the fixed-seed budget:
//!
//! ```text
//! cargo test -p fusedreg --test emu_fuzz -- --ignored            # CI: fixed seed
//! FUSEDREG_FUZZ_SEED=random FUSEDREG_FUZZ_SCALE=20 \
//!     cargo test -p fusedreg --test emu_fuzz -- --ignored        # longer, by hand
//! FUSEDREG_FUZZ_REPLAY=<stem>:<seed> cargo test -p fusedreg \
//!     --test emu_fuzz -- --ignored --exact <stem>                          # one failing case
//! ```
//!
//! A failure prints each failing case (shape and options), the first differing elements of each
//! output, and the replay line. `FUSEDREG_FUZZ_SEED` (a number, `0x...`, or `random`) seeds the
//! whole run; `FUSEDREG_FUZZ_SCALE` multiplies every stem's case count; `FUSEDREG_FUZZ_TIMEOUT`
//! bounds one driver run (seconds); `CXX` names the compiler. Drivers are built once per content
//! into the target directory.
//!
//! Adding a kernel file: a driver `scripts/emu/fuzz/<stem>.cpp` (read the case's fields, launch,
//! write the outputs; see `fuzz.h`), a module here whose case type implements [`harness::Stem`]
//! (generate a case, write its fields in the driver's order, compare the outputs with the CPU
//! reference), and its line in `stems!`.

mod harness;

mod adamw;
mod bias_act_dropout;
mod cross_entropy;
mod dropout_add_norm;
mod dropping;
mod fmath;
mod global_norm;
mod philox;

/// `stem => case type, cases of the fixed-seed run in CI`: the test `stem` fuzzes
/// `kernels/<stem>.cu` through `scripts/emu/fuzz/<stem>.cpp`.
macro_rules! stems {
    ($($name:ident => $ty:ty, $cases:literal;)*) => {$(
        #[test]
        #[ignore = "needs g++ >= 11 and minutes: cargo test -p fusedreg --test emu_fuzz -- --ignored (CI runs it)"]
        fn $name() {
            harness::fuzz::<$ty>(stringify!($name), $cases);
        }
    )*};
}

stems! {
    philox => philox::Case, 60;
    adamw => adamw::Case, 40;
    fmath => fmath::Case, 60;
    global_norm => global_norm::Case, 40;
    cross_entropy => cross_entropy::Case, 60;
    bias_act_dropout => bias_act_dropout::Case, 60;
    dropout_add_norm => dropout_add_norm::Case, 50;
    dropout => dropping::Case, 120;
}
