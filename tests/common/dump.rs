//! The emulator's dump files (written by `dump_case()` in `scripts/emu/cases/<op>.cpp`), read by
//! the `tests/*_emu.rs` tests: a little-endian reader and the bit-for-bit element comparison.

use fusedreg::Dtype;

/// Reads a dump front to back: `o` is the next byte of `b`.
pub struct Rd<'a> {
    pub b: &'a [u8],
    pub o: usize,
}

impl Rd<'_> {
    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        let v = u64::from_le_bytes(self.b[self.o..self.o + 8].try_into().unwrap());
        self.o += 8;
        v
    }

    /// The next `n` elements of `T`.
    pub fn arr<T: bytemuck::Pod>(&mut self, n: usize) -> Vec<T> {
        let sz = std::mem::size_of::<T>() * n;
        let mut v = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&self.b[self.o..self.o + sz]);
        self.o += sz;
        v
    }
}

/// Whether two elements differ bit for bit, any NaN equal to any NaN (the GPU's are canonical).
pub fn differ<T: Dtype>(got: &T, want: &T) -> bool {
    bytemuck::bytes_of(got) != bytemuck::bytes_of(want)
        && !(got.to_f32().is_nan() && want.to_f32().is_nan())
}

/// How many elements of `got` (the emulator's) differ from `want` (the CPU reference's) by
/// [`differ`]; the first few and the count are printed under `what`.
#[allow(dead_code)] // not every `*_emu.rs` that includes this file compares whole buffers
pub fn mismatches<T: Dtype>(what: &str, got: &[T], want: &[T]) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: emulated and CPU lengths");
    let mut bad = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if differ(g, w) {
            if bad < 4 {
                eprintln!("  {what}[{i}] emu {:e} cpu {:e}", g.to_f32(), w.to_f32());
            }
            bad += 1;
        }
    }
    if bad > 0 {
        eprintln!("  {what}: {bad} elements differ");
    }
    bad
}

/// The dump files in `dir` whose name starts with `prefix` and ends in `.bin`, sorted (the
/// emulator's case order).
pub fn dump_files(dir: &str, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "bin")
                && p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(prefix))
        })
        .collect();
    files.sort();
    files
}

/// Reads every dump of [`dump_files`]`(dir, prefix)` in order and hands it to `check(name,
/// reader)`, which reads one case; the case must end where the dump does (no trailing bytes).
#[allow(dead_code)] // not every `*_emu.rs` that includes this file reads its dumps this way
pub fn for_each_dump(dir: &str, prefix: &str, mut check: impl FnMut(&str, &mut Rd)) {
    for f in &dump_files(dir, prefix) {
        let b = std::fs::read(f).unwrap();
        let mut r = Rd { b: &b, o: 0 };
        let name = f.display().to_string();
        check(&name, &mut r);
        assert_eq!(r.o, b.len(), "{name}: trailing bytes");
    }
}
