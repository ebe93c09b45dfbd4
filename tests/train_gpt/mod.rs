//! The `train_gpt` example's modules (`examples/train_gpt/`) for the tests of its model and its
//! pruning (tests/candle_gpt.rs, tests/candle_prune.rs), and the small model both test.
#![allow(dead_code)] // each test file uses a subset

#[path = "../../examples/train_gpt/model.rs"]
pub mod model;
#[path = "../../examples/train_gpt/prune.rs"]
pub mod prune;
#[path = "../../examples/train_gpt/train.rs"]
pub mod train;

use model::GptConfig;

/// A model small enough for candle's CPU device, with every dropout site, drop path and label
/// smoothing on.
pub fn config() -> GptConfig {
    GptConfig {
        vocab: 256,
        layers: 3,
        hidden: 24,
        heads: 3,
        context: 16,
        mlp_ratio: 4,
        dropout: 0.1,
        attn_dropout: 0.1,
        drop_path: 0.2,
        label_smoothing: 0.1,
        layer_norm_scaling: true,
        eps: 1e-5,
    }
}
