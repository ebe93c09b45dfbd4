//! The optimizer-state byte format (version 1), shared by the GPU set and the CPU reference.
//!
//! ```text
//! offset  size       field
//! 0       8          magic "FRADAMW\0"
//! 8       4          version (1)
//! 12      1          param dtype: 0 f32, 1 f16, 2 bf16
//! 13      1          1 when master weights follow (16-bit params), else 0
//! 14      2          reserved, 0
//! 16      8          tensor count T
//! 24      8 T        element count of each tensor
//! ..      4 T        step count of each tensor (u32)
//! ..      4 N        m, f32, tensors back to back (N = sum of the counts)
//! ..      4 N        v
//! ..      4 N        master weights (only when the flag at 13 is 1)
//! ```
//!
//! Everything little-endian. [`decode`] checks the magic, version, dtype, tensor count, every
//! length and the total size against what the receiving set expects.
//!
//! ```
//! use fusedreg::adamw::{cpu, state};
//! let t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 3], vec![0.5; 3], 0.0).unwrap()];
//! let bytes = cpu::save_state(&t).unwrap();
//! let h = state::peek(&bytes).unwrap();
//! assert_eq!(h.lens, vec![3]);
//! assert_eq!(bytes.len() as u64, h.encoded_len());
//! ```

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
/// bytes[8] = 2; // a version this crate does not know
/// assert!(state::peek(&bytes).unwrap_err().to_string().contains("version 2"));
/// ```
pub const VERSION: u32 = 1;
const FIXED: usize = 24;
const OP: &str = "adamw state";

/// What a state describes: the parameter dtype and the tensor lengths.
///
/// ```
/// use fusedreg::{adamw::state::StateHeader, DtypeKind};
/// let h = StateHeader { param_dtype: DtypeKind::Bf16, lens: vec![3, 5] };
/// assert!(h.has_master());
/// assert_eq!(h.total(), 8);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateHeader {
    /// Parameter dtype (master weights are present exactly when it is 16-bit).
    pub param_dtype: DtypeKind,
    /// Elements per tensor.
    pub lens: Vec<u64>,
}

impl StateHeader {
    /// Whether master weights are stored.
    ///
    /// ```
    /// use fusedreg::{adamw::state::StateHeader, DtypeKind};
    /// let f32_params = StateHeader { param_dtype: DtypeKind::F32, lens: vec![4] };
    /// let f16_params = StateHeader { param_dtype: DtypeKind::F16, lens: vec![4] };
    /// assert!(!f32_params.has_master());
    /// assert!(f16_params.has_master());
    /// ```
    pub fn has_master(&self) -> bool {
        self.param_dtype != DtypeKind::F32
    }

    /// Total elements (saturating: a corrupt header cannot overflow it).
    ///
    /// ```
    /// use fusedreg::{adamw::state::StateHeader, DtypeKind};
    /// let h = StateHeader { param_dtype: DtypeKind::F32, lens: vec![3, 0, 5] };
    /// assert_eq!(h.total(), 8);
    /// let huge = StateHeader { param_dtype: DtypeKind::F32, lens: vec![u64::MAX, 1] };
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
    /// let h = StateHeader { param_dtype: DtypeKind::F32, lens: vec![3, 5] };
    /// assert_eq!(h.encoded_len(), 24 + 2 * 12 + 2 * 4 * 8); // m and v
    /// let h = StateHeader { param_dtype: DtypeKind::Bf16, lens: vec![3, 5] };
    /// assert_eq!(h.encoded_len(), 24 + 2 * 12 + 3 * 4 * 8); // m, v and master
    /// ```
    pub fn encoded_len(&self) -> u64 {
        let arrays: u128 = if self.has_master() { 3 } else { 2 };
        let n = FIXED as u128 + 12 * self.lens.len() as u128 + 4 * arrays * self.total() as u128;
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
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(header.lens.len() as u64).to_le_bytes());
    for n in &header.lens {
        out.extend_from_slice(&n.to_le_bytes());
    }
    for s in steps {
        out.extend_from_slice(&s.to_le_bytes());
    }
    for i in 0..header.lens.len() {
        push_f32s(&mut out, m(i));
    }
    for i in 0..header.lens.len() {
        push_f32s(&mut out, v(i));
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
            "not a fusedreg AdamW state (bad magic): pass the bytes TensorSet::save_state wrote",
        ));
    }
    let version = u32_at(bytes, 8);
    if version != VERSION {
        return Err(Error::invalid(
            OP,
            format!("state format version {version}; this fusedreg reads version {VERSION}"),
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
    if header_master != u8::from(param_dtype != DtypeKind::F32) || bytes[14..16] != [0, 0] {
        return Err(Error::invalid(
            OP,
            "inconsistent header flags (corrupt state)",
        ));
    }
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
    Ok((StateHeader { param_dtype, lens }, lens_end as usize))
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
    m: &'a [u8],
    v: &'a [u8],
    master: Option<&'a [u8]>,
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
        fill(self.m, self.offsets[i], &mut m[..self.lens[i]]);
        fill(self.v, self.offsets[i], &mut v[..self.lens[i]]);
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
        f32s(self.m, self.offsets[i], self.lens[i])
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
        f32s(self.v, self.offsets[i], self.lens[i])
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
/// let expected = StateHeader { param_dtype: DtypeKind::F32, lens: vec![3] };
/// assert_eq!(state::decode(&bytes, &expected).unwrap().steps, vec![0]);
/// // Another length, dtype or a truncated buffer is refused.
/// let other = StateHeader { param_dtype: DtypeKind::F32, lens: vec![4] };
/// assert!(state::decode(&bytes, &other).unwrap_err().to_string().contains("tensor 0"));
/// let bf16 = StateHeader { param_dtype: DtypeKind::Bf16, lens: vec![3] };
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
    let section = 4 * header.total() as usize;
    let m = &bytes[at..at + section];
    let v = &bytes[at + section..at + 2 * section];
    let master = header
        .has_master()
        .then(|| &bytes[at + 2 * section..at + 3 * section]);
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
        m,
        v,
        master,
    })
}
