//! One file per op: its `extern "C"` entry points, the options it reads, and the glue to the
//! library's CPU reference and GPU wrapper.

mod bias_act_dropout;
mod cross_entropy;
mod dropout;
mod dropout_add_norm;

pub use bias_act_dropout::*;
pub use cross_entropy::*;
pub use dropout::*;
pub use dropout_add_norm::*;

pub(crate) use cross_entropy::config as cross_entropy_config;
