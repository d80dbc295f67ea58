//! Where each parameter lives in the one flat parameter buffer (and, at the same offsets, in the
//! gradient and optimizer-moment buffers).
//!
//! Internal layout (differs from HF's only where one matmul beats several):
//! - linear weights are `[OC, C]` (`nn.Linear`); GPT-2's Conv1D `[C, OC]` is transposed on load;
//! - q, k, v projections are packed into one `qkv` weight `[(NH + 2·KVH)·HD, C]`;
//! - SwiGLU's gate and up projections are packed into one `fc` weight `[2·I, C]`, gate first.

use super::config::{Act, Config, Head, Norm, Pos};
use std::ops::Range;

/// One parameter tensor: its internal name, shape and place in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    /// Whether AdamW's weight decay applies (matrices yes; biases, norms no, as HF's Trainer).
    pub decay: bool,
}

/// Ranges of one transformer block's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockParams {
    pub ln1_w: Range<usize>,
    pub ln1_b: Option<Range<usize>>,
    pub qkv_w: Range<usize>,
    pub qkv_b: Option<Range<usize>>,
    pub o_w: Range<usize>,
    pub o_b: Option<Range<usize>>,
    pub ln2_w: Range<usize>,
    pub ln2_b: Option<Range<usize>>,
    pub fc_w: Range<usize>,
    pub fc_b: Option<Range<usize>>,
    pub proj_w: Range<usize>,
    pub proj_b: Option<Range<usize>>,
}

/// The whole model's parameter layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Every parameter in buffer order.
    pub params: Vec<Param>,
    pub embed: Range<usize>,
    pub pos_embed: Option<Range<usize>>,
    pub blocks: Vec<BlockParams>,
    pub lnf_w: Range<usize>,
    pub lnf_b: Option<Range<usize>>,
    /// LM head `[V, C]`; `None` when tied to `embed` or when the model has a score head.
    pub lm_head: Option<Range<usize>>,
    /// Scalar head `[1, C]`.
    pub score: Option<Range<usize>>,
    /// Total number of f32 elements.
    pub total: usize,
}

struct Builder {
    params: Vec<Param>,
    total: usize,
}

impl Builder {
    fn add(&mut self, name: String, shape: Vec<usize>, decay: bool) -> Range<usize> {
        let n: usize = shape.iter().product();
        let range = self.total..self.total + n;
        self.total += n;
        self.params.push(Param {
            name,
            shape,
            range: range.clone(),
            decay,
        });
        range
    }
    fn add_if(&mut self, on: bool, name: String, shape: Vec<usize>) -> Option<Range<usize>> {
        on.then(|| self.add(name, shape, false))
    }
}

impl Layout {
    /// The layout of a model with this configuration.
    pub fn new(cfg: &Config) -> Layout {
        let c = cfg.hidden_size;
        let qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim;
        let att = cfg.n_head * cfg.head_dim;
        let fc = match cfg.act {
            Act::Gelu => cfg.intermediate_size,
            Act::SwiGlu => 2 * cfg.intermediate_size,
        };
        let ln_bias = cfg.norm == Norm::LayerNorm;
        let mut b = Builder {
            params: vec![],
            total: 0,
        };
        let embed = b.add("embed".into(), vec![cfg.vocab_size, c], true);
        let pos_embed = match cfg.pos {
            Pos::Learned => Some(b.add("pos_embed".into(), vec![cfg.max_position, c], true)),
            Pos::Rope { .. } => None,
        };
        let blocks = (0..cfg.n_layer)
            .map(|l| {
                let p = |s: &str| format!("blocks.{l}.{s}");
                BlockParams {
                    ln1_w: b.add(p("ln1_w"), vec![c], false),
                    ln1_b: b.add_if(ln_bias, p("ln1_b"), vec![c]),
                    qkv_w: b.add(p("qkv_w"), vec![qkv, c], true),
                    qkv_b: b.add_if(cfg.qkv_bias, p("qkv_b"), vec![qkv]),
                    o_w: b.add(p("o_w"), vec![c, att], true),
                    o_b: b.add_if(cfg.o_bias, p("o_b"), vec![c]),
                    ln2_w: b.add(p("ln2_w"), vec![c], false),
                    ln2_b: b.add_if(ln_bias, p("ln2_b"), vec![c]),
                    fc_w: b.add(p("fc_w"), vec![fc, c], true),
                    fc_b: b.add_if(cfg.mlp_bias, p("fc_b"), vec![fc]),
                    proj_w: b.add(p("proj_w"), vec![c, cfg.intermediate_size], true),
                    proj_b: b.add_if(cfg.mlp_bias, p("proj_b"), vec![c]),
                }
            })
            .collect();
        let lnf_w = b.add("lnf_w".into(), vec![c], false);
        let lnf_b = b.add_if(ln_bias, "lnf_b".into(), vec![c]);
        let (lm_head, score) = match cfg.head {
            Head::Lm if cfg.tie_embeddings => (None, None),
            Head::Lm => (
                Some(b.add("lm_head".into(), vec![cfg.vocab_size, c], true)),
                None,
            ),
            Head::Score => (None, Some(b.add("score".into(), vec![1, c], true))),
        };
        Layout {
            params: b.params,
            embed,
            pos_embed,
            blocks,
            lnf_w,
            lnf_b,
            lm_head,
            score,
            total: b.total,
        }
    }

    /// The parameter with this internal name.
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The LM head's weight range: its own, or the embedding's when tied.
    pub fn lm_head_or_embed(&self) -> Range<usize> {
        self.lm_head.clone().unwrap_or_else(|| self.embed.clone())
    }
}
