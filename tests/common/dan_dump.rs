//! One `dropout_add_norm` case of the emulator's dumps: the header and the forward's inputs that
//! `run()` and `run_stats()` (`scripts/emu/cases/dropout_add_norm.cpp`, `dropout_add_norm_stats.inc`)
//! write first, read by `tests/dropout_add_norm_emu.rs` (`case*.bin`) and `tests/redundancy_emu.rs`
//! (`stats*.bin`). Flags: 1 residual, 2 beta, 4 bias, 8 row scale, 16 drop path, 32 d_s (the
//! backward cases), 64 RMSNorm, 128 / 256 16- / 8-bit keying.

use super::dump::Rd;
use fusedreg::dropout_add_norm::{cpu, Config, DropPath, Norm};
use fusedreg::dropping::MaskResolution;
use fusedreg::Dtype;

/// A case's shape, configuration and forward inputs.
pub struct DanCase<T, S> {
    pub rows: usize,
    pub cols: usize,
    pub flags: u64,
    pub p: f64,
    pub cfg: Config,
    pub x: Vec<T>,
    pub residual: Option<Vec<S>>,
    pub gamma: Vec<T>,
    pub beta: Option<Vec<T>>,
    pub bias: Option<Vec<T>>,
    pub rowscale: Option<Vec<f32>>,
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
            x: r.arr(n),
            residual: (flags & 1 != 0).then(|| r.arr(n)),
            gamma: r.arr(cols),
            beta: (flags & 2 != 0).then(|| r.arr(cols)),
            bias: (flags & 4 != 0).then(|| r.arr(cols)),
            rowscale: (flags & 8 != 0).then(|| r.arr(rows)),
        }
    }

    /// The CPU forward's arguments for these inputs.
    pub fn forward_args(&self) -> cpu::ForwardArgs<'_, T, S> {
        cpu::ForwardArgs {
            residual: self.residual.as_deref(),
            beta: self.beta.as_deref(),
            bias: self.bias.as_deref(),
            rowscale: self.rowscale.as_deref(),
            ..cpu::ForwardArgs::new(&self.x, &self.gamma)
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
