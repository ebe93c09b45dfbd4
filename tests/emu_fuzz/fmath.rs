//! `kernels/fmath.cu`: each function of `common/fmath.cuh` against `fusedreg::fmath` on random
//! f32 bit patterns (every exponent), specials, subnormals and the neighbourhoods of each
//! function's range-reduction and saturation thresholds, bit for bit.

use fusedreg::fmath;

use crate::harness::{offset, size, Data, Diffs, Reader, Rng, Stem, Writer};

#[derive(Debug)]
pub struct Case {
    grid: u64,
    block: u64,
    func: u64,
    x: Data<f32>,
    y_off: u64,
}

/// `fmath::Func` codes in the kernel.
const FUNCS: [fn(f32) -> f32; 5] = [
    fmath::exp,
    fmath::ln,
    fmath::erf,
    fmath::tanh,
    fmath::sigmoid,
];

/// Values near which the functions change branches (overflow and underflow of exp, the
/// saturation of erf, tanh and sigmoid, subnormal boundaries, 1 for ln).
const EDGES: [f32; 14] = [
    88.72284,
    -87.33655,
    -103.97208,
    0.0,
    1.0,
    0.5,
    3.92,
    9.01,
    0.55,
    4.97,
    16.0,
    88.0,
    1.1754944e-38,
    1e-45,
];

fn x(g: &mut Rng) -> f32 {
    match g.below(6) {
        0 => f32::from_bits(g.u32()),
        1 => {
            let e = g.pick(&EDGES);
            let b = (e.to_bits() as i64 + g.range(0, 16) as i64 - 8).max(0) as u32;
            let v = f32::from_bits(b);
            if g.bool() {
                -v
            } else {
                v
            }
        }
        2 => g.pick(&[
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
            f32::MAX,
            f32::MIN,
        ]),
        3 => f32::from_bits(g.u32() | 0x7f80_0001), // NaN, random sign and payload
        _ => g.f32_in(-30.0, 30.0),
    }
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        let n = size(g, &[32, 128], 4000);
        Case {
            grid: g.range(1, 4),
            block: g.pick(&[32, 128]),
            func: g.below(5),
            x: Data((0..n).map(|_| x(g)).collect()),
            y_off: offset(g, 5),
        }
    }

    fn write(c: &Case, w: &mut Writer) {
        w.u64("grid", c.grid);
        w.u64("block", c.block);
        w.u64("func", c.func);
        w.view("x", &c.x, offset_of(c));
        w.u64("y_off", c.y_off);
    }

    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        let y = r.vec::<f32>("y", c.x.len())?;
        let f = FUNCS[c.func as usize];
        let cpu: Vec<f32> = c.x.iter().map(|&v| f(v)).collect();
        let mut d = Diffs::default();
        d.bits(
            ["exp", "ln", "erf", "tanh", "sigmoid"][c.func as usize],
            &y,
            &cpu,
        );
        d.into_result()
    }
}

/// x starts where y does not: the two views are misaligned against each other.
fn offset_of(c: &Case) -> u64 {
    (c.y_off + 1) % 4
}
