//! The multi-tensor engine: a set of tensors registered once, launched over as one.
//!
//! A framework registers its parameters and gradients once into a [`TensorSet`]. Building the
//! set computes, on the host and once, the per-tensor table (buffer addresses, 64-bit lengths,
//! weight decay, alignment flags) and the block -> (tensor, chunk) table ([`Layout`]), and uploads
//! both to the device once. Every later launch over the set — the global norm, the scale pass,
//! AdamW — passes two table pointers in its parameter struct: one launch covers any number of
//! tensors, and the host work per step does not depend on the number of tensors (no per-step
//! packing or upload, unlike the 4 KB argument tables PyTorch and Apex rebuild every call).
//!
//! # Chunks
//!
//! Each tensor is cut into chunks of [`CHUNK`] = 65,536 elements (the last one shorter); each
//! chunk is one block of a launch. Chunks are numbered globally in registration order (tensor 0's
//! chunks first). Zero-size tensors own no chunk and cost nothing, wherever they are in the list.
//! Lengths, element indices and chunk starts are 64-bit everywhere, so a single tensor may hold
//! more than 2^31 (or 2^32) elements; the number of chunks of a set is limited to 2^31 - 1 (the
//! grid limit), i.e. 2^47 elements.
//!
//! # The split between engine and op
//!
//! The device side (`kernels/common/multi_tensor.cuh`) maps a block to its (tensor, chunk) and
//! walks the chunk in aligned vector groups or, for tensors whose buffers are not aligned for
//! them (views starting at an odd element, say), element by element. The arithmetic of each op is
//! a small functor in the op's `.cu` file, so adding an op is a functor and a kernel symbol, not a
//! new engine. Alignment is recorded per tensor at registration: an owned `CudaSlice` is always
//! aligned; raw addresses must be aligned to their element size and may be misaligned for vectors
//! (they take the scalar path, which gives identical results).
//!
//! # Registering buffers
//!
//! * Safe: [`TensorSetBuilder::push`] takes ownership of a parameter `CudaSlice` and its gradient
//!   `CudaSlice`; the set keeps them alive and hands out views ([`TensorSet::grad_mut`] to write
//!   gradients, [`TensorSet::param`] to read parameters), never the slices themselves, so their
//!   addresses in the uploaded table stay valid for the set's lifetime.
//! * Unsafe: [`TensorSetBuilder::push_raw`] registers device addresses owned elsewhere (a
//!   framework's tensors); the caller guarantees they outlive the set and live in the handle's
//!   context.
//! * Frameworks that allocate new gradient buffers every step (candle's `GradStore`): register
//!   by raw address, then hand the step's gradient addresses to
//!   [`TensorSet::set_grads_raw`] (unsafe, same contract) before launching; the per-tensor table
//!   is re-uploaded only when an address changed (a host loop over the tensors and one small
//!   copy, the one per-step cost that grows with the number of tensors).
//! * Gradients only ([`TensorSetBuilder::push_grad`], [`TensorSetBuilder::push_grad_raw`]): for
//!   callers who clip with [`crate::global_norm`] but use their own optimizer.
//! * Zero-size tensors: [`TensorSetBuilder::push_empty`] / [`TensorSetBuilder::push_grad_empty`]
//!   (no buffer needed), or any of the above with empty buffers.
//!
//! The set knows tensors only: parameters, gradients, lengths and the chunk tables. Whatever
//! per-tensor state an optimizer needs (moments, master weights, weight decay, step counts, skip
//! flags) is the optimizer's: [`crate::adamw::AdamW`] allocates and owns its own and passes its
//! own per-tensor table to its kernel, indexed by the tensor and the global chunk of a block. A
//! new optimizer (LAMB, Lion, SGD with momentum) is its own module and kernel file; the engine,
//! the norm and the scale pass do not change.
//!
//! ```
//! use fusedreg::multi_tensor::{Layout, CHUNK};
//! // Tensors of 0, 65,537 and 3 elements: 2 + 1 chunks; the empty tensor has none.
//! let l = Layout::new(&[0, CHUNK + 1, 3]).unwrap();
//! assert_eq!(l.num_chunks(), 3);
//! assert_eq!(l.chunks(0), 0..0);
//! assert_eq!(l.chunks(1), 0..2);
//! assert_eq!(l.chunk(1).start, CHUNK);
//! assert_eq!(l.chunk(1).len, 1);
//! ```

use std::any::Any;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DeviceRepr, ValidAsZeroBits};

use crate::dtype::{Dtype, DtypeKind};
use crate::error::{Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::Kernel;
use crate::runtime::Handle;

/// Elements per chunk: one block of every multi-tensor launch works on one chunk.
///
/// ```
/// use fusedreg::multi_tensor::{Layout, CHUNK};
/// assert_eq!(CHUNK, 65_536);
/// // A tensor of 3 * CHUNK + 1 elements is 4 chunks, the last of one element.
/// let l = Layout::new(&[3 * CHUNK + 1]).unwrap();
/// assert_eq!((l.num_chunks(), l.chunk(3).len), (4, 1));
/// ```
pub const CHUNK: u64 = 65_536;

/// The most chunks one set may have: 2^24, i.e. 2^40 elements (2 TB of bf16 parameters alone,
/// several times any single device's memory). The launch grid would allow 2^31 - 1, but the
/// host builds an 8-byte table entry per chunk, and a length list that asks for 2^31 chunks (a
/// legal grid) would make it allocate 16 GiB before the device could refuse the tensors; at
/// this limit the table is at most 128 MiB.
///
/// ```
/// use fusedreg::multi_tensor::{Layout, CHUNK, MAX_CHUNKS};
/// assert_eq!(MAX_CHUNKS, 1 << 24);
/// // One chunk too many is refused (checked before anything is allocated).
/// assert!(Layout::new(&[MAX_CHUNKS * CHUNK + 1]).is_err());
/// ```
pub const MAX_CHUNKS: u64 = 1 << 24;

const OP: &str = "multi_tensor";

/// `TensorEntry::flags`: the parameter and the gradient are aligned for 4-element groups (an
/// optimizer's own state is always allocated aligned).
pub(crate) const FLAG_VEC4: u32 = 1;
/// `TensorEntry::flags`: the gradient is 16-byte aligned.
pub(crate) const FLAG_GRAD16: u32 = 2;

device_params! {
    /// One row of the per-tensor device table (`mt::TensorEntry` in `multi_tensor.cuh`).
    #[derive(Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    pub(crate) struct TensorEntry(40) {
        pub param: u64,
        pub grad: u64,
        pub n: u64,
        pub flags: u32,
        pub first_chunk: u32,
        pub num_chunks: u32,
        pub pad: u32,
    }
}
// SAFETY: all fields are integers or floats, for which zero bits are valid.
unsafe impl ValidAsZeroBits for TensorEntry {}

device_params! {
    /// One row of the block table (`mt::BlockEntry`): the tensor and its chunk a block works on.
    #[derive(Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
    pub(crate) struct BlockEntry(8) {
        pub tensor: u32,
        pub chunk: u32,
    }
}
// SAFETY: as above.
unsafe impl ValidAsZeroBits for BlockEntry {}

/// Where one chunk lies: tensor `tensor`, elements `start .. start + len` of it.
///
/// ```
/// use fusedreg::multi_tensor::{ChunkRef, Layout, CHUNK};
/// let l = Layout::new(&[10, CHUNK + 7]).unwrap();
/// assert_eq!(l.chunk(0), ChunkRef { tensor: 0, start: 0, len: 10 });
/// assert_eq!(l.chunk(2), ChunkRef { tensor: 1, start: CHUNK, len: 7 });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// Index of the tensor in the set.
    pub tensor: usize,
    /// First element of the chunk within the tensor (64-bit).
    pub start: u64,
    /// Elements in the chunk, `1 ..= CHUNK`.
    pub len: usize,
}

/// The chunk layout of a list of tensor lengths: which global chunks each tensor owns and where
/// each chunk lies. Pure host code, shared by the device tables and the CPU references.
///
/// ```
/// use fusedreg::multi_tensor::{Layout, CHUNK};
/// // 64-bit lengths: a tensor of 2^33 + 5 elements has 131,073 chunks, the last of 5 elements.
/// let l = Layout::new(&[(1u64 << 33) + 5, 0]).unwrap();
/// assert_eq!(l.num_chunks(), (1 << 17) + 1);
/// let last = l.chunk(l.num_chunks() - 1);
/// assert_eq!((last.tensor, last.start, last.len), (0, 1u64 << 33, 5));
/// assert!(Layout::new(&[]).is_err());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    lens: Vec<u64>,
    first_chunk: Vec<u32>,
    blocks: Vec<BlockEntry>,
}

impl Layout {
    /// Lays out tensors of the given lengths. Errors on an empty list, more than 2^32 - 1
    /// tensors, or more than [`MAX_CHUNKS`] chunks in all.
    ///
    /// ```
    /// use fusedreg::multi_tensor::{Layout, CHUNK};
    /// let l = Layout::new(&[CHUNK, 0, 1]).unwrap();
    /// assert_eq!((l.num_tensors(), l.num_chunks()), (3, 2));
    /// assert!(Layout::new(&[]).unwrap_err().to_string().contains("empty"));
    /// ```
    pub fn new(lens: &[u64]) -> Result<Self> {
        if lens.is_empty() {
            return Err(Error::invalid(
                OP,
                "the tensor list is empty: register at least one tensor",
            ));
        }
        if lens.len() > u32::MAX as usize {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} tensors registered; at most 2^32 - 1 fit in one set: split the list",
                    lens.len()
                ),
            ));
        }
        let total = lens
            .iter()
            .try_fold(0u64, |acc, &n| acc.checked_add(n.div_ceil(CHUNK)))
            .unwrap_or(u64::MAX);
        if total > MAX_CHUNKS {
            return Err(Error::invalid(
                OP,
                format!(
                    "the tensors need {total} chunks of {CHUNK} elements; one set holds at most \
                     {MAX_CHUNKS}: split the list into several sets"
                ),
            ));
        }
        let mut first_chunk = Vec::with_capacity(lens.len());
        let mut blocks = Vec::with_capacity(total as usize);
        for (t, &n) in lens.iter().enumerate() {
            first_chunk.push(blocks.len() as u32);
            for c in 0..n.div_ceil(CHUNK) {
                blocks.push(BlockEntry {
                    tensor: t as u32,
                    chunk: c as u32,
                });
            }
        }
        Ok(Layout {
            lens: lens.to_vec(),
            first_chunk,
            blocks,
        })
    }

    /// Number of tensors.
    ///
    /// ```
    /// use fusedreg::multi_tensor::Layout;
    /// assert_eq!(Layout::new(&[5, 0, 7]).unwrap().num_tensors(), 3); // empty ones count
    /// ```
    pub fn num_tensors(&self) -> usize {
        self.lens.len()
    }

    /// Number of chunks (blocks of a launch over the whole set).
    ///
    /// ```
    /// use fusedreg::multi_tensor::{Layout, CHUNK};
    /// // Each tensor rounds up to whole chunks on its own: 1 + 0 + 2.
    /// assert_eq!(Layout::new(&[5, 0, CHUNK + 1]).unwrap().num_chunks(), 3);
    /// ```
    pub fn num_chunks(&self) -> usize {
        self.blocks.len()
    }

    /// The tensor lengths.
    ///
    /// ```
    /// use fusedreg::multi_tensor::Layout;
    /// assert_eq!(Layout::new(&[5, 0, 7]).unwrap().lens(), &[5, 0, 7]);
    /// ```
    pub fn lens(&self) -> &[u64] {
        &self.lens
    }

    /// Total number of elements.
    ///
    /// ```
    /// use fusedreg::multi_tensor::Layout;
    /// assert_eq!(Layout::new(&[5, 0, 7]).unwrap().total_elements(), 12);
    /// ```
    pub fn total_elements(&self) -> u64 {
        self.lens.iter().sum()
    }

    /// The global chunk indices tensor `tensor` owns (empty for a zero-size tensor).
    ///
    /// # Panics
    /// When `tensor >= num_tensors()`, as slice indexing does.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::multi_tensor::{Layout, CHUNK};
    /// let l = Layout::new(&[2 * CHUNK, 0, 3]).unwrap();
    /// assert_eq!(l.chunks(0), 0..2);
    /// assert_eq!(l.chunks(1), 2..2); // no chunk
    /// assert_eq!(l.chunks(2), 2..3);
    /// ```
    pub fn chunks(&self, tensor: usize) -> Range<usize> {
        let first = self.first_chunk[tensor] as usize;
        first..first + self.lens[tensor].div_ceil(CHUNK) as usize
    }

    /// Where global chunk `index` lies.
    ///
    /// # Panics
    /// When `index >= num_chunks()`, as slice indexing does.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::multi_tensor::{Layout, CHUNK};
    /// let l = Layout::new(&[CHUNK + 3, 9]).unwrap();
    /// let c = l.chunk(1); // the second chunk of tensor 0
    /// assert_eq!((c.tensor, c.start, c.len), (0, CHUNK, 3));
    /// assert_eq!(l.chunk(2).tensor, 1);
    /// ```
    pub fn chunk(&self, index: usize) -> ChunkRef {
        let b = self.blocks[index];
        let start = u64::from(b.chunk) * CHUNK;
        let len = (self.lens[b.tensor as usize] - start).min(CHUNK) as usize;
        ChunkRef {
            tensor: b.tensor as usize,
            start,
            len,
        }
    }

    pub(crate) fn first_chunk(&self, tensor: usize) -> u32 {
        self.first_chunk[tensor]
    }

    pub(crate) fn blocks(&self) -> &[BlockEntry] {
        &self.blocks
    }
}

/// A tensor registered by raw device addresses (see [`TensorSetBuilder::push_raw`]).
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
///
/// use fusedreg::cudarc::driver::DevicePtr;
/// use fusedreg::{multi_tensor::{RawTensor, TensorSet}, DtypeKind};
/// let h = fusedreg::Handle::new(0)?;
/// // Buffers a framework owns (here two cudarc slices kept alive below).
/// let w = h.stream().clone_htod(&vec![0.5f32; 1024]).unwrap();
/// let gw = h.stream().alloc_zeros::<f32>(1024).unwrap();
/// let (param, _g1) = w.device_ptr(h.stream());
/// let (grad, _g2) = gw.device_ptr(h.stream());
/// let t = RawTensor { param, grad, len: 1024, param_dtype: DtypeKind::F32,
///                     grad_dtype: DtypeKind::F32 };
/// let mut b = TensorSet::builder(&h);
/// // SAFETY: `w` and `gw` outlive the set and are used on the handle's stream only.
/// unsafe { b.push_raw(t) }?;
/// let set = b.build()?;
/// # drop(set);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawTensor {
    /// Device address of the parameters (may be 0 when `len` is 0).
    pub param: u64,
    /// Device address of the gradients (may be 0 when `len` is 0).
    pub grad: u64,
    /// Elements in each buffer (64-bit).
    pub len: u64,
    /// Element type of the parameters.
    pub param_dtype: DtypeKind,
    /// Element type of the gradients.
    pub grad_dtype: DtypeKind,
}

type OwnedBuf = Box<dyn Any + Send + Sync>;

struct Pending {
    param: u64,
    grad: u64,
    len: u64,
    owned_param: Option<OwnedBuf>,
    owned_grad: Option<OwnedBuf>,
}

impl Pending {
    /// A tensor at addresses whose buffers the caller keeps (none for an empty one).
    fn borrowed(param: u64, grad: u64, len: u64) -> Self {
        Pending {
            param,
            grad,
            len,
            owned_param: None,
            owned_grad: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Unset,
    Grads(DtypeKind),
    Params(DtypeKind, DtypeKind),
}

/// Collects tensors for a [`TensorSet`]; see the [module docs](self).
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::multi_tensor::TensorSet;
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let mut b = TensorSet::builder(&h);
/// b.push(s.clone_htod(&vec![0.5f32; 1000]).unwrap(), s.alloc_zeros::<f32>(1000).unwrap())?;
/// b.push_empty::<f32, f32>()?; // a zero-size tensor, no buffers
/// println!("{} tensors registered", b.len()); // 2
/// let set = b.build()?;          // tables built and uploaded once
/// # drop(set);
/// # Ok(()) }
/// ```
pub struct TensorSetBuilder {
    handle: Handle,
    kind: Kind,
    pending: Vec<Pending>,
}

impl std::fmt::Debug for TensorSetBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorSetBuilder")
            .field("tensors", &self.pending.len())
            .field("kind", &self.kind)
            .finish()
    }
}

fn check_raw_address(what: &str, addr: u64, len: u64, kind: DtypeKind) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if addr == 0 {
        return Err(Error::invalid(
            OP,
            format!("{what} address is null for a tensor of {len} elements"),
        ));
    }
    if addr % kind.size() as u64 != 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "{what} address {addr:#x} is not aligned to its element size ({} bytes for {}): \
                 pass the address of an element",
                kind.size(),
                kind.name()
            ),
        ));
    }
    Ok(())
}

impl TensorSetBuilder {
    /// Queues `p` for [`TensorSetBuilder::build`]; returns its tensor index.
    fn queue(&mut self, p: Pending) -> usize {
        self.pending.push(p);
        self.pending.len() - 1
    }

    fn admit(&mut self, kind: Kind) -> Result<()> {
        let describe = |k: Kind| match k {
            Kind::Unset => "nothing".to_string(),
            Kind::Grads(g) => format!("gradients only ({})", g.name()),
            Kind::Params(p, g) => format!("{} parameters with {} gradients", p.name(), g.name()),
        };
        if self.pending.len() >= u32::MAX as usize {
            return Err(Error::invalid(OP, "a set holds at most 2^32 - 1 tensors"));
        }
        match self.kind {
            Kind::Unset => {
                self.kind = kind;
                Ok(())
            }
            k if k == kind => Ok(()),
            k => Err(Error::invalid(
                OP,
                format!(
                    "tensor {} is {} but the set already holds {}: one set has one parameter \
                     dtype and one gradient dtype (the kernel is compiled per pair); put other \
                     dtypes in a second set",
                    self.pending.len(),
                    describe(kind),
                    describe(k)
                ),
            )),
        }
    }

    /// Registers a parameter tensor and its gradient, taking ownership of both buffers. Returns
    /// the tensor's index in the set.
    ///
    /// Errors: lengths differ, a buffer from another context, or dtypes different from the
    /// tensors already registered. (Weight decay is the optimizer's: see
    /// [`crate::adamw::AdamW::new`].)
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// use half::bf16;
    /// let w = s.clone_htod(&vec![bf16::from_f32(0.5); 4096]).unwrap();
    /// let gw = s.alloc_zeros::<bf16>(4096).unwrap();
    /// let i = b.push(w, gw)?; // bf16 params + bf16 grads
    /// println!("registered tensor {i}"); // 0
    /// // One set holds one (param, grad) dtype pair: an f32 tensor here is an error.
    /// let r = b.push(s.alloc_zeros::<f32>(8).unwrap(), s.alloc_zeros::<f32>(8).unwrap());
    /// println!("{}", r.unwrap_err());
    /// # Ok(()) }
    /// ```
    pub fn push<P: Dtype, G: Dtype>(
        &mut self,
        param: CudaSlice<P>,
        grad: CudaSlice<G>,
    ) -> Result<usize> {
        if param.len() != grad.len() {
            return Err(Error::shape(
                OP,
                format!(
                    "tensor {}: param has {} elements but grad has {}: every buffer of a tensor \
                     has the same length",
                    self.pending.len(),
                    param.len(),
                    grad.len()
                ),
            ));
        }
        let p = self.address("param", &param)?;
        let g = self.address("grad", &grad)?;
        self.admit(Kind::Params(P::KIND, G::KIND))?;
        Ok(self.queue(Pending {
            param: p,
            grad: g,
            len: param.len() as u64,
            owned_param: Some(Box::new(param)),
            owned_grad: Some(Box::new(grad)),
        }))
    }

    /// Registers a parameter tensor by raw device addresses. Returns its index in the set.
    ///
    /// Alignment is recorded: addresses must be aligned to their element size; addresses not
    /// aligned for vector access take the (equally exact) scalar path.
    ///
    /// # Safety
    ///
    /// `t.param` and `t.grad` must point to live device allocations of at least `t.len` elements
    /// of their dtypes, in the handle's CUDA context, that stay alive (and are not freed or
    /// reused) for as long as the built set is used, and that work on them is ordered with the
    /// handle's stream. The parameter and gradient buffers must not overlap.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// use fusedreg::{cudarc::driver::DevicePtr, multi_tensor::RawTensor, DtypeKind};
    /// // A framework's buffers (kept alive by the caller for the set's lifetime).
    /// let p = s.clone_htod(&vec![1.0f32; 513]).unwrap();
    /// let g = s.alloc_zeros::<f32>(513).unwrap();
    /// let ((pp, _g1), (gp, _g2)) = (p.device_ptr(s), g.device_ptr(s));
    /// // A view starting at element 1: not 16-byte aligned, so it takes the scalar path.
    /// let t = RawTensor { param: pp + 4, grad: gp + 4, len: 512, param_dtype: DtypeKind::F32,
    ///                     grad_dtype: DtypeKind::F32 };
    /// // SAFETY: 512 elements after the offset are live, outlive the set, and use its stream.
    /// let i = unsafe { b.push_raw(t) }?;
    /// let set = b.build()?;
    /// println!("vector path: {}", set.is_vector_aligned(i)); // false
    /// # drop(set);
    /// # Ok(()) }
    /// ```
    pub unsafe fn push_raw(&mut self, t: RawTensor) -> Result<usize> {
        check_raw_address("param", t.param, t.len, t.param_dtype)?;
        check_raw_address("grad", t.grad, t.len, t.grad_dtype)?;
        self.admit(Kind::Params(t.param_dtype, t.grad_dtype))?;
        Ok(self.queue(Pending::borrowed(t.param, t.grad, t.len)))
    }

    /// Registers a zero-size parameter tensor without buffers (CUDA cannot allocate 0 bytes
    /// everywhere). It owns no chunk, so nothing ever reads or writes it. Returns its index.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// b.push(s.clone_htod(&vec![0.5f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// let i = b.push_empty::<f32, f32>()?; // e.g. a bias of a zero-width layer
    /// let set = b.build()?;
    /// println!("{:?}", set.layout().chunks(i)); // 1..1: no chunk
    /// # Ok(()) }
    /// ```
    pub fn push_empty<P: Dtype, G: Dtype>(&mut self) -> Result<usize> {
        self.admit(Kind::Params(P::KIND, G::KIND))?;
        Ok(self.queue(Pending::borrowed(0, 0, 0)))
    }

    /// Registers a zero-size gradient without a buffer, in a gradients-only set.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// b.push_grad(s.clone_htod(&vec![0.5f32; 64]).unwrap())?;
    /// b.push_grad_empty::<f32>()?;
    /// let set = b.build()?;
    /// println!("{} tensors, {} chunk", set.len(), set.layout().num_chunks()); // 2, 1
    /// # Ok(()) }
    /// ```
    pub fn push_grad_empty<G: Dtype>(&mut self) -> Result<usize> {
        self.admit(Kind::Grads(G::KIND))?;
        Ok(self.queue(Pending::borrowed(0, 0, 0)))
    }

    /// Registers a gradient only (a gradients-only set: for the global norm and the scale pass
    /// with an optimizer of your own). Takes ownership of the buffer.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// use fusedreg::global_norm::GlobalNorm;
    /// b.push_grad(s.clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// b.push_grad(s.clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// let mut set = b.build()?; // no optimizer state
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.compute(&set)?;
    /// norm.scale_grads(&mut set)?; // clipped, for an optimizer of your own
    /// # Ok(()) }
    /// ```
    pub fn push_grad<G: Dtype>(&mut self, grad: CudaSlice<G>) -> Result<usize> {
        let g = self.address("grad", &grad)?;
        self.admit(Kind::Grads(G::KIND))?;
        let len = grad.len() as u64;
        Ok(self.queue(Pending {
            owned_grad: Some(Box::new(grad)),
            ..Pending::borrowed(0, g, len)
        }))
    }

    /// Registers a gradient only, by raw device address.
    ///
    /// # Safety
    ///
    /// As [`TensorSetBuilder::push_raw`]: `grad` points to `len` live elements of `dtype` in the
    /// handle's context that outlive the set.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// use fusedreg::{cudarc::driver::DevicePtr, DtypeKind};
    /// // One flat gradient buffer of a framework, registered as two tensors of 600 and 400.
    /// let flat = s.alloc_zeros::<f32>(1000).unwrap();
    /// let (base, _guard) = flat.device_ptr(s);
    /// // SAFETY: both ranges lie in `flat`, which outlives the set and uses its stream.
    /// unsafe {
    ///     b.push_grad_raw(base, 600, DtypeKind::F32)?;
    ///     b.push_grad_raw(base + 4 * 600, 400, DtypeKind::F32)?;
    /// }
    /// let set = b.build()?;
    /// # drop(set);
    /// # Ok(()) }
    /// ```
    pub unsafe fn push_grad_raw(&mut self, grad: u64, len: u64, dtype: DtypeKind) -> Result<usize> {
        check_raw_address("grad", grad, len, dtype)?;
        self.admit(Kind::Grads(dtype))?;
        Ok(self.queue(Pending::borrowed(0, grad, len)))
    }

    fn address<T>(&self, what: &str, buf: &CudaSlice<T>) -> Result<u64> {
        let (ptr, _guard) = self.handle.read_ptr(OP, what, buf)?;
        Ok(ptr)
    }

    /// Number of tensors registered so far.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// for n in [1000, 10] {
    ///     b.push(s.alloc_zeros::<f32>(n).unwrap(), s.alloc_zeros::<f32>(n).unwrap())?;
    /// }
    /// println!("{}", b.len()); // 2
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is registered yet.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// println!("{}", b.is_empty()); // true
    /// b.push_grad(s.alloc_zeros::<f32>(16).unwrap())?;
    /// println!("{}", b.is_empty()); // false
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Builds the tables, uploads them once and returns the set. Errors on an empty list. (No
    /// optimizer state: an optimizer allocates its own, e.g. [`crate::adamw::AdamW::new`].)
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// use half::f16;
    /// let w = s.clone_htod(&vec![f16::from_f32(0.5); 4096]).unwrap();
    /// b.push(w, s.alloc_zeros::<f32>(4096).unwrap())?;
    /// let set = b.build()?; // the tables, uploaded once
    /// println!("{} chunk(s)", set.layout().num_chunks()); // 1
    /// // An empty builder has nothing to build.
    /// println!("{}", TensorSet::builder(&h).build().unwrap_err());
    /// # Ok(()) }
    /// ```
    pub fn build(self) -> Result<TensorSet> {
        let lens: Vec<u64> = self.pending.iter().map(|p| p.len).collect();
        let layout = Layout::new(&lens)?;
        let (param_dtype, grad_dtype) = match self.kind {
            Kind::Params(p, g) => (Some(p), g),
            Kind::Grads(g) => (None, g),
            Kind::Unset => unreachable!("Layout::new rejects an empty list"),
        };
        let stream = self.handle.stream().clone();

        let mut entries = Vec::with_capacity(lens.len());
        for (t, p) in self.pending.iter().enumerate() {
            entries.push(TensorEntry {
                param: p.param,
                grad: p.grad,
                n: p.len,
                flags: entry_flags(param_dtype, grad_dtype, p.param, p.grad),
                first_chunk: layout.first_chunk(t),
                num_chunks: p.len.div_ceil(CHUNK) as u32,
                pad: 0,
            });
        }
        let d_tensors = stream.clone_htod(&entries).map_err(Error::driver(OP))?;
        let blocks: Vec<BlockEntry> = if layout.num_chunks() == 0 {
            vec![BlockEntry::default()]
        } else {
            layout.blocks().to_vec()
        };
        let d_blocks = stream.clone_htod(&blocks).map_err(Error::driver(OP))?;
        let tensors_ptr = resident_addr(&self.handle, &d_tensors);
        let blocks_ptr = resident_addr(&self.handle, &d_blocks);

        let mut owned = Vec::with_capacity(self.pending.len());
        for p in self.pending {
            owned.push((p.owned_param, p.owned_grad));
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let set = TensorSet {
            handle: self.handle,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            layout,
            param_dtype,
            grad_dtype,
            entries,
            d_tensors,
            d_blocks,
            tensors_ptr,
            blocks_ptr,
            owned,
        };
        Ok(set)
    }
}

/// The alignment flags of a tensor entry: [`FLAG_VEC4`] when the parameter (if the set has
/// parameters) and the gradient are aligned for 4-element groups, [`FLAG_GRAD16`] when the
/// gradient is 16-byte aligned.
fn entry_flags(
    param_dtype: Option<DtypeKind>,
    grad_dtype: DtypeKind,
    param: u64,
    grad: u64,
) -> u32 {
    let ps = param_dtype.map_or(1, |p| p.size() as u64);
    let gs = grad_dtype.size() as u64;
    let vec4 = (param_dtype.is_none() || param % (4 * ps) == 0) && grad % (4 * gs) == 0;
    let grad16 = grad % 16 == 0;
    (if vec4 { FLAG_VEC4 } else { 0 }) | (if grad16 { FLAG_GRAD16 } else { 0 })
}

/// The device address of `s`, for a table or parameter struct that keeps it: the multi-tensor
/// tables here, the optimizer's and the norm's state. The caller owns `s` for as long as the
/// address is used, so the stream-sync guard is dropped at once.
pub(crate) fn resident_addr<T>(h: &Handle, s: &CudaSlice<T>) -> u64 {
    let (p, _g) = s.device_ptr(h.stream());
    p
}

/// Tensors registered once, with their device tables (and nothing optimizer-specific).
/// Build one with [`TensorSet::builder`]; see the [module docs](self).
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::multi_tensor::TensorSet;
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let mut b = TensorSet::builder(&h);
/// let w = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
/// let gw = s.alloc_zeros::<f32>(1000).unwrap();
/// b.push(w, gw)?;                      // weight
/// let bias = s.clone_htod(&vec![0.0f32; 10]).unwrap();
/// let gb = s.alloc_zeros::<f32>(10).unwrap();
/// b.push(bias, gb)?;                    // bias
/// let mut set = b.build()?;
/// // Each step, the backward pass writes the gradients:
/// let mut g = set.grad_mut::<f32>(0)?;
/// s.memcpy_htod(&vec![0.1f32; 1000], &mut g).unwrap();
/// # Ok(()) }
/// ```
pub struct TensorSet {
    handle: Handle,
    id: u64,
    layout: Layout,
    param_dtype: Option<DtypeKind>,
    grad_dtype: DtypeKind,
    entries: Vec<TensorEntry>,
    #[allow(dead_code)] // keeps the uploaded table alive; launches use `tensors_ptr`
    d_tensors: CudaSlice<TensorEntry>,
    #[allow(dead_code)] // as above, `blocks_ptr`
    d_blocks: CudaSlice<BlockEntry>,
    tensors_ptr: u64,
    blocks_ptr: u64,
    owned: Vec<(Option<OwnedBuf>, Option<OwnedBuf>)>,
}

impl Drop for TensorSet {
    /// Waits for the handle's stream before the buffers go: kernels launched through the set
    /// use raw addresses, so cudarc does not know they read the owned buffers, and a buffer
    /// allocated on another stream would otherwise be freed out of order with them.
    fn drop(&mut self) {
        let _ = self.handle.synchronize();
    }
}

impl std::fmt::Debug for TensorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorSet")
            .field("tensors", &self.layout.num_tensors())
            .field("chunks", &self.layout.num_chunks())
            .field("elements", &self.layout.total_elements())
            .field("param_dtype", &self.param_dtype)
            .field("grad_dtype", &self.grad_dtype)
            .finish()
    }
}

impl TensorSet {
    /// Starts a set on `handle`'s context and stream.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// let mut b = TensorSet::builder(&h);
    /// b.push_grad(h.stream().alloc_zeros::<f32>(4096).unwrap())?;
    /// let grads = b.build()?;
    /// # drop(grads);
    /// # Ok(()) }
    /// ```
    pub fn builder(handle: &Handle) -> TensorSetBuilder {
        TensorSetBuilder {
            handle: handle.clone(),
            kind: Kind::Unset,
            pending: Vec::new(),
        }
    }

    /// The handle the set launches on.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// let before = set.handle().launch_count();
    /// // ... steps over the set ...
    /// set.handle().synchronize()?;
    /// println!("{} launches", set.handle().launch_count() - before);
    /// # Ok(()) }
    /// ```
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The chunk layout.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// let l = set.layout();
    /// println!("{} chunks for {} elements", l.num_chunks(), l.total_elements()); // 2, 1010
    /// println!("tensor 1 owns chunks {:?}", l.chunks(1)); // 1..2
    /// # Ok(()) }
    /// ```
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of tensors.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// println!("{} tensors", set.len()); // 2: the weight and the bias
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.layout.num_tensors()
    }

    /// Always false: a set holds at least one tensor.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// if !set.is_empty() {
    ///     println!("{} tensors", set.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Element type of the parameters; `None` for a gradients-only set.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// match set.param_dtype() {
    ///     Some(p) => println!("{} parameters: ready for AdamW", p.name()), // f32
    ///     None => println!("gradients only"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn param_dtype(&self) -> Option<DtypeKind> {
        self.param_dtype
    }

    /// Element type of the gradients.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// use fusedreg::DtypeKind;
    /// // Pick the matching buffer type for the backward pass.
    /// if set.grad_dtype() == DtypeKind::F32 {
    ///     let g = set.grad::<f32>(0)?;
    ///     println!("{} f32 gradients", g.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn grad_dtype(&self) -> DtypeKind {
        self.grad_dtype
    }

    /// Whether tensor `i` takes the vector path in the elementwise ops (AdamW): all its buffers
    /// are aligned for 4-element groups. Misaligned tensors take the scalar path. Panics when
    /// `i >= len()` (as do the other per-tensor getters returning plain values).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// for i in 0..set.len() {
    ///     // Owned slices are always aligned: true, true.
    ///     println!("tensor {i}: vector path {}", set.is_vector_aligned(i));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_vector_aligned(&self, i: usize) -> bool {
        self.entries[i].flags & FLAG_VEC4 != 0
    }

    /// Whether tensor `i`'s gradient is 16-byte aligned (the norm's and scale pass's vector path).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// println!("{}", set.is_grad_aligned16(0)); // true: an owned slice
    /// # Ok(()) }
    /// ```
    pub fn is_grad_aligned16(&self, i: usize) -> bool {
        self.entries[i].flags & FLAG_GRAD16 != 0
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn tensors_ptr(&self) -> u64 {
        self.tensors_ptr
    }

    pub(crate) fn blocks_ptr(&self) -> u64 {
        self.blocks_ptr
    }

    pub(crate) fn num_chunks_u32(&self) -> u32 {
        self.layout.num_chunks() as u32
    }

    /// One launch of a chunk kernel over the set: `grid` blocks of `threads` (a block per chunk
    /// of the chunk table, from the `block_offset` in `params`); nothing when `grid` is 0.
    pub(crate) fn launch_chunks<P: DeviceRepr>(
        &self,
        kernel: Kernel,
        grid: u32,
        threads: u32,
        params: &P,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        self.handle
            .launch(kernel, (grid, 1, 1), (threads, 1, 1), 0, params)
    }

    fn owned<'a>(&'a self, i: usize, what: &str, which: usize) -> Result<&'a OwnedBuf> {
        let slot = self
            .owned
            .get(i)
            .ok_or_else(|| Error::invalid(OP, format!("tensor {i} does not exist")))?;
        let b = if which == 0 { &slot.0 } else { &slot.1 };
        b.as_ref().ok_or_else(|| {
            Error::invalid(
                OP,
                format!(
                    "tensor {i}'s {what} was registered by raw address or as empty (or the \
                     set has none): use your own buffer"
                ),
            )
        })
    }

    fn wrong_type(i: usize, what: &str, want: DtypeKind, have: DtypeKind) -> Error {
        Error::invalid(
            OP,
            format!(
                "tensor {i}'s {what} holds {} elements, not {}",
                have.name(),
                want.name()
            ),
        )
    }
    /// Points every tensor's gradient at a new device address, for frameworks whose backward
    /// pass returns fresh gradient buffers each step (candle's `GradStore`, PyTorch's `.grad`
    /// after `set_to_none`). `grads[i]` is tensor `i`'s new gradient address (same dtype and
    /// length as registered). The per-tensor table is re-uploaded (one small host-to-device copy
    /// on the handle's stream, ordered after every launch already queued) only when an address
    /// changed, and each tensor's alignment flags are recomputed, so a misaligned gradient takes
    /// the (equally exact) scalar path. On error nothing changes.
    ///
    /// Errors: `grads.len()` is not the number of tensors; a null address for a non-empty tensor;
    /// an address not aligned to the gradient's element size; a new address for a gradient the
    /// set owns (registered with [`TensorSetBuilder::push`] / [`TensorSetBuilder::push_grad`]:
    /// write into it with [`TensorSet::grad_mut`] instead).
    ///
    /// # Safety
    ///
    /// As [`TensorSetBuilder::push_raw`], for the new addresses: each points to a live device
    /// allocation of at least the tensor's length in elements of the set's gradient dtype, in the
    /// handle's context, not overlapping its parameter (except for a tensor that every launch
    /// skips, which never reads it), that stays alive (not freed or reused) until every launch
    /// over the set that reads it has completed on the handle's stream (buffers freed
    /// stream-ordered on that stream, as cudarc does, satisfy this), and whose writes are
    /// ordered with that stream. The set keeps the addresses after a step: any later launch
    /// over it (a [`crate::global_norm::GlobalNorm::compute`], an optimizer step) reads them
    /// again, so replace them with another call before such a launch once the buffers are gone.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::cudarc::driver::DevicePtr;
    /// use fusedreg::{multi_tensor::{RawTensor, TensorSet}, DtypeKind};
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let w = s.clone_htod(&vec![0.5f32; 1024]).unwrap();
    /// let g0 = s.alloc_zeros::<f32>(1024).unwrap();
    /// let ((p, _a), (g, _b)) = (w.device_ptr(s), g0.device_ptr(s));
    /// let mut b = TensorSet::builder(&h);
    /// let t = RawTensor { param: p, grad: g, len: 1024, param_dtype: DtypeKind::F32,
    ///                     grad_dtype: DtypeKind::F32 };
    /// // SAFETY: `w` and `g0` outlive the set and use its stream.
    /// unsafe { b.push_raw(t) }?;
    /// let mut set = b.build()?;
    /// // The next step's gradient lives in a new buffer.
    /// let g1 = s.clone_htod(&vec![0.1f32; 1024]).unwrap();
    /// let (g1p, _c) = g1.device_ptr(s);
    /// // SAFETY: `g1` stays alive until the launches that read it are done (dropped after them,
    /// // freed on the same stream).
    /// unsafe { set.set_grads_raw(&[g1p]) }?;
    /// # Ok(()) }
    /// ```
    pub unsafe fn set_grads_raw(&mut self, grads: &[u64]) -> Result<()> {
        crate::error::check_len(OP, "grads", grads.len(), self.entries.len())?;
        for (i, (&g, e)) in grads.iter().zip(&self.entries).enumerate() {
            check_raw_address(&format!("tensor {i} grad"), g, e.n, self.grad_dtype)?;
            if g != e.grad && self.owned[i].1.is_some() {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "tensor {i} owns its gradient buffer (registered with push or \
                         push_grad): write into it with grad_mut instead of replacing it"
                    ),
                ));
            }
        }
        // The new table is built aside and kept only once the device has it: a failed upload
        // leaves the host table as it was, so the next call sees the change and uploads again
        // (never a host table that disagrees with the device's).
        let mut next = self.entries.clone();
        let mut changed = false;
        for (&g, e) in grads.iter().zip(next.iter_mut()) {
            let flags = entry_flags(self.param_dtype, self.grad_dtype, e.param, g);
            changed |= e.grad != g || e.flags != flags;
            e.grad = g;
            e.flags = flags;
        }
        if changed {
            self.handle
                .stream()
                .memcpy_htod(&next, &mut self.d_tensors)
                .map_err(Error::driver(OP))?;
            // Moving the Vec keeps its heap buffer (the copy's source) where it is.
            self.entries = next;
        }
        Ok(())
    }

    /// A view of tensor `i`'s parameters (a tensor registered with [`TensorSetBuilder::push`]).
    /// For 16-bit parameters with f32 master weights, the master ([`crate::adamw::AdamW::master`])
    /// is the truth the optimizer updates; the parameters are its rounded copy.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let mut set = b.build()?;
    /// use fusedreg::adamw::{AdamW, AdamWConfig};
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.01, 0.0])?;
    /// opt.step(&mut set, None)?;
    /// let w = h.stream().clone_dtoh(&set.param::<f32>(0)?).unwrap(); // after the step
    /// // The wrong element type is an error, not a reinterpretation.
    /// println!("{}", set.param::<half::bf16>(0).unwrap_err());
    /// # drop(w);
    /// # Ok(()) }
    /// ```
    pub fn param<P: Dtype>(&self, i: usize) -> Result<CudaView<'_, P>> {
        let b = self.owned(i, "param", 0)?;
        let have = self.param_dtype.unwrap_or(self.grad_dtype);
        b.downcast_ref::<CudaSlice<P>>()
            .map(|s| s.as_view())
            .ok_or_else(|| Self::wrong_type(i, "param", P::KIND, have))
    }

    /// A view of tensor `i`'s gradient.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let set = b.build()?;
    /// let g = h.stream().clone_dtoh(&set.grad::<f32>(1)?).unwrap(); // the bias gradient
    /// println!("{:?}", &g[..4]);
    /// # Ok(()) }
    /// ```
    pub fn grad<G: Dtype>(&self, i: usize) -> Result<CudaView<'_, G>> {
        let b = self.owned(i, "grad", 1)?;
        b.downcast_ref::<CudaSlice<G>>()
            .map(|s| s.as_view())
            .ok_or_else(|| Self::wrong_type(i, "grad", G::KIND, self.grad_dtype))
    }

    /// A mutable view of tensor `i`'s gradient, for the backward pass to write. (A view, not the
    /// slice: the slice's address is in the device table and must not change.)
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::multi_tensor::TensorSet;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.0f32; 10]).unwrap(), s.alloc_zeros::<f32>(10).unwrap())?;
    /// # let mut set = b.build()?;
    /// // The backward pass writes tensor 0's gradient in place.
    /// let mut g = set.grad_mut::<f32>(0)?;
    /// h.stream().memcpy_htod(&vec![0.1f32; 1000], &mut g).unwrap();
    /// # Ok(()) }
    /// ```
    pub fn grad_mut<G: Dtype>(&mut self, i: usize) -> Result<CudaViewMut<'_, G>> {
        let have = self.grad_dtype;
        let slot = self
            .owned
            .get_mut(i)
            .ok_or_else(|| Error::invalid(OP, format!("tensor {i} does not exist")))?;
        let b = slot.1.as_mut().ok_or_else(|| {
            Error::invalid(
                OP,
                format!("tensor {i}'s grad was registered by raw address: use your own buffer"),
            )
        })?;
        b.downcast_mut::<CudaSlice<G>>()
            .map(|s| s.as_view_mut())
            .ok_or_else(|| Self::wrong_type(i, "grad", G::KIND, have))
    }
}
