//! Parameter lists of real models, shared by the benchmark report and the criterion benches.

/// One parameter tensor: name, elements, weight decay (0 for biases and norm weights).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::models::gpt2_124m;
/// let p = gpt2_124m();
/// assert_eq!((p[0].name.as_str(), p[0].elements), ("wte", 50_257 * 768));
/// // Matrices are decayed; biases and LayerNorm weights are not.
/// assert!(p.iter().filter(|t| t.name.contains("ln_")).all(|t| t.weight_decay == 0.0));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ParamShape {
    /// Name, e.g. `h0.attn.c_attn.w`.
    pub name: String,
    /// Number of elements.
    pub elements: usize,
    /// Weight decay the optimizer applies to it.
    pub weight_decay: f32,
}

fn matrix(v: &mut Vec<ParamShape>, name: String, rows: usize, cols: usize) {
    v.push(ParamShape {
        name,
        elements: rows * cols,
        weight_decay: 0.1,
    });
}

fn vector(v: &mut Vec<ParamShape>, name: String, n: usize) {
    v.push(ParamShape {
        name,
        elements: n,
        weight_decay: 0.0,
    });
}

/// GPT-2 124M as in nanoGPT: 148 tensors, 124,439,808 parameters (the tied lm_head is not
/// repeated).
///
/// # Examples
///
/// ```
/// let p = fusedreg_tools::report::models::gpt2_124m();
/// assert_eq!(p.len(), 148);
/// assert_eq!(p.iter().map(|t| t.elements).sum::<usize>(), 124_439_808);
/// ```
pub fn gpt2_124m() -> Vec<ParamShape> {
    let (d, vocab, ctx, layers) = (768, 50_257, 1024, 12);
    let mut v = Vec::new();
    matrix(&mut v, "wte".into(), vocab, d);
    matrix(&mut v, "wpe".into(), ctx, d);
    for l in 0..layers {
        vector(&mut v, format!("h{l}.ln_1.w"), d);
        vector(&mut v, format!("h{l}.ln_1.b"), d);
        matrix(&mut v, format!("h{l}.attn.c_attn.w"), d, 3 * d);
        vector(&mut v, format!("h{l}.attn.c_attn.b"), 3 * d);
        matrix(&mut v, format!("h{l}.attn.c_proj.w"), d, d);
        vector(&mut v, format!("h{l}.attn.c_proj.b"), d);
        vector(&mut v, format!("h{l}.ln_2.w"), d);
        vector(&mut v, format!("h{l}.ln_2.b"), d);
        matrix(&mut v, format!("h{l}.mlp.c_fc.w"), d, 4 * d);
        vector(&mut v, format!("h{l}.mlp.c_fc.b"), 4 * d);
        matrix(&mut v, format!("h{l}.mlp.c_proj.w"), 4 * d, d);
        vector(&mut v, format!("h{l}.mlp.c_proj.b"), d);
    }
    vector(&mut v, "ln_f.w".into(), d);
    vector(&mut v, "ln_f.b".into(), d);
    v
}

/// A Llama-like 1B model: hidden 2048, 16 layers, intermediate 5632, vocab 32000, untied
/// embeddings, RMSNorm weights: 147 tensors, 0.95B parameters.
///
/// # Examples
///
/// ```
/// assert_eq!(fusedreg_tools::report::models::llama_1b().len(), 147);
/// ```
pub fn llama_1b() -> Vec<ParamShape> {
    let (d, ff, vocab, layers) = (2048, 5632, 32_000, 16);
    let mut v = Vec::new();
    matrix(&mut v, "embed".into(), vocab, d);
    for l in 0..layers {
        vector(&mut v, format!("l{l}.input_norm"), d);
        for w in ["q", "k", "v", "o"] {
            matrix(&mut v, format!("l{l}.attn.{w}"), d, d);
        }
        vector(&mut v, format!("l{l}.post_norm"), d);
        matrix(&mut v, format!("l{l}.mlp.gate"), d, ff);
        matrix(&mut v, format!("l{l}.mlp.up"), d, ff);
        matrix(&mut v, format!("l{l}.mlp.down"), ff, d);
    }
    vector(&mut v, "norm".into(), d);
    matrix(&mut v, "lm_head".into(), vocab, d);
    v
}

/// A GPT-2-shaped list scaled down for CPU runs (hidden 96, 4 layers, vocab 1000).
///
/// # Examples
///
/// ```
/// let p = fusedreg_tools::report::models::gpt2_tiny();
/// assert_eq!(p.len(), 22);
/// assert_eq!(p.iter().map(|t| t.elements).sum::<usize>(), 515_328);
/// ```
pub fn gpt2_tiny() -> Vec<ParamShape> {
    let (d, vocab, ctx, layers) = (96, 1000, 128, 4);
    let mut v = Vec::new();
    matrix(&mut v, "wte".into(), vocab, d);
    matrix(&mut v, "wpe".into(), ctx, d);
    for l in 0..layers {
        vector(&mut v, format!("h{l}.ln_1.w"), d);
        matrix(&mut v, format!("h{l}.attn.c_attn.w"), d, 3 * d);
        vector(&mut v, format!("h{l}.attn.c_attn.b"), 3 * d);
        matrix(&mut v, format!("h{l}.mlp.c_fc.w"), d, 4 * d);
        matrix(&mut v, format!("h{l}.mlp.c_proj.w"), 4 * d, d);
    }
    v
}
