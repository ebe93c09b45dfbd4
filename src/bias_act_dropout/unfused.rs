//! The unfused baseline, the way PyTorch eager runs `dropout(act(x + bias))`, and its CPU mirror.
//! The benchmarks compare the fused op with this.
//!
//! Forward, three kernels, each reading its inputs from and writing its output to device memory
//! in `T`: bias add `h = T(x + b)` (kept: eager saves it for the activation's backward),
//! activation `a = T(act(h))`, dropout `y = keep ? T(a * scale) : 0` writing a 1-byte mask
//! (1 = kept). Backward, three kernels: masked scale `g = mask ? T(dy * scale) : 0`, activation
//! gradient `dx = T(g * act'(h))`, and with dbias a column sum of the rounded `dx` in row order
//! (one thread per column; no atomics, so it is deterministic too). That column sum is a naive
//! kernel (6.8 ms for [16384, 4096] on an H200, where PyTorch's reduction takes a fraction of
//! that): compare backward timings without dbias, or move it to the shared two-stage column sum
//! of `kernels/common/dropping.cuh` before quoting a backward speed-up.
//!
//! The activations and the mask are the fused op's exact mode (the same [`super::Activation`]
//! arithmetic, whatever [`super::Config::math`] says, and the 32-bit Philox keying for every
//! dtype: a config with an explicit [`crate::dropping::MaskResolution::Bits16`] or `Bits8` is
//! refused with an error), so the byte mask equals the fused op's keep bits at 32-bit keys (the
//! fused op's f32 default; at f16/bf16 its default is 16-bit keys, another mask). Because
//! every kernel rounds to `T`, the results are not bitwise equal to the fused op in 16-bit types
//! (for f32 the forward is): [`forward_cpu`] and [`backward_cpu`] mirror this path exactly (the
//! GPU tests compare with them bit for bit).
//!
//! ```
//! use fusedreg::bias_act_dropout::{cpu, unfused, Activation, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(4, 8, Activation::GeluErf, 0.1, 42, 7)?;
//! let x: Vec<f32> = (0..32).map(|i| i as f32 / 16.0 - 1.0).collect();
//! let b = vec![0.5f32; 8];
//! let (mut y, mut mask, mut h) = (vec![0.0f32; 32], vec![0u8; 32], vec![0.0f32; 32]);
//! unfused::forward_cpu(&cfg, &x, &b, &mut y, &mut mask, &mut h)?;
//! let mut fused = vec![0.0f32; 32];
//! cpu::forward(&cfg, &x, Some(&b), &mut fused, None)?;
//! assert_eq!(y, fused); // f32: the same bits
//! assert!((0..32).all(|i| (mask[i] == 1) == cfg.keeps(fusedreg::DtypeKind::F32, i as u64)));
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaViewMut, DevicePtr, DevicePtrMut};

use super::gpu::{ACT, ACT_GRAD, BIAS_ADD, COL_SUM, DROPOUT, MASKED_SCALE};
use super::{Config, OP};
use crate::dropping::unfused::check_masked_backward;
use crate::dtype::Dtype;
use crate::error::{check_len, Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::KernelFamily;
use crate::runtime::{grid_for, Handle};

device_params! {
    /// Mirrors `BiasActDropoutUnfusedParams` in the kernel.
    #[derive(Debug, Default)]
    struct Params(80) {
        a: u64,
        b: u64,
        out: u64,
        mask: u64,
        n: u64,
        cols: u64,
        seed: u64,
        call: u64,
        threshold: u64,
        scale: f32,
        act: u32,
    }
}

const BLOCK: u32 = 256;

/// The forward's checks (the launch wrapper's and the CPU mirror's): 32-bit keying, as the
/// baseline's byte masks are drawn, and the lengths of `x`, `bias`, `y`, `mask` and `h`.
fn check_forward(
    cfg: &Config,
    x: usize,
    bias: usize,
    y: usize,
    mask: usize,
    h: usize,
) -> Result<()> {
    cfg.keys.keying_bits32(OP)?;
    let n = cfg.len();
    check_len(OP, "x", x, n)?;
    check_len(OP, "bias (one per column)", bias, cfg.cols())?;
    check_len(OP, "y", y, n)?;
    check_len(OP, "mask (bytes)", mask, n)?;
    check_len(OP, "h", h, n)
}

/// The backward's length checks (the launch wrapper's and the CPU mirror's): `h`, then those of
/// every masked backward.
fn check_backward(
    cfg: &Config,
    dy: usize,
    mask: usize,
    h: usize,
    dx: usize,
    dbias: Option<usize>,
) -> Result<()> {
    check_len(OP, "h", h, cfg.len())?;
    check_masked_backward(OP, (cfg.len(), cfg.cols()), dy, mask, dx, dbias)
}

fn params(cfg: &Config) -> Params {
    Params {
        n: cfg.len() as u64,
        cols: cfg.cols() as u64,
        seed: cfg.seed(),
        call: cfg.call(),
        threshold: cfg.rate().threshold(),
        scale: cfg.rate().scale(),
        act: cfg.act().code(),
        ..Default::default()
    }
}

fn launch<T: Dtype>(handle: &Handle, family: KernelFamily, n: u64, p: &Params) -> Result<()> {
    handle.launch(
        family.get::<T>(),
        (grid_for(n, BLOCK), 1, 1),
        (BLOCK, 1, 1),
        0,
        p,
    )
}

/// The unfused forward on the GPU: `h = T(x + bias)`, `a = T(act(h))` (a temporary),
/// `y = dropout(a)` and the byte mask.
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config; driver errors.
///
/// ```no_run
/// use fusedreg::bias_act_dropout::{unfused, Activation, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(16, 64, Activation::GeluTanh, 0.1, 42, 7)?;
/// let s = h.stream();
/// let x = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
/// let b = s.clone_htod(&vec![0.0f32; cfg.cols()]).unwrap();
/// let mut y = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut mask = s.alloc_zeros::<u8>(cfg.len()).unwrap();
/// let mut pre = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// unfused::forward(&h, &cfg, &x, &b, &mut y, &mut mask, &mut pre)?;
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: &impl DevicePtr<T>,
    bias: &impl DevicePtr<T>,
    y: &mut impl DevicePtrMut<T>,
    mask: &mut impl DevicePtrMut<u8>,
    h: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    check_forward(cfg, x.len(), bias.len(), y.len(), mask.len(), h.len())?;
    let n = cfg.len();
    if n == 0 {
        return Ok(());
    }
    // SAFETY: the activation kernel writes every element before the dropout kernel reads it.
    let mut a = unsafe { handle.stream().alloc::<T>(n) }.map_err(Error::driver(OP))?;
    let (x_ptr, _g1) = handle.read_ptr(OP, "x", x)?;
    let (b_ptr, _g2) = handle.read_ptr(OP, "bias", bias)?;
    let (y_ptr, _g3) = handle.write_ptr(OP, "y", y)?;
    let (m_ptr, _g4) = handle.write_ptr(OP, "mask", mask)?;
    let (h_ptr, _g5) = handle.write_ptr(OP, "h", h)?;
    let (a_ptr, _g6) = handle.write_ptr(OP, "temporary", &mut a)?;
    let base = params(cfg);
    launch::<T>(
        handle,
        BIAS_ADD,
        n as u64,
        &Params {
            a: x_ptr,
            b: b_ptr,
            out: h_ptr,
            ..base
        },
    )?;
    launch::<T>(
        handle,
        ACT,
        n as u64,
        &Params {
            a: h_ptr,
            out: a_ptr,
            ..base
        },
    )?;
    launch::<T>(
        handle,
        DROPOUT,
        n as u64,
        &Params {
            a: a_ptr,
            out: y_ptr,
            mask: m_ptr,
            ..base
        },
    )?;
    Ok(())
}

/// The unfused backward on the GPU: `g = mask ? T(dy * scale) : 0` (a temporary),
/// `dx = T(g * act'(h))`, and with `dbias` the column sums of `dx` in row order.
///
/// Errors: as [`forward`].
///
/// ```no_run
/// use fusedreg::bias_act_dropout::{unfused, Activation, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(16, 64, Activation::GeluTanh, 0.1, 42, 7)?;
/// let s = h.stream();
/// let dy = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
/// let mask = s.clone_htod(&vec![1u8; cfg.len()]).unwrap();
/// let pre = s.clone_htod(&vec![0.5f32; cfg.len()]).unwrap();
/// let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut db = s.alloc_zeros::<f32>(cfg.cols()).unwrap();
/// unfused::backward(&h, &cfg, &dy, &mask, &pre, &mut dx, Some(db.as_view_mut()))?;
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    dy: &impl DevicePtr<T>,
    mask: &impl DevicePtr<u8>,
    h: &impl DevicePtr<T>,
    dx: &mut impl DevicePtrMut<T>,
    mut dbias: Option<CudaViewMut<'_, T>>,
) -> Result<()> {
    let n = cfg.len();
    let db_len = dbias.as_ref().map(|d| d.len());
    check_backward(cfg, dy.len(), mask.len(), h.len(), dx.len(), db_len)?;
    let base = params(cfg);
    let (db_ptr, _gdb) = handle.write_opt(OP, "dbias", dbias.as_mut())?;
    if n > 0 {
        // SAFETY: the masked-scale kernel writes every element before the next kernel reads it.
        let mut g = unsafe { handle.stream().alloc::<T>(n) }.map_err(Error::driver(OP))?;
        let (dy_ptr, _g1) = handle.read_ptr(OP, "dy", dy)?;
        let (m_ptr, _g2) = handle.read_ptr(OP, "mask", mask)?;
        let (h_ptr, _g3) = handle.read_ptr(OP, "h", h)?;
        let (dx_ptr, _g4) = handle.write_ptr(OP, "dx", dx)?;
        let (g_ptr, _g5) = handle.write_ptr(OP, "temporary", &mut g)?;
        launch::<T>(
            handle,
            MASKED_SCALE,
            n as u64,
            &Params {
                a: dy_ptr,
                b: m_ptr,
                out: g_ptr,
                ..base
            },
        )?;
        launch::<T>(
            handle,
            ACT_GRAD,
            n as u64,
            &Params {
                a: g_ptr,
                b: h_ptr,
                out: dx_ptr,
                ..base
            },
        )?;
        if db_ptr != 0 {
            launch::<T>(
                handle,
                COL_SUM,
                cfg.cols() as u64,
                &Params {
                    a: dx_ptr,
                    out: db_ptr,
                    ..base
                },
            )?;
        }
    } else if db_ptr != 0 && cfg.cols() > 0 {
        // No rows: zero column sums (the kernel reads nothing).
        launch::<T>(
            handle,
            COL_SUM,
            cfg.cols() as u64,
            &Params {
                out: db_ptr,
                ..base
            },
        )?;
    }
    Ok(())
}

/// CPU mirror of [`forward`], bit for bit.
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config.
///
/// # Examples
///
/// ```
/// use fusedreg::bias_act_dropout::{unfused, Activation, Config};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1, 2, Activation::Relu, 0.0, 1, 2)?;
/// let x = [bf16::from_f32(1.0), bf16::from_f32(-1.0)];
/// let b = [bf16::from_f32(0.5); 2];
/// let (mut y, mut m, mut h) = ([bf16::ZERO; 2], [0u8; 2], [bf16::ZERO; 2]);
/// unfused::forward_cpu(&cfg, &x, &b, &mut y, &mut m, &mut h)?;
/// assert_eq!((y[0].to_f32(), y[1].to_f32(), m), (1.5, 0.0, [1, 1]));
/// # Ok(()) }
/// ```
pub fn forward_cpu<T: Dtype>(
    cfg: &Config,
    x: &[T],
    bias: &[T],
    y: &mut [T],
    mask: &mut [u8],
    h: &mut [T],
) -> Result<()> {
    check_forward(cfg, x.len(), bias.len(), y.len(), mask.len(), h.len())?;
    let n = cfg.len();
    let keying = cfg.keys.keying_bits32(OP)?;
    let scale = keying.scale();
    let mut bits = keying.keep_bits();
    for i in 0..n {
        h[i] = T::from_f32_rn(x[i].to_f32() + bias[i % cfg.cols()].to_f32());
        let a = T::from_f32_rn(cfg.act().forward(h[i].to_f32()));
        let keep = bits.get(i as u64);
        mask[i] = u8::from(keep);
        y[i] = T::from_f32_rn(if keep { a.to_f32() * scale } else { 0.0 });
    }
    Ok(())
}

/// CPU mirror of [`backward`], bit for bit.
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config.
///
/// # Examples
///
/// ```
/// use fusedreg::bias_act_dropout::{unfused, Activation, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 1, Activation::Relu, 0.5, 1, 2)?;
/// let (dy, mask, h) = ([1.0f32, 1.0], [1u8, 0], [3.0f32, 3.0]);
/// let (mut dx, mut db) = ([0.0f32; 2], [0.0f32; 1]);
/// unfused::backward_cpu(&cfg, &dy, &mask, &h, &mut dx, Some(&mut db))?;
/// assert_eq!((dx, db), ([2.0, 0.0], [2.0]));
/// # Ok(()) }
/// ```
pub fn backward_cpu<T: Dtype>(
    cfg: &Config,
    dy: &[T],
    mask: &[u8],
    h: &[T],
    dx: &mut [T],
    dbias: Option<&mut [T]>,
) -> Result<()> {
    let n = cfg.len();
    let db_len = dbias.as_ref().map(|d| d.len());
    check_backward(cfg, dy.len(), mask.len(), h.len(), dx.len(), db_len)?;
    let scale = cfg.rate().scale();
    for i in 0..n {
        let g = T::from_f32_rn(if mask[i] != 0 {
            dy[i].to_f32() * scale
        } else {
            0.0
        });
        dx[i] = T::from_f32_rn(g.to_f32() * cfg.act().grad(h[i].to_f32()));
    }
    if let Some(db) = dbias {
        for (c, d) in db.iter_mut().enumerate() {
            let mut s = 0.0f32;
            for row in 0..cfg.rows() {
                s += dx[row * cfg.cols() + c].to_f32();
            }
            *d = T::from_f32_rn(s);
        }
    }
    Ok(())
}
