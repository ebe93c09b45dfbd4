//! One `dropout_add_norm` case of the emulator's dumps: the header and the forward's inputs that
//! `run()` and `run_stats()` (`scripts/emu/cases/dropout_add_norm.cpp`, `dropout_add_norm_stats.inc`)
//! write first, read by `tests/dropout_add_norm_emu.rs` (`case*.bin`) and `tests/redundancy_emu.rs`
//! (`stats*.bin`). Flags: 1 residual, 2 beta, 4 bias, 8 row scale, 16 drop path, 32 d_s (the
//! backward cases), 64 RMSNorm, 128 / 256 16- / 8-bit keying.

use super::dan::{DanInputs, DanOut};
use super::dump::{mismatches, Rd};
use fusedreg::dropout_add_norm::{Config, DropPath, Norm};
use fusedreg::dropping::MaskResolution;
use fusedreg::Dtype;

/// A case's shape, configuration and forward inputs.
pub struct DanCase<T, S> {
    pub rows: usize,
    pub cols: usize,
    pub flags: u64,
    pub p: f64,
    pub cfg: Config,
    pub inputs: DanInputs<T, S>,
}

impl<T: Dtype, S: Dtype> DanCase<T, S> {
    /// Reads the header and the inputs (the reader then stands at the case's expected outputs).
    pub fn read(r: &mut Rd) -> Self {
        let rows = r.u64() as usize;
        let cols = r.u64() as usize;
        let flags = r.u64();
        let (seed, call, path_call, rps) = (r.u64(), r.u64(), r.u64(), r.u64() as usize);
        let p = f64::from_bits(r.u64());
        let pp = f64::from_bits(r.u64());
        let eps = f32::from_bits(r.u64() as u32);
        let ls = f32::from_bits(r.u64() as u32);
        let norm = if flags & 64 != 0 {
            Norm::RmsNorm
        } else {
            Norm::LayerNorm
        };
        let mut cfg = Config::new(rows, cols, norm, eps)
            .unwrap()
            .with_dropout(p, seed, call)
            .unwrap()
            .with_resolution(resolution_of(flags))
            .with_layer_scale(ls)
            .unwrap();
        if flags & 16 != 0 {
            let path = DropPath::new(pp, path_call)
                .unwrap()
                .per_sample(rps)
                .unwrap();
            cfg = cfg.with_drop_path(path);
        }
        let n = rows * cols;
        DanCase {
            rows,
            cols,
            flags,
            p,
            cfg,
            inputs: DanInputs {
                x: r.arr(n),
                r: (flags & 1 != 0).then(|| r.arr(n)),
                gamma: r.arr(cols),
                beta: (flags & 2 != 0).then(|| r.arr(cols)),
                bias: (flags & 4 != 0).then(|| r.arr(cols)),
                rowscale: (flags & 8 != 0).then(|| r.arr(rows)),
            },
        }
    }

    /// Reads the emulated forward's outputs that come next in the dump (out, s, mean, rstd).
    pub fn read_forward(&self, r: &mut Rd) -> DanOut<T, S> {
        let n = self.rows * self.cols;
        DanOut {
            out: r.arr(n),
            s: r.arr(n),
            mean: r.arr(self.rows),
            rstd: r.arr(self.rows),
        }
    }
}

/// The keying resolution of a dump's flags (128: 16-bit, 256: 8-bit keying).
pub fn resolution_of(flags: u64) -> MaskResolution {
    match flags & (128 | 256) {
        0 => MaskResolution::Bits32,
        128 => MaskResolution::Bits16,
        256 => MaskResolution::Bits8,
        _ => panic!("flags {flags:#x}: two resolutions"),
    }
}

/// How many elements of the CPU forward's outputs `got` differ from the emulated `want`, over
/// all four outputs (the first few of each are printed).
pub fn forward_mismatches<T: Dtype, S: Dtype>(want: &DanOut<T, S>, got: &DanOut<T, S>) -> usize {
    mismatches("s", &want.s, &got.s)
        + mismatches("mean", &want.mean, &got.mean)
        + mismatches("rstd", &want.rstd, &got.rstd)
        + mismatches("out", &want.out, &got.out)
}

/// `$check::<T, S>($name, $r)` at the x and stream dtypes a case's next two words name (0 f32,
/// 1 f16, 2 bf16; the stream is x's dtype or f32).
macro_rules! check_kinds {
    ($check:ident, $name:expr, $r:expr) => {
        match ($r.u64(), $r.u64()) {
            (0, 0) => $check::<f32, f32>($name, $r),
            (1, 1) => $check::<half::f16, half::f16>($name, $r),
            (2, 2) => $check::<half::bf16, half::bf16>($name, $r),
            (1, 0) => $check::<half::f16, f32>($name, $r),
            (2, 0) => $check::<half::bf16, f32>($name, $r),
            _ => panic!("bad kinds"),
        }
    };
}
pub(crate) use check_kinds;
