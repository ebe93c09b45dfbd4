//! The device side of [`crate::fmath`], exposed for testing and diagnostics: evaluates one
//! function of `kernels/common/fmath.cuh` over an array, so the tests can compare the device with
//! the CPU functions bit for bit.

use crate::error::{Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::Kernel;
use crate::runtime::Handle;

crate::kernel_list! {
    "fmath" => {
        [_ FmathEval] = "fmath_eval",
    }
}

/// One function of the shared math.
///
/// # Examples
///
/// ```
/// use fusedreg::fmath::gpu::Func;
/// assert_eq!(Func::Erf.cpu(0.0), 0.0);
/// assert_eq!(Func::ALL.len(), 5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    /// [`crate::fmath::exp`] / `fr_exp`.
    Exp,
    /// [`crate::fmath::ln`] / `fr_log`.
    Ln,
    /// [`crate::fmath::erf`] / `fr_erf`.
    Erf,
    /// [`crate::fmath::tanh`] / `fr_tanh`.
    Tanh,
    /// [`crate::fmath::sigmoid`] / `fr_sigmoid`.
    Sigmoid,
}

impl Func {
    /// Every function.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::fmath::gpu::Func;
    /// assert!(Func::ALL.contains(&Func::Tanh));
    /// ```
    pub const ALL: [Func; 5] = [Func::Exp, Func::Ln, Func::Erf, Func::Tanh, Func::Sigmoid];

    /// The CPU function.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::fmath::{self, gpu::Func};
    /// assert_eq!(Func::Tanh.cpu(0.3), fmath::tanh(0.3));
    /// ```
    pub fn cpu(self, x: f32) -> f32 {
        match self {
            Func::Exp => super::exp(x),
            Func::Ln => super::ln(x),
            Func::Erf => super::erf(x),
            Func::Tanh => super::tanh(x),
            Func::Sigmoid => super::sigmoid(x),
        }
    }

    /// The kernel's function code (`FMATH_*` in `kernels/fmath.cu`).
    fn code(self) -> u32 {
        match self {
            Func::Exp => 0,
            Func::Ln => 1,
            Func::Erf => 2,
            Func::Tanh => 3,
            Func::Sigmoid => 4,
        }
    }
}

device_params! {
    struct FmathEvalParams(32) {
        x: u64,
        y: u64,
        n: u64,
        func: u32,
        pad: u32,
    }
}

const OP: &str = "fmath";
const BLOCK: u32 = 256;

/// `f(x[i])` for every `i`, computed on the device by `kernels/fmath.cu`.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::fmath::gpu::{eval, Func};
/// let h = fusedreg::Handle::new(0)?;
/// let y = eval(&h, Func::Exp, &[0.5, -3.0])?;
/// assert_eq!(y[1].to_bits(), fusedreg::fmath::exp(-3.0).to_bits());
/// # Ok(()) }
/// ```
pub fn eval(handle: &Handle, func: Func, x: &[f32]) -> Result<Vec<f32>> {
    if x.is_empty() {
        return Ok(Vec::new());
    }
    let s = handle.stream();
    let d_x = s.clone_htod(x).map_err(Error::driver(OP))?;
    let mut d_y = s.alloc_zeros::<f32>(x.len()).map_err(Error::driver(OP))?;
    {
        let (xp, _g1) = handle.read_ptr(OP, "x", &d_x)?;
        let (yp, _g2) = handle.write_ptr(OP, "y", &mut d_y)?;
        let p = FmathEvalParams {
            x: xp,
            y: yp,
            n: x.len() as u64,
            func: func.code(),
            pad: 0,
        };
        handle.launch_strided(Kernel::FmathEval, x.len() as u64, BLOCK, &p)?;
    }
    handle.to_host(OP, &d_y)
}
