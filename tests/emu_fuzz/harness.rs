//! The mechanism shared by every stem: the case generator's random source and value/size
//! generators, the wire format of `scripts/emu/fuzz/fuzz.h`, building and running a driver, the
//! bit-for-bit comparison, and the run loop with its seed, budget and replay command.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fusedreg::Dtype;

// ------------------------------------------------------------------------------------------
// Random source and generators
// ------------------------------------------------------------------------------------------

/// SplitMix64: tiny, and its stream is fixed forever, so a printed seed replays the same case on
/// any machine and with any version of `rand`.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.u64()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    pub fn bool(&mut self) -> bool {
        self.u64() & 1 == 1
    }
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
    /// Uniform f32 in `[lo, hi)` from 24 random bits.
    pub fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.u64() >> 40) as f32 * (1.0 / 16_777_216.0))
    }
}

const PRIMES: [usize; 12] = [2, 3, 5, 7, 11, 13, 31, 37, 61, 127, 257, 1021];

/// A size in `0..=max` that hits the interesting ones often: 0, 1, small primes, and sizes at
/// and around multiples of each boundary (vector widths, groups, warps, tiles, slabs, chunks).
pub fn size(g: &mut Rng, boundaries: &[usize], max: usize) -> usize {
    let s = match g.below(8) {
        0 => g.pick(&[0, 1]),
        1 => g.pick(&PRIMES),
        2..=5 if !boundaries.is_empty() => {
            let b = g.pick(boundaries);
            let k = g.range(1, 3) as usize;
            (b * k).saturating_add_signed(g.range(0, 4) as isize - 2)
        }
        _ => g.range(2, max.max(2) as u64) as usize,
    };
    s.min(max)
}

/// An element offset for a view: 0 half of the time (the vector paths), else 1..=max.
pub fn offset(g: &mut Rng, max: u64) -> u64 {
    if g.bool() {
        0
    } else {
        g.range(1, max.max(1))
    }
}

/// How often the generators put special values into data.
#[derive(Clone, Copy, Debug)]
pub struct Specials(pub u64);

impl Specials {
    /// None, 1 in 64, 1 in 8, 1 in 2 (a per-case choice).
    pub fn any(g: &mut Rng) -> Self {
        Specials(g.pick(&[0, 4, 32, 128]))
    }
    pub const NONE: Specials = Specials(0);
}

/// A NaN of `T` with a random sign and payload.
pub fn nan<T: Dtype>(g: &mut Rng) -> T {
    let r = g.u32();
    let bits = match T::KIND.size() {
        4 => 0x7f80_0000 | (r & 0x807f_ffff) | 1,
        _ if T::KIND == fusedreg::DtypeKind::F16 => 0x7c00 | (r & 0x83ff) | 1,
        _ => 0x7f80 | (r & 0x807f) | 1,
    };
    from_bits(bits)
}

/// `T` from the low bits of `bits`.
pub fn from_bits<T: Dtype>(bits: u32) -> T {
    bytemuck::pod_read_unaligned(&bits.to_le_bytes()[..T::KIND.size()])
}

/// The bits of `x`, widened.
pub fn to_bits<T: Dtype>(x: T) -> u32 {
    let mut b = [0u8; 4];
    b[..T::KIND.size()].copy_from_slice(bytemuck::bytes_of(&x));
    u32::from_le_bytes(b)
}

/// One value: mostly moderate (`[-scale, scale)`), with `sp.0 / 256` of specials: signed zeros,
/// infinities, NaNs of random sign and payload, subnormals, the largest finite values, tiny ones.
pub fn value<T: Dtype>(g: &mut Rng, scale: f32, sp: Specials) -> T {
    if g.below(256) < sp.0 {
        return match g.below(8) {
            0 => T::from_f32_rn(g.pick(&[0.0, -0.0])),
            1 => T::from_f32_rn(g.pick(&[f32::INFINITY, f32::NEG_INFINITY])),
            2 | 3 => nan(g),
            4 => {
                // A subnormal of T, either sign.
                let (m, s) = match T::KIND.size() {
                    4 => (0x7f_ffff, 31),
                    _ if T::KIND == fusedreg::DtypeKind::F16 => (0x3ff, 15),
                    _ => (0x7f, 15),
                };
                from_bits((g.u32() & m).max(1) | (g.u32() & 1) << s)
            }
            5 => {
                let big: f32 = match T::KIND {
                    fusedreg::DtypeKind::F16 => 65504.0,
                    _ => 3.0e38,
                };
                T::from_f32_rn(if g.bool() { big } else { -big })
            }
            6 => T::from_f32_rn(g.f32_in(-1e4, 1e4)),
            _ => T::from_f32_rn(g.f32_in(-1e-6, 1e-6)),
        };
    }
    T::from_f32_rn(g.f32_in(-scale, scale))
}

/// Input data in a case: prints as its length only.
#[derive(Clone)]
pub struct Data<T>(pub Vec<T>);

impl<T> Debug for Data<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} elements]", self.0.len())
    }
}

impl<T> std::ops::Deref for Data<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

// ------------------------------------------------------------------------------------------
// Wire format (scripts/emu/fuzz/fuzz.h)
// ------------------------------------------------------------------------------------------

#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn item(&mut self, name: &str, payload: &[u8]) {
        assert!(name.len() < 256);
        self.buf.push(name.len() as u8);
        self.buf.extend_from_slice(name.as_bytes());
        self.buf
            .extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(payload);
    }
    pub fn u64(&mut self, name: &str, v: u64) {
        self.item(name, &v.to_le_bytes());
    }
    pub fn flag(&mut self, name: &str, v: bool) {
        self.u64(name, u64::from(v));
    }
    pub fn f32(&mut self, name: &str, v: f32) {
        self.item(name, &v.to_le_bytes());
    }
    /// An array the driver places at element `off` of an aligned allocation.
    pub fn view<T: bytemuck::Pod>(&mut self, name: &str, data: &[T], off: u64) {
        let mut p = off.to_le_bytes().to_vec();
        p.extend_from_slice(bytemuck::cast_slice(data));
        self.item(name, &p);
    }
    /// One byte (0 or 1) per flag, as a [`Writer::view`] at element 0 (the skip lists).
    pub fn flags(&mut self, name: &str, flags: &[bool]) {
        let bytes: Vec<u8> = flags.iter().map(|&f| u8::from(f)).collect();
        self.view(name, &bytes, 0);
    }
}

pub struct Reader<'a> {
    b: &'a [u8],
    o: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader { b, o: 0 }
    }
    fn at_end(&self) -> bool {
        self.o >= self.b.len()
    }
    /// The next item, which must be `name`.
    pub fn item(&mut self, name: &str) -> Result<&'a [u8], String> {
        let b = self.b;
        let bad = |what: &str| Err(format!("driver output: {what} (expected item '{name}')"));
        if self.o >= b.len() {
            return bad("ended early");
        }
        let len = b[self.o] as usize;
        let head = self.o + 1 + len + 8;
        if head > b.len() {
            return bad("truncated item header");
        }
        let got = String::from_utf8_lossy(&b[self.o + 1..self.o + 1 + len]).into_owned();
        let n = u64::from_le_bytes(b[head - 8..head].try_into().unwrap()) as usize;
        if head + n > b.len() {
            return bad("truncated payload");
        }
        if got != name {
            return bad(&format!("item '{got}'"));
        }
        self.o = head + n;
        Ok(&b[head..head + n])
    }
    /// Skips the rest of a case, through its "end" item.
    pub fn skip_to_end(&mut self) -> Result<(), String> {
        loop {
            let b = self.b;
            if self.o >= b.len() {
                return Err("driver output: ended inside a case".into());
            }
            let len = b[self.o] as usize;
            let head = self.o + 1 + len + 8;
            if head > b.len() {
                return Err("driver output: truncated item header".into());
            }
            let name = &b[self.o + 1..self.o + 1 + len];
            let n = u64::from_le_bytes(b[head - 8..head].try_into().unwrap()) as usize;
            self.o = head.saturating_add(n);
            if name == b"end" {
                return Ok(());
            }
        }
    }

    pub fn u64(&mut self, name: &str) -> Result<u64, String> {
        let p = self.item(name)?;
        p.try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| format!("'{name}' has {} bytes", p.len()))
    }
    pub fn f32(&mut self, name: &str) -> Result<f32, String> {
        let p = self.item(name)?;
        p.try_into()
            .map(f32::from_le_bytes)
            .map_err(|_| format!("'{name}' has {} bytes", p.len()))
    }
    /// An array of exactly `n` elements.
    pub fn vec<T: bytemuck::Pod>(&mut self, name: &str, n: usize) -> Result<Vec<T>, String> {
        let p = self.item(name)?;
        let size = std::mem::size_of::<T>();
        if p.len() != n * size {
            return Err(format!(
                "driver output '{name}' has {} bytes, expected {n} elements of {size}",
                p.len()
            ));
        }
        Ok(p.chunks_exact(size)
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }
}

// ------------------------------------------------------------------------------------------
// Comparison
// ------------------------------------------------------------------------------------------

/// The differences found in one case, output by output.
#[derive(Default)]
pub struct Diffs(Vec<String>);

impl Diffs {
    /// Element-wise: the same bits, or both NaN (the device's NaNs are canonical, the CPU's keep
    /// a payload).
    pub fn bits<T: Dtype>(&mut self, what: &str, emu: &[T], cpu: &[T]) {
        self.bits_within(what, emu, cpu, |_, _| false)
    }

    /// [`Diffs::bits`], also accepting pairs for which `close(emu, cpu)` holds (a math mode's
    /// stated bound).
    pub fn bits_within<T: Dtype>(
        &mut self,
        what: &str,
        emu: &[T],
        cpu: &[T],
        close: impl Fn(f32, f32) -> bool,
    ) {
        if self.lengths_differ(what, emu.len(), cpu.len()) {
            return;
        }
        let mut bad = 0usize;
        for (i, (&e, &c)) in emu.iter().zip(cpu).enumerate() {
            let (ef, cf) = (e.to_f32(), c.to_f32());
            if to_bits(e) == to_bits(c) || (ef.is_nan() && cf.is_nan()) || close(ef, cf) {
                continue;
            }
            if bad < 4 {
                self.0.push(format!(
                    "{what}[{i}]: emu {ef:e} ({:#x}), cpu {cf:e} ({:#x})",
                    to_bits(e),
                    to_bits(c)
                ));
            }
            bad += 1;
        }
        if bad > 4 {
            self.0
                .push(format!("{what}: {bad} of {} elements differ", emu.len()));
        }
    }

    /// Records a length mismatch; true when the lengths differ (nothing more to compare).
    fn lengths_differ(&mut self, what: &str, emu: usize, cpu: usize) -> bool {
        if emu != cpu {
            self.0.push(format!(
                "{what}: {emu} elements from the driver, {cpu} from the CPU"
            ));
        }
        emu != cpu
    }

    /// f64 outputs: the same bits, or both NaN.
    pub fn f64s(&mut self, what: &str, emu: &[f64], cpu: &[f64]) {
        let e: Vec<F64> = emu.iter().map(|&x| F64(x)).collect();
        let c: Vec<F64> = cpu.iter().map(|&x| F64(x)).collect();
        self.eq(what, &e, &c);
    }

    /// Exact equality of integer outputs.
    pub fn eq<T: PartialEq + Debug>(&mut self, what: &str, emu: &[T], cpu: &[T]) {
        if self.lengths_differ(what, emu.len(), cpu.len()) {
            return;
        }
        let bad: Vec<usize> = (0..emu.len()).filter(|&i| emu[i] != cpu[i]).collect();
        for &i in bad.iter().take(4) {
            self.0
                .push(format!("{what}[{i}]: emu {:?}, cpu {:?}", emu[i], cpu[i]));
        }
        if bad.len() > 4 {
            self.0
                .push(format!("{what}: {} of {} differ", bad.len(), emu.len()));
        }
    }

    pub fn note(&mut self, what: impl Into<String>) {
        self.0.push(what.into());
    }

    pub fn into_result(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0.join("\n    "))
        }
    }
}

/// An f64 compared by its bits (NaN equal to NaN) and printed with them.
#[derive(Clone, Copy)]
pub struct F64(pub f64);

impl PartialEq for F64 {
    fn eq(&self, o: &F64) -> bool {
        self.0.to_bits() == o.0.to_bits() || (self.0.is_nan() && o.0.is_nan())
    }
}

impl Debug for F64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:e} ({:#x})", self.0, self.0.to_bits())
    }
}

// ------------------------------------------------------------------------------------------
// A stem, and the run loop
// ------------------------------------------------------------------------------------------

/// What a kernel file's fuzzing needs, implemented by its case type: a case generator, the
/// case's fields in the driver's order, and the check of the driver's outputs against the CPU
/// reference.
pub trait Stem: Debug + Sized {
    fn generate(g: &mut Rng) -> Self;
    fn write(c: &Self, w: &mut Writer);
    /// Reads the driver's outputs of `c` and compares them with the CPU reference.
    fn check(c: &Self, r: &mut Reader) -> Result<(), String>;
}

/// The default seed of CI's run (any fixed value; changing it changes the cases).
const CI_SEED: u64 = 0x2512_0600_0000_0025;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

fn parse_u64(s: &str) -> u64 {
    let s = s.trim();
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

/// The seed of case `k` of a run seeded `seed`, for `stem` (stems do not share cases).
fn case_seed(seed: u64, stem: &str, k: usize) -> u64 {
    let h = stem.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut r = Rng::new(seed ^ h);
    for _ in 0..=k % 4 {
        r.u64();
    }
    r.u64() ^ (k as u64).wrapping_mul(0xd6e8_feb8_6659_fd93)
}

/// Generates, runs and checks `cases` cases (scaled by `FUSEDREG_FUZZ_SCALE`) of the kernel stem
/// `name` (`kernels/<name>.cu`, `scripts/emu/fuzz/<name>.cpp`), whose case type is `S`; panics
/// with every failing case's seed and the command that replays it.
pub fn fuzz<S: Stem>(name: &str, cases: usize) {
    let replay = env("FUSEDREG_FUZZ_REPLAY");
    let seeds: Vec<u64> = match replay.as_deref().and_then(|r| r.split_once(':')) {
        Some((stem, s)) if stem == name => vec![parse_u64(s)],
        Some(_) => {
            eprintln!(
                "emu_fuzz {}: skipped (FUSEDREG_FUZZ_REPLAY names another stem)",
                name
            );
            return;
        }
        None => {
            let seed = match env("FUSEDREG_FUZZ_SEED").as_deref() {
                None => CI_SEED,
                Some("random") => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64),
                Some(s) => parse_u64(s),
            };
            let scale = env("FUSEDREG_FUZZ_SCALE").map_or(1.0, |s| {
                s.parse::<f64>()
                    .unwrap_or_else(|_| panic!("FUSEDREG_FUZZ_SCALE={s:?}"))
            });
            let n = ((cases as f64 * scale).round() as usize).max(1);
            eprintln!(
                "emu_fuzz {}: {n} cases from FUSEDREG_FUZZ_SEED={seed:#x}",
                name
            );
            (0..n).map(|k| case_seed(seed, name, k)).collect()
        }
    };
    let cases: Vec<S> = seeds
        .iter()
        .map(|&s| S::generate(&mut Rng::new(s)))
        .collect();
    let mut w = Writer::default();
    for (k, c) in cases.iter().enumerate() {
        w.u64("case", k as u64);
        S::write(c, &mut w);
        w.item("end", &[]);
    }
    let exe = build_driver(name);
    let dir = scratch_dir(name);
    let (inp, outp) = (dir.join("cases.bin"), dir.join("outputs.bin"));
    std::fs::write(&inp, &w.buf).expect("writing the cases");
    let t0 = Instant::now();
    let status = run_driver(&exe, &inp, &outp);
    let out = std::fs::read(&outp).unwrap_or_default();
    let mut r = Reader::new(&out);
    let mut failures = Vec::new();
    let mut done = 0;
    let mut stopped_in = None;
    for (k, c) in cases.iter().enumerate() {
        if r.at_end() {
            stopped_in = Some(k);
            break;
        }
        let head = r.u64("case").and_then(|i| {
            (i == k as u64)
                .then_some(())
                .ok_or(format!("driver output of case {i}, expected {k}"))
        });
        if let Err(e) = head {
            failures.push(report(name, k, seeds[k], c, &e));
            break; // the stream is out of step: later cases cannot be read
        }
        let res = S::check(c, &mut r);
        // Whatever the check read, continue after this case's "end"; without one, the driver
        // died inside this case.
        if r.skip_to_end().is_err() {
            stopped_in = Some(k);
            break;
        }
        if let Err(e) = res {
            failures.push(report(name, k, seeds[k], c, &e));
        }
        done += 1;
    }
    if let Some(k) = stopped_in {
        let e = format!("the driver stopped in this case ({status})");
        failures.push(report(name, k, seeds[k], &cases[k], &e));
    } else if done == cases.len() && !status.contains("exit status: 0") {
        failures.push(format!(
            "  the driver ended with {status} after the last case"
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "emu_fuzz {}: {} cases checked in {:.1} s",
        name,
        done,
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from the CPU reference (the first {} below):\n{}",
        failures.len(),
        cases.len(),
        failures.len().min(5),
        failures[..failures.len().min(5)].join("\n")
    );
}

fn report(name: &str, k: usize, seed: u64, c: &impl Debug, what: &str) -> String {
    let mut dbg = format!("{c:?}");
    if dbg.len() > 1500 {
        dbg.truncate(1500);
        dbg.push_str(" ...");
    }
    format!(
        "  case {k} (seed {seed:#x}): {dbg}\n    {what}\n  replay: FUSEDREG_FUZZ_REPLAY={}:{seed:#x} \
         cargo test -p fusedreg --test emu_fuzz -- --ignored --exact {}",
        name,
        name
    )
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch_dir(stem: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("emu-fuzz")
        .join(format!("run-{stem}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("creating the scratch directory");
    d
}

/// Every file a driver's build reads: the driver, the emulation, every kernel header.
fn build_inputs(stem: &str) -> Vec<PathBuf> {
    let r = root();
    let mut files = vec![
        r.join(format!("scripts/emu/fuzz/{stem}.cpp")),
        r.join(format!("kernels/{stem}.cu")),
    ];
    for dir in [
        "scripts/emu",
        "scripts/emu/fuzz",
        "scripts/emu/include",
        "kernels/common",
    ] {
        let mut more: Vec<PathBuf> = std::fs::read_dir(r.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "h" || x == "cuh"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
}

/// Builds the driver of `stem` (once per content: the executable is named after a hash of every
/// input, so an edited kernel or driver is rebuilt and an unchanged one is not).
fn build_driver(stem: &str) -> PathBuf {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for f in build_inputs(stem) {
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for b in f.to_string_lossy().bytes().chain(bytes) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("emu-fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join(format!("{stem}-{h:016x}"));
    if exe.exists() {
        return exe;
    }
    let r = root();
    let cxx = env("CXX").unwrap_or_else(|| "g++".into());
    let tmp = dir.join(format!("{stem}-{h:016x}.{}.tmp", std::process::id()));
    let t0 = Instant::now();
    let out = Command::new(&cxx)
        .current_dir(r)
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-Iscripts/emu",
            "-Iscripts/emu/include",
            "-Ikernels",
        ])
        .arg(format!(
            "-DKFILE=\"{}\"",
            r.join(format!("kernels/{stem}.cu")).display()
        ))
        .args(["-include", "scripts/emu/shim.h", "-o"])
        .arg(&tmp)
        .arg(format!("scripts/emu/fuzz/{stem}.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("running {cxx} (g++ >= 11 builds the emulation; set CXX): {e}"));
    assert!(
        out.status.success(),
        "building the {stem} fuzz driver failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, &exe).unwrap();
    eprintln!(
        "emu_fuzz {stem}: built the driver in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    exe
}

/// Runs a driver under a time limit (`FUSEDREG_FUZZ_TIMEOUT` seconds, default 1200: a warp-level
/// call that a lane skips deadlocks the emulation). Returns how it ended, in words.
fn run_driver(exe: &Path, inp: &Path, outp: &Path) -> String {
    let limit = Duration::from_secs(env("FUSEDREG_FUZZ_TIMEOUT").map_or(1200, |s| parse_u64(&s)));
    // The driver's own messages (a misread field, a bad launch) go straight to stderr.
    let mut child = Command::new(exe)
        .arg(inp)
        .arg(outp)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return format!("{st}");
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return format!(
                "killed after {} s: hung (FUSEDREG_FUZZ_TIMEOUT)",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------------------------------
// Dtype-erased data: cases store element bits, checks convert to the dtype at hand
// ------------------------------------------------------------------------------------------

/// `$body` with `$t` bound to the element type of `$kind`.
#[macro_export]
macro_rules! by_dtype {
    ($kind:expr, $t:ident => $body:expr) => {
        match $kind {
            fusedreg::DtypeKind::F32 => {
                type $t = f32;
                $body
            }
            fusedreg::DtypeKind::F16 => {
                type $t = half::f16;
                $body
            }
            fusedreg::DtypeKind::Bf16 => {
                type $t = half::bf16;
                $body
            }
        }
    };
}

pub const DTYPES: [fusedreg::DtypeKind; 3] = [
    fusedreg::DtypeKind::F32,
    fusedreg::DtypeKind::F16,
    fusedreg::DtypeKind::Bf16,
];

/// The driver's dtype code: 0 f32, 1 f16, 2 bf16.
pub fn dtype_code(k: fusedreg::DtypeKind) -> u64 {
    DTYPES.iter().position(|&d| d == k).unwrap() as u64
}

/// `n` random elements of dtype `k` (see [`value`]), as bits.
pub fn value_bits(
    g: &mut Rng,
    k: fusedreg::DtypeKind,
    n: usize,
    scale: f32,
    sp: Specials,
) -> Data<u32> {
    Data(by_dtype!(k, T => (0..n).map(|_| to_bits(value::<T>(g, scale, sp))).collect()))
}

/// Bits as elements of `T`.
pub fn typed<T: Dtype>(bits: &[u32]) -> Vec<T> {
    bits.iter().map(|&b| from_bits(b)).collect()
}

impl Writer {
    /// A drop path's fields as the dropping kernels take them (`path_call`, `path_threshold`,
    /// `path_scale`, `rows_per_sample`); zeros and one row per sample without one.
    pub fn drop_path(&mut self, path: Option<fusedreg::dropping::DropPath>) {
        self.u64("path_call", path.map_or(0, |p| p.call()));
        self.u64("path_threshold", path.map_or(0, |p| p.rate().threshold()));
        self.f32("path_scale", path.map_or(0.0, |p| p.rate().scale()));
        self.u64(
            "rows_per_sample",
            path.map_or(1, |p| p.rows_per_sample() as u64),
        );
    }

    /// Elements of dtype `k` given as bits, placed at element `off`.
    pub fn view_bits(&mut self, name: &str, k: fusedreg::DtypeKind, bits: &[u32], off: u64) {
        by_dtype!(k, T => self.view(name, &typed::<T>(bits), off))
    }
}

/// The drop path `(p_path, call, rows per sample)` of a generated case.
pub fn drop_path((p, call, rows_per_sample): (f64, u64, usize)) -> fusedreg::dropping::DropPath {
    fusedreg::dropping::DropPath::new(p, call)
        .and_then(|d| d.per_sample(rows_per_sample))
        .expect("a valid path")
}

/// Puts 1 to 3 special values (NaN of random sign and payload, +inf, -inf) at the positions a
/// kernel distinguishes: in a random row of `row` elements, its first or last element, or the
/// first or last element of a span of one of `boundaries` (a vector, a group, a slot, a warp's
/// share, a tile).
pub fn plant(
    g: &mut Rng,
    k: fusedreg::DtypeKind,
    bits: &mut [u32],
    row: usize,
    boundaries: &[usize],
) {
    if bits.is_empty() || row == 0 {
        return;
    }
    for _ in 0..g.range(1, 3) {
        let rows = bits.len() / row;
        let r = g.below(rows.max(1) as u64) as usize;
        let col = match g.below(4) {
            0 => 0,
            1 => row - 1,
            _ if !boundaries.is_empty() => {
                let b = g.pick(boundaries).max(1);
                let spans = row.div_ceil(b).max(1);
                let s = g.below(spans as u64) as usize * b;
                (if g.bool() { s } else { s + b - 1 }).min(row - 1)
            }
            _ => g.below(row as u64) as usize,
        };
        let i = (r * row + col).min(bits.len() - 1);
        bits[i] = by_dtype!(k, T => match g.below(3) {
            0 => to_bits(nan::<T>(g)),
            1 => to_bits(T::from_f32_rn(f32::INFINITY)),
            _ => to_bits(T::from_f32_rn(f32::NEG_INFINITY)),
        });
    }
}
