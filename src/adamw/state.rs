//! The optimizer-state byte format (version 2; version 1 is still read), shared by the GPU
//! optimizer and the CPU reference.
//!
//! ```text
//! offset  size       field
//! 0       8          magic "FRADAMW\0"
//! 8       4          version (2; 1 for files written before the lean state options)
//! 12      1          param dtype: 0 f32, 1 f16, 2 bf16
//! 13      1          1 when master weights follow, else 0 (always 0 for f32 params)
//! 14      1          moment dtype: 0 f32, 2 bf16 (version 1: reserved, 0 = f32)
//! 15      1          reserved, 0
//! 16      8          tensor count T
//! 24      8 T        element count of each tensor
//! ..      4 T        step count of each tensor (u32)
//! ..      M N        m, tensors back to back (N = sum of the counts; M = 4 for f32
//!                    moments, 2 for bf16: the bf16 bits)
//! ..      M N        v
//! ..      4 N        f32 master weights (only when the flag at 13 is 1)
//! ```
//!
//! Everything little-endian. A version-1 file is exactly a version-2 file with f32 moments and
//! master weights for 16-bit params (the default layout), so it restores into an optimizer
//! with the default [`StateOptions`]. [`decode`] checks the magic, version, dtype, layout,
//! tensor count, every length and the total size against what the receiver expects.
//!
//! ```
//! use fusedreg::adamw::{cpu, state};
//! let t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 3], vec![0.5; 3], 0.0).unwrap()];
//! let bytes = cpu::save_state(&t).unwrap();
//! let h = state::peek(&bytes).unwrap();
//! assert_eq!(h.lens, vec![3]);
//! assert_eq!(bytes.len() as u64, h.encoded_len());
//! ```

use super::{MasterWeights, MomentDtype, StateOptions};
use crate::dtype::DtypeKind;
use crate::error::{Error, Result};

/// The first 8 bytes.
///
/// ```
/// use fusedreg::adamw::{cpu, state};
/// let t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 2], vec![0.5; 2], 0.0).unwrap()];
/// let bytes = cpu::save_state(&t).unwrap();
/// assert_eq!(bytes[..8], state::MAGIC);
/// assert_eq!(&state::MAGIC, b"FRADAMW\0");
/// ```
pub const MAGIC: [u8; 8] = *b"FRADAMW\0";
/// The format version this crate writes and reads.
///
/// ```
/// use fusedreg::adamw::{cpu, state};
/// let t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 2], vec![0.5; 2], 0.0).unwrap()];
/// let mut bytes = cpu::save_state(&t).unwrap();
/// assert_eq!(bytes[8..12], state::VERSION.to_le_bytes());
/// bytes[8] = 3; // a version this crate does not know
/// assert!(state::peek(&bytes).unwrap_err().to_string().contains("version 3"));
/// ```
pub const VERSION: u32 = 2;
const FIXED: usize = 24;
const OP: &str = "adamw state";

/// What a state describes: the parameter dtype, the state layout and the tensor lengths.
///
/// ```
/// use fusedreg::{adamw::state::StateHeader, DtypeKind};
/// let h = StateHeader { param_dtype: DtypeKind::Bf16, lens: vec![3, 5], options: Default::default() };
/// assert!(h.has_master());
/// assert_eq!(h.total(), 8);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateHeader {
    /// Parameter dtype.
    pub param_dtype: DtypeKind,
    /// Elements per tensor.
    pub lens: Vec<u64>,
    /// Moment dtype and master weights (master weights are stored exactly when
    /// `options.has_master(param_dtype)`).
    pub options: StateOptions,
}

impl StateHeader {
    /// Whether master weights are stored.
    ///
    /// ```
    /// use fusedreg::{adamw::state::StateHeader, DtypeKind};
    /// let f32_params = StateHeader { param_dtype: DtypeKind::F32, lens: vec![4], options: Default::default() };
    /// let f16_params = StateHeader { param_dtype: DtypeKind::F16, lens: vec![4], options: Default::default() };
    /// assert!(!f32_params.has_master());
    /// assert!(f16_params.has_master());
    /// ```
    pub fn has_master(&self) -> bool {
        self.options.has_master(self.param_dtype)
    }

    /// Total elements (saturating: a corrupt header cannot overflow it).
    ///
    /// ```
    /// use fusedreg::{adamw::state::StateHeader, DtypeKind};
    /// let h = StateHeader { param_dtype: DtypeKind::F32, lens: vec![3, 0, 5], options: Default::default() };
    /// assert_eq!(h.total(), 8);
    /// let huge = StateHeader { param_dtype: DtypeKind::F32, lens: vec![u64::MAX, 1], options: Default::default() };
    /// assert_eq!(huge.total(), u64::MAX);
    /// ```
    pub fn total(&self) -> u64 {
        self.lens.iter().fold(0u64, |a, &n| a.saturating_add(n))
    }

    /// Size in bytes of a state with this header (saturating at `u64::MAX`).
    ///
    /// ```
    /// use fusedreg::{adamw::state::StateHeader, DtypeKind};
    /// // 24 fixed bytes, 8 + 4 per tensor (length, step), 4 per element and array.
    /// let h = StateHeader { param_dtype: DtypeKind::F32, lens: vec![3, 5], options: Default::default() };
    /// assert_eq!(h.encoded_len(), 24 + 2 * 12 + 2 * 4 * 8); // m and v
    /// let h = StateHeader { param_dtype: DtypeKind::Bf16, lens: vec![3, 5], options: Default::default() };
    /// assert_eq!(h.encoded_len(), 24 + 2 * 12 + 3 * 4 * 8); // m, v and master
    /// // bf16 moments, no master: 2 bytes per element and moment.
    /// use fusedreg::adamw::{MasterWeights, MomentDtype, StateOptions};
    /// let lean = StateOptions { moments: MomentDtype::Bf16, master: MasterWeights::None };
    /// let h = StateHeader { param_dtype: DtypeKind::Bf16, lens: vec![3, 5], options: lean };
    /// assert_eq!(h.encoded_len(), 24 + 2 * 12 + 2 * 2 * 8);
    /// ```
    pub fn encoded_len(&self) -> u64 {
        let per = 2 * self.options.moments.size() as u128 + if self.has_master() { 4 } else { 0 };
        let n = FIXED as u128 + 12 * self.lens.len() as u128 + per * self.total() as u128;
        u64::try_from(n).unwrap_or(u64::MAX)
    }
}

fn dtype_code(k: DtypeKind) -> u8 {
    match k {
        DtypeKind::F32 => 0,
        DtypeKind::F16 => 1,
        DtypeKind::Bf16 => 2,
    }
}

fn push_f32s(out: &mut Vec<u8>, xs: &[f32]) {
    out.reserve(4 * xs.len());
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Moments as stored: f32 bytes, or the bf16 bits (the values are bf16 values already, so
/// the conversion is exact).
fn push_moments(out: &mut Vec<u8>, xs: &[f32], m: MomentDtype) {
    match m {
        MomentDtype::F32 => push_f32s(out, xs),
        MomentDtype::Bf16 => {
            out.reserve(2 * xs.len());
            for x in xs {
                out.extend_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
    }
}

/// Encodes a state; `m(i)`, `v(i)` and `master(i)` give tensor `i`'s arrays (master ignored
/// without master weights).
pub(crate) fn encode<'a>(
    header: &StateHeader,
    steps: &[u32],
    m: impl Fn(usize) -> &'a [f32],
    v: impl Fn(usize) -> &'a [f32],
    master: impl Fn(usize) -> &'a [f32],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.encoded_len() as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(dtype_code(header.param_dtype));
    out.push(u8::from(header.has_master()));
    out.push(dtype_code(header.options.moments.kind()));
    out.push(0);
    out.extend_from_slice(&(header.lens.len() as u64).to_le_bytes());
    for n in &header.lens {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for s in steps {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for i in 0..header.lens.len() {
        push_moments(&mut out, m(i), header.options.moments);
    }
    for i in 0..header.lens.len() {
        push_moments(&mut out, v(i), header.options.moments);
    }
    if header.has_master() {
        for i in 0..header.lens.len() {
            push_f32s(&mut out, master(i));
        }
    }
    debug_assert_eq!(out.len() as u64, header.encoded_len());
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads the header of a saved state without checking it against a set.
///
/// ```
/// use fusedreg::{adamw::{cpu, state}, DtypeKind};
/// use half::bf16;
/// let p = vec![bf16::from_f32(1.0); 3];
/// let t = vec![cpu::CpuTensor::<bf16, bf16>::new(p.clone(), p, 0.0).unwrap()];
/// let h = state::peek(&cpu::save_state(&t).unwrap()).unwrap();
/// assert_eq!((h.param_dtype, h.lens), (DtypeKind::Bf16, vec![3]));
/// assert!(state::peek(b"not an optimizer state!!").is_err()); // bad magic
/// ```
pub fn peek(bytes: &[u8]) -> Result<StateHeader> {
    Ok(parse(bytes)?.0)
}

fn parse(bytes: &[u8]) -> Result<(StateHeader, usize)> {
    if bytes.len() < FIXED {
        return Err(Error::invalid(
            OP,
            format!(
                "{} bytes is too short for a saved AdamW state (header is {FIXED} bytes)",
                bytes.len()
            ),
        ));
    }
    if bytes[..8] != MAGIC {
        return Err(Error::invalid(
            OP,
            "not a fusedreg AdamW state (bad magic): pass the bytes AdamW::save_state wrote",
        ));
    }
    let version = u32_at(bytes, 8);
    if version != 1 && version != VERSION {
        return Err(Error::invalid(
            OP,
            format!("state format version {version}; this fusedreg reads versions 1 and {VERSION}"),
        ));
    }
    let param_dtype = match bytes[12] {
        0 => DtypeKind::F32,
        1 => DtypeKind::F16,
        2 => DtypeKind::Bf16,
        c => {
            return Err(Error::invalid(
                OP,
                format!("unknown param dtype code {c} (corrupt state)"),
            ))
        }
    };
    let header_master = bytes[13];
    // Version 1 knew one layout: f32 moments, master weights exactly for 16-bit params.
    let moments = match (version, bytes[14]) {
        (_, 0) => MomentDtype::F32,
        (2, 2) => MomentDtype::Bf16,
        _ => {
            return Err(Error::invalid(
                OP,
                format!("unknown moment dtype code {} (corrupt state)", bytes[14]),
            ))
        }
    };
    let master_ok = match (version, param_dtype) {
        (_, DtypeKind::F32) => header_master == 0,
        (1, _) => header_master == 1,
        _ => header_master <= 1,
    };
    if !master_ok || bytes[15] != 0 {
        return Err(Error::invalid(
            OP,
            "inconsistent header flags (corrupt state)",
        ));
    }
    let options = StateOptions {
        moments,
        master: if header_master == 1 || param_dtype == DtypeKind::F32 {
            MasterWeights::F32
        } else {
            MasterWeights::None
        },
    };
    let count = u64_at(bytes, 16);
    let lens_end = (count as u128) * 8 + FIXED as u128;
    if lens_end > bytes.len() as u128 {
        return Err(Error::invalid(
            OP,
            format!(
                "the state claims {count} tensors but holds only {} bytes (truncated?)",
                bytes.len()
            ),
        ));
    }
    let lens: Vec<u64> = (0..count as usize)
        .map(|i| u64_at(bytes, FIXED + 8 * i))
        .collect();
    Ok((
        StateHeader {
            param_dtype,
            lens,
            options,
        },
        lens_end as usize,
    ))
}

/// A decoded state: step counts, and the arrays as byte sections read on demand.
///
/// ```
/// use fusedreg::adamw::{cpu, state, AdamWConfig};
/// let mut t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 2], vec![0.5; 2], 0.0).unwrap()];
/// let cfg = AdamWConfig::default();
/// cpu::step(&mut t, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
/// let bytes = cpu::save_state(&t).unwrap();
/// let view = state::decode(&bytes, &state::peek(&bytes).unwrap()).unwrap();
/// assert_eq!(view.steps, vec![1]);
/// assert_eq!(view.m(0), t[0].m);
/// ```
#[derive(Debug)]
pub struct StateView<'a> {
    /// Step count per tensor.
    pub steps: Vec<u32>,
    offsets: Vec<usize>,
    lens: Vec<usize>,
    moments: MomentDtype,
    m: &'a [u8],
    v: &'a [u8],
    master: Option<&'a [u8]>,
}

/// Elements `off .. off + len` of a moment section as f32 (bf16 bits widened exactly).
fn moments(section: &[u8], off: usize, len: usize, m: MomentDtype) -> Vec<f32> {
    let mut out = vec![0f32; len];
    fill_moments(section, off, &mut out, m);
    out
}

fn fill_moments(section: &[u8], off: usize, out: &mut [f32], m: MomentDtype) {
    match m {
        MomentDtype::F32 => fill(section, off, out),
        MomentDtype::Bf16 => {
            let bytes = &section[2 * off..2 * (off + out.len())];
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

fn f32s(section: &[u8], off: usize, len: usize) -> Vec<f32> {
    section[4 * off..4 * (off + len)]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

fn fill(section: &[u8], off: usize, out: &mut [f32]) {
    let bytes = &section[4 * off..4 * (off + out.len())];
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes(c.try_into().expect("4 bytes"));
    }
}

impl StateView<'_> {
    /// Writes tensor `i`'s first moment, second moment and (when present) master weights into
    /// the given slices, each of the tensor's length (the master slice is ignored without
    /// master weights).
    ///
    /// # Panics
    /// When `i` is out of range or a slice has the wrong length, as slice copies do.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::adamw::{cpu, state, AdamWConfig};
    /// use half::f16;
    /// let p = vec![f16::from_f32(1.0); 4];
    /// let mut t = vec![cpu::CpuTensor::<f16, f16>::new(p.clone(), p, 0.01).unwrap()];
    /// let cfg = AdamWConfig::default();
    /// cpu::step(&mut t, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    /// let bytes = cpu::save_state(&t).unwrap();
    /// let view = state::decode(&bytes, &state::peek(&bytes).unwrap()).unwrap();
    /// let (mut m, mut v, mut master) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]);
    /// view.fill_into(0, &mut m, &mut v, Some(&mut master));
    /// assert_eq!((&m, &v), (&t[0].m, &t[0].v));
    /// assert_eq!(Some(master), t[0].master);
    /// ```
    pub fn fill_into(&self, i: usize, m: &mut [f32], v: &mut [f32], master: Option<&mut [f32]>) {
        fill_moments(
            self.m,
            self.offsets[i],
            &mut m[..self.lens[i]],
            self.moments,
        );
        fill_moments(
            self.v,
            self.offsets[i],
            &mut v[..self.lens[i]],
            self.moments,
        );
        if let (Some(section), Some(out)) = (self.master, master) {
            fill(section, self.offsets[i], &mut out[..self.lens[i]]);
        }
    }

    /// Tensor `i`'s first moment. Panics when `i` is out of range.
    ///
    /// ```
    /// use fusedreg::adamw::{cpu, state, AdamWConfig};
    /// let mut t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 2], vec![0.5; 2], 0.0).unwrap()];
    /// let cfg = AdamWConfig::default();
    /// cpu::step(&mut t, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    /// let bytes = cpu::save_state(&t).unwrap();
    /// let view = state::decode(&bytes, &state::peek(&bytes).unwrap()).unwrap();
    /// // After one step from zero: m = (1 - beta1) * g.
    /// assert_eq!(view.m(0), vec![(1.0 - 0.9f32) * 0.5; 2]);
    /// ```
    pub fn m(&self, i: usize) -> Vec<f32> {
        moments(self.m, self.offsets[i], self.lens[i], self.moments)
    }

    /// Tensor `i`'s second moment. Panics when `i` is out of range.
    ///
    /// ```
    /// use fusedreg::adamw::{cpu, state, AdamWConfig};
    /// let mut t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 2], vec![0.5; 2], 0.0).unwrap()];
    /// let cfg = AdamWConfig::default();
    /// cpu::step(&mut t, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    /// let bytes = cpu::save_state(&t).unwrap();
    /// let view = state::decode(&bytes, &state::peek(&bytes).unwrap()).unwrap();
    /// // After one step from zero: v = ((1 - beta2) * g) * g.
    /// assert_eq!(view.v(0), vec![((1.0 - 0.999f32) * 0.5) * 0.5; 2]);
    /// ```
    pub fn v(&self, i: usize) -> Vec<f32> {
        moments(self.v, self.offsets[i], self.lens[i], self.moments)
    }

    /// Tensor `i`'s master weights (16-bit parameters only). Panics when `i` is out of range.
    ///
    /// ```
    /// use fusedreg::adamw::{cpu, state};
    /// use half::bf16;
    /// let p = vec![bf16::from_f32(0.25); 3];
    /// let t16 = vec![cpu::CpuTensor::<bf16, bf16>::new(p.clone(), p, 0.0).unwrap()];
    /// let bytes = cpu::save_state(&t16).unwrap();
    /// let view = state::decode(&bytes, &state::peek(&bytes).unwrap()).unwrap();
    /// assert_eq!(view.master(0), Some(vec![0.25; 3]));
    /// // f32 parameters have no master weights.
    /// let t32 = vec![cpu::CpuTensor::<f32, f32>::new(vec![0.25; 3], vec![0.0; 3], 0.0).unwrap()];
    /// let bytes = cpu::save_state(&t32).unwrap();
    /// let view = state::decode(&bytes, &state::peek(&bytes).unwrap()).unwrap();
    /// assert_eq!(view.master(0), None);
    /// ```
    pub fn master(&self, i: usize) -> Option<Vec<f32>> {
        self.master.map(|s| f32s(s, self.offsets[i], self.lens[i]))
    }
}

/// Decodes `bytes`, checking them against the `expected` dtype and lengths.
///
/// ```
/// use fusedreg::{adamw::{cpu, state::{self, StateHeader}}, DtypeKind};
/// let t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 3], vec![0.5; 3], 0.0).unwrap()];
/// let bytes = cpu::save_state(&t).unwrap();
/// let expected = StateHeader { param_dtype: DtypeKind::F32, lens: vec![3], options: Default::default() };
/// assert_eq!(state::decode(&bytes, &expected).unwrap().steps, vec![0]);
/// // Another length, dtype or a truncated buffer is refused.
/// let other = StateHeader { param_dtype: DtypeKind::F32, lens: vec![4], options: Default::default() };
/// assert!(state::decode(&bytes, &other).unwrap_err().to_string().contains("tensor 0"));
/// let bf16 = StateHeader { param_dtype: DtypeKind::Bf16, lens: vec![3], options: Default::default() };
/// assert!(state::decode(&bytes, &bf16).is_err());
/// assert!(state::decode(&bytes[..bytes.len() - 4], &expected).is_err());
/// ```
pub fn decode<'a>(bytes: &'a [u8], expected: &StateHeader) -> Result<StateView<'a>> {
    let (header, mut at) = parse(bytes)?;
    if header.param_dtype != expected.param_dtype {
        return Err(Error::invalid(
            OP,
            format!(
                "the state was saved for {} parameters, this set holds {}: restore into a set \
                 with the same parameter dtype",
                header.param_dtype.name(),
                expected.param_dtype.name()
            ),
        ));
    }
    // For f32 params the master option means nothing; the moment dtype always matters.
    if (header.param_dtype != DtypeKind::F32 && header.has_master() != expected.has_master())
        || header.options.moments != expected.options.moments
    {
        return Err(Error::invalid(
            OP,
            format!(
                "the state was saved with {:?} moments and {} master weights; this optimizer \
                 keeps {:?} moments and {} master weights: restore with the same StateOptions",
                header.options.moments,
                if header.has_master() { "f32" } else { "no" },
                expected.options.moments,
                if expected.has_master() { "f32" } else { "no" },
            ),
        ));
    }
    if header.lens.len() != expected.lens.len() {
        return Err(Error::shape(
            OP,
            format!(
                "the state holds {} tensors, this set {}: register the same tensors in the same \
                 order",
                header.lens.len(),
                expected.lens.len()
            ),
        ));
    }
    if let Some(i) = (0..header.lens.len()).find(|&i| header.lens[i] != expected.lens[i]) {
        return Err(Error::shape(
            OP,
            format!(
                "tensor {i} has {} elements in the state but {} in this set",
                header.lens[i], expected.lens[i]
            ),
        ));
    }
    if bytes.len() as u64 != header.encoded_len() {
        return Err(Error::invalid(
            OP,
            format!(
                "the state is {} bytes; its header describes {} (truncated or padded?)",
                bytes.len(),
                header.encoded_len()
            ),
        ));
    }
    let t = header.lens.len();
    let steps = (0..t).map(|i| u32_at(bytes, at + 4 * i)).collect();
    at += 4 * t;
    let section = header.options.moments.size() * header.total() as usize;
    let m = &bytes[at..at + section];
    let v = &bytes[at + section..at + 2 * section];
    let master_len = 4 * header.total() as usize;
    let master = header
        .has_master()
        .then(|| &bytes[at + 2 * section..at + 2 * section + master_len]);
    let mut offsets = Vec::with_capacity(t);
    let mut off = 0usize;
    for &n in &header.lens {
        offsets.push(off);
        off += n as usize;
    }
    Ok(StateView {
        steps,
        offsets,
        lens: header.lens.iter().map(|&n| n as usize).collect(),
        moments: header.options.moments,
        m,
        v,
        master,
    })
}
