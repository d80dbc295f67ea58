//! The transformer, top to bottom: embed, blocks, final norm, heads. Forward saves what backward
//! needs; backward consumes it in mirror order. Written once against [`ModelOps`], so every
//! backend runs the same model code.
//!
//! Shapes: `N = B·T` token rows, `C` hidden, `QKV = (NH + 2·KVH)·HD`, `A = NH·HD`, `F` the
//! MLP's first projection (I for GELU, 2I for SwiGLU), `I` the MLP inner width, `V` vocabulary.

use super::config::{Act, Config, Head, Norm, Pos};
use super::layout::{BlockParams, Layout};
use super::pool::BufPool;
use crate::backend::{AttnShape, DecodeOps, ModelOps};
use crate::{Error, Result};
use std::ops::Range;

/// A batch of token rows, padded to one length `t`, with a mask and HF-style position ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    /// `B·T` token ids (pad positions hold the pad id).
    pub ids: Vec<u32>,
    /// `B·T` flags: true for real tokens.
    pub mask: Vec<bool>,
    /// `B·T` position ids: `cumsum(mask) - 1`, and 1 at pad positions, as transformers computes
    /// them, so left-padded rows get the positions they would have alone.
    pub pos: Vec<u32>,
}

/// Which side padding goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pad {
    /// Training batches: tokens first, padding after.
    Right,
    /// Generation: padding first, so every row's last token is at the same column.
    Left,
}

impl Batch {
    /// Pads `rows` to the longest one with `pad_id`.
    pub fn new(rows: &[Vec<u32>], pad_id: u32, side: Pad) -> Batch {
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let b = rows.len();
        let mut ids = vec![pad_id; b * t];
        let mut mask = vec![false; b * t];
        for (r, row) in rows.iter().enumerate() {
            let start = match side {
                Pad::Right => 0,
                Pad::Left => t - row.len(),
            };
            ids[r * t + start..r * t + start + row.len()].copy_from_slice(row);
            mask[r * t + start..r * t + start + row.len()].fill(true);
        }
        let pos = positions(&mask, t);
        Batch {
            b,
            t,
            ids,
            mask,
            pos,
        }
    }

    /// Number of token rows, `B·T`.
    pub fn n(&self) -> usize {
        self.b * self.t
    }
}

/// HF position ids from a mask: `cumsum(mask) - 1`, with 1 at pad positions.
pub fn positions(mask: &[bool], t: usize) -> Vec<u32> {
    let mut pos = vec![0u32; mask.len()];
    for (row_m, row_p) in mask.chunks(t.max(1)).zip(pos.chunks_mut(t.max(1))) {
        let mut count = 0u32;
        for (m, p) in row_m.iter().zip(row_p.iter_mut()) {
            count += *m as u32;
            *p = if *m { count - 1 } else { 1 };
        }
    }
    pos
}

/// What one block's forward saves for its backward.
struct BlockActs<B: ModelOps> {
    /// Block input, the residual stream (N, C).
    x: B::Buf,
    ln1: B::Buf,
    ln1_mean: B::Buf,
    ln1_rstd: B::Buf,
    /// q, k, v after RoPE (N, QKV).
    qkv: B::Buf,
    /// Attention output before the output projection (N, A).
    att: B::Buf,
    lse: B::Buf,
    /// Residual after attention (N, C).
    x_mid: B::Buf,
    ln2: B::Buf,
    ln2_mean: B::Buf,
    ln2_rstd: B::Buf,
    /// First MLP projection (N, F).
    fc: B::Buf,
    /// MLP activation (N, I).
    act: B::Buf,
}

/// Everything a forward pass saves, and the final hidden states it produced.
pub struct Activations<B: ModelOps> {
    blocks: Vec<BlockActs<B>>,
    /// Residual stream after the last block (N, C).
    x_out: B::Buf,
    lnf_mean: B::Buf,
    lnf_rstd: B::Buf,
    /// Final normalised hidden states (N, C): the heads' input.
    pub hidden: B::Buf,
    /// The batch's ids, mask and positions, kept for backward.
    batch: Batch,
}

/// A transformer: its configuration, parameter layout and flat parameter buffer.
pub struct Model<B: ModelOps> {
    pub cfg: Config,
    pub layout: Layout,
    pub params: B::Buf,
    /// Activation buffers handed back by [`Model::recycle`], reused by the next pass.
    pool: BufPool<B>,
}

impl<B: ModelOps> Model<B> {
    /// A model with the given parameters (a flat buffer in `layout` order).
    pub fn new(be: &B, cfg: Config, params: &[f32]) -> Result<Model<B>> {
        let layout = Layout::new(&cfg);
        if params.len() != layout.total {
            return Err(Error::Invalid(format!(
                "parameter buffer has {} values, the configuration needs {}",
                params.len(),
                layout.total
            )));
        }
        Ok(Model {
            cfg,
            layout,
            params: be.upload(params),
            pool: BufPool::default(),
        })
    }

    fn p<'a>(&'a self, be: &B, r: &Range<usize>) -> B::View<'a> {
        be.view(&self.params, r.clone())
    }

    fn po<'a>(&'a self, be: &B, r: &Option<Range<usize>>) -> Option<B::View<'a>> {
        r.as_ref().map(|r| be.view(&self.params, r.clone()))
    }

    fn attn_shape(&self, batch: &Batch) -> AttnShape {
        AttnShape {
            b: batch.b,
            t: batch.t,
            n_head: self.cfg.n_head,
            n_kv_head: self.cfg.n_kv_head,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Checks that every id fits the embedding and every position the position table.
    pub fn check_batch(&self, batch: &Batch) -> Result<()> {
        let rows = self.cfg.vocab_size;
        if let Some(&id) = batch.ids.iter().find(|&&id| id as usize >= rows) {
            return Err(Error::TokenOutOfRange { id, rows });
        }
        if self.cfg.pos == Pos::Learned {
            if let Some(&p) = batch.pos.iter().max() {
                if p as usize >= self.cfg.max_position {
                    return Err(Error::Invalid(format!(
                        "a sequence of {} tokens exceeds the model's {} positions",
                        p + 1,
                        self.cfg.max_position
                    )));
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn norm_forward(
        &self,
        be: &B,
        out: &mut B::Buf,
        mean: &mut B::Buf,
        rstd: &mut B::Buf,
        inp: &B::Buf,
        w: &Range<usize>,
        b: &Option<Range<usize>>,
        n: usize,
    ) {
        let (c, eps) = (self.cfg.hidden_size, self.cfg.norm_eps);
        match self.cfg.norm {
            Norm::LayerNorm => be.layernorm_forward(
                be.all_mut(out),
                be.all_mut(mean),
                be.all_mut(rstd),
                be.all(inp),
                self.p(be, w),
                self.p(be, b.as_ref().expect("LayerNorm has a bias")),
                n,
                c,
                eps,
            ),
            Norm::RmsNorm => be.rmsnorm_forward(
                be.all_mut(out),
                be.all_mut(rstd),
                be.all(inp),
                self.p(be, w),
                n,
                c,
                eps,
            ),
        }
    }

    /// `dinp += ∂/∂inp`, and the norm's weight (and bias) gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        be: &B,
        grads: &mut B::Buf,
        dinp: &mut B::Buf,
        dout: &B::Buf,
        inp: &B::Buf,
        mean: &B::Buf,
        rstd: &B::Buf,
        w: &Range<usize>,
        b: &Option<Range<usize>>,
        n: usize,
    ) {
        let c = self.cfg.hidden_size;
        match self.cfg.norm {
            Norm::LayerNorm => be.layernorm_backward(
                be.all_mut(dinp),
                be.view_mut(grads, w.clone()),
                be.all(dout),
                be.all(inp),
                self.p(be, w),
                be.all(mean),
                be.all(rstd),
                n,
                c,
            ),
            Norm::RmsNorm => be.rmsnorm_backward(
                be.all_mut(dinp),
                be.view_mut(grads, w.clone()),
                be.all(dout),
                be.all(inp),
                self.p(be, w),
                be.all(rstd),
                n,
                c,
            ),
        }
        if let Some(b) = b {
            be.bias_backward(be.view_mut(grads, b.clone()), be.all(dout), n, c);
        }
    }

    /// `out = inp · wᵀ + b` for an `out` of `n × oc` from the pool.
    fn linear(
        &self,
        be: &B,
        inp: &B::Buf,
        w: &Range<usize>,
        b: &Option<Range<usize>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> B::Buf {
        let mut out = self.pool.take(be, n * oc);
        self.linear_into(be, &mut out, inp, w, b, n, c, oc);
        out
    }

    /// `out = inp · wᵀ + b` into an existing `n × oc` buffer.
    #[allow(clippy::too_many_arguments)]
    fn linear_into(
        &self,
        be: &B,
        out: &mut B::Buf,
        inp: &B::Buf,
        w: &Range<usize>,
        b: &Option<Range<usize>>,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        be.matmul_forward(
            be.all_mut(out),
            be.all(inp),
            self.p(be, w),
            self.po(be, b),
            n,
            c,
            oc,
        );
    }

    /// Backward of [`Self::linear`]: returns `dinp` (from the pool) and adds the weight and bias
    /// gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        be: &B,
        grads: &mut B::Buf,
        dout: &B::Buf,
        inp: &B::Buf,
        w: &Range<usize>,
        b: &Option<Range<usize>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> B::Buf {
        let mut dinp = self.pool.take_zeroed(be, n * c);
        be.matmul_backward(
            Some(be.all_mut(&mut dinp)),
            be.view_mut(grads, w.clone()),
            be.all(dout),
            be.all(inp),
            self.p(be, w),
            n,
            c,
            oc,
        );
        if let Some(b) = b {
            be.bias_backward(be.view_mut(grads, b.clone()), be.all(dout), n, oc);
        }
        dinp
    }

    fn mlp_widths(&self) -> (usize, usize) {
        let i = self.cfg.intermediate_size;
        match self.cfg.act {
            Act::Gelu => (i, i),
            Act::SwiGlu => (2 * i, i),
        }
    }

    /// Token embeddings of `ids`, plus learned position embeddings of `pos` where the model has
    /// them, into `x` (one row per id).
    fn embed(&self, be: &B, x: &mut B::Buf, ids: &[u32], pos: &[u32]) {
        let (l, c) = (&self.layout, self.cfg.hidden_size);
        be.embedding_forward(be.all_mut(x), self.p(be, &l.embed), ids, c, false);
        if let Some(pe) = &l.pos_embed {
            be.embedding_forward(be.all_mut(x), self.p(be, pe), pos, c, true);
        }
    }

    /// The MLP's activation of `n` rows of `fc` into `act`.
    fn act_forward(&self, be: &B, act: &mut B::Buf, fc: &B::Buf, n: usize) {
        match self.cfg.act {
            Act::Gelu => be.gelu_forward(be.all_mut(act), be.all(fc)),
            Act::SwiGlu => {
                let i = self.cfg.intermediate_size;
                be.swiglu_forward(be.all_mut(act), be.all(fc), n, i)
            }
        }
    }

    fn rope_theta(&self) -> Option<f32> {
        match self.cfg.pos {
            Pos::Rope { theta } => Some(theta),
            Pos::Learned => None,
        }
    }

    /// Runs the model over a batch and returns the saved activations, whose `hidden` field holds
    /// the final normalised hidden states (N, C).
    pub fn forward(&self, be: &B, batch: &Batch) -> Result<Activations<B>> {
        self.check_batch(batch)?;
        let cfg = &self.cfg;
        let (n, c) = (batch.n(), cfg.hidden_size);
        let shape = self.attn_shape(batch);
        let (qkv_w, a) = (shape.qkv_width(), shape.out_width());
        let (f, i) = self.mlp_widths();
        let l = &self.layout;

        let mut x = self.pool.take(be, n * c);
        self.embed(be, &mut x, &batch.ids, &batch.pos);

        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for bp in &l.blocks {
            let (mut ln1, mut ln1_mean, mut ln1_rstd) = (
                self.pool.take(be, n * c),
                self.pool.take(be, n),
                self.pool.take(be, n),
            );
            self.norm_forward(
                be,
                &mut ln1,
                &mut ln1_mean,
                &mut ln1_rstd,
                &x,
                &bp.ln1_w,
                &bp.ln1_b,
                n,
            );
            let mut qkv = self.linear(be, &ln1, &bp.qkv_w, &bp.qkv_b, n, c, qkv_w);
            if let Some(theta) = self.rope_theta() {
                be.rope_forward(be.all_mut(&mut qkv), &batch.pos, shape, theta);
            }
            let (mut att, mut lse) = (
                self.pool.take(be, n * a),
                self.pool.take(be, batch.b * cfg.n_head * batch.t),
            );
            be.attention_forward(
                be.all_mut(&mut att),
                be.all_mut(&mut lse),
                be.all(&qkv),
                &batch.mask,
                shape,
            );
            let o = self.linear(be, &att, &bp.o_w, &bp.o_b, n, a, c);
            let mut x_mid = self.pool.take(be, n * c);
            be.add(be.all_mut(&mut x_mid), be.all(&x), be.all(&o));
            self.pool.put([o]);

            let (mut ln2, mut ln2_mean, mut ln2_rstd) = (
                self.pool.take(be, n * c),
                self.pool.take(be, n),
                self.pool.take(be, n),
            );
            self.norm_forward(
                be,
                &mut ln2,
                &mut ln2_mean,
                &mut ln2_rstd,
                &x_mid,
                &bp.ln2_w,
                &bp.ln2_b,
                n,
            );
            let fc = self.linear(be, &ln2, &bp.fc_w, &bp.fc_b, n, c, f);
            let mut act = self.pool.take(be, n * i);
            self.act_forward(be, &mut act, &fc, n);
            let proj = self.linear(be, &act, &bp.proj_w, &bp.proj_b, n, i, c);
            let mut x_next = self.pool.take(be, n * c);
            be.add(be.all_mut(&mut x_next), be.all(&x_mid), be.all(&proj));
            self.pool.put([proj]);

            blocks.push(BlockActs {
                x,
                ln1,
                ln1_mean,
                ln1_rstd,
                qkv,
                att,
                lse,
                x_mid,
                ln2,
                ln2_mean,
                ln2_rstd,
                fc,
                act,
            });
            x = x_next;
        }
        let (mut hidden, mut lnf_mean, mut lnf_rstd) = (
            self.pool.take(be, n * c),
            self.pool.take(be, n),
            self.pool.take(be, n),
        );
        self.norm_forward(
            be,
            &mut hidden,
            &mut lnf_mean,
            &mut lnf_rstd,
            &x,
            &l.lnf_w,
            &l.lnf_b,
            n,
        );
        Ok(Activations {
            blocks,
            x_out: x,
            lnf_mean,
            lnf_rstd,
            hidden,
            batch: batch.clone(),
        })
    }

    /// Backpropagates `dhidden` (N, C), the loss gradient w.r.t. `acts.hidden`, through the
    /// model, adding every parameter's gradient into `grads` (a flat buffer in layout order).
    pub fn backward(&self, be: &B, acts: &Activations<B>, dhidden: &B::Buf, grads: &mut B::Buf) {
        let cfg = &self.cfg;
        let batch = &acts.batch;
        let (n, c) = (batch.n(), cfg.hidden_size);
        let shape = self.attn_shape(batch);
        let (qkv_w, a) = (shape.qkv_width(), shape.out_width());
        let (f, i) = self.mlp_widths();
        let l = &self.layout;

        // dx: gradient w.r.t. the residual stream, flowing down through the blocks.
        let mut dx = self.pool.take_zeroed(be, n * c);
        self.norm_backward(
            be,
            grads,
            &mut dx,
            dhidden,
            &acts.x_out,
            &acts.lnf_mean,
            &acts.lnf_rstd,
            &l.lnf_w,
            &l.lnf_b,
            n,
        );

        for (bp, s) in l.blocks.iter().zip(&acts.blocks).rev() {
            // MLP: x_next = x_mid + proj(act(fc(ln2(x_mid)))).
            let dact =
                self.linear_backward(be, grads, &dx, &s.act, &bp.proj_w, &bp.proj_b, n, i, c);
            let mut dfc = self.pool.take_zeroed(be, n * f);
            match cfg.act {
                Act::Gelu => be.gelu_backward(be.all_mut(&mut dfc), be.all(&s.fc), be.all(&dact)),
                Act::SwiGlu => {
                    be.swiglu_backward(be.all_mut(&mut dfc), be.all(&s.fc), be.all(&dact), n, i)
                }
            }
            let dln2 = self.linear_backward(be, grads, &dfc, &s.ln2, &bp.fc_w, &bp.fc_b, n, c, f);
            // dx now stands for d x_mid: the residual path plus the norm's contribution.
            self.norm_backward(
                be,
                grads,
                &mut dx,
                &dln2,
                &s.x_mid,
                &s.ln2_mean,
                &s.ln2_rstd,
                &bp.ln2_w,
                &bp.ln2_b,
                n,
            );
            self.pool.put([dact, dfc, dln2]);

            // Attention: x_mid = x + o(attn(rope(qkv(ln1(x))))).
            let datt = self.linear_backward(be, grads, &dx, &s.att, &bp.o_w, &bp.o_b, n, a, c);
            let mut dqkv = self.pool.take_zeroed(be, n * qkv_w);
            be.attention_backward(
                be.all_mut(&mut dqkv),
                be.all(&datt),
                be.all(&s.qkv),
                be.all(&s.att),
                be.all(&s.lse),
                &batch.mask,
                shape,
            );
            if let Some(theta) = self.rope_theta() {
                be.rope_backward(be.all_mut(&mut dqkv), &batch.pos, shape, theta);
            }
            let dln1 =
                self.linear_backward(be, grads, &dqkv, &s.ln1, &bp.qkv_w, &bp.qkv_b, n, c, qkv_w);
            self.norm_backward(
                be,
                grads,
                &mut dx,
                &dln1,
                &s.x,
                &s.ln1_mean,
                &s.ln1_rstd,
                &bp.ln1_w,
                &bp.ln1_b,
                n,
            );
            self.pool.put([datt, dqkv, dln1]);
        }

        be.embedding_backward(
            be.view_mut(grads, l.embed.clone()),
            be.all(&dx),
            &batch.ids,
            c,
        );
        if let Some(pe) = &l.pos_embed {
            be.embedding_backward(be.view_mut(grads, pe.clone()), be.all(&dx), &batch.pos, c);
        }
        self.pool.put([dx]);
    }

    /// Hands a pass's activations back: the next [`Model::forward`] takes its buffers from them
    /// instead of allocating and zero-filling new ones. Dropping `acts` is just as correct.
    pub fn recycle(&self, acts: Activations<B>) {
        let Activations {
            blocks,
            x_out,
            lnf_mean,
            lnf_rstd,
            hidden,
            batch: _,
        } = acts;
        self.pool.put([x_out, lnf_mean, lnf_rstd, hidden]);
        for s in blocks {
            self.pool.put([
                s.x, s.ln1, s.ln1_mean, s.ln1_rstd, s.qkv, s.att, s.lse, s.x_mid, s.ln2,
                s.ln2_mean, s.ln2_rstd, s.fc, s.act,
            ]);
        }
        self.pool.end_pass();
    }

    /// Logits (N, V) of the LM head for the given hidden states (N, C).
    pub fn logits(&self, be: &B, hidden: &B::Buf, n: usize) -> B::Buf {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        self.linear(be, hidden, &self.layout.lm_head_or_embed(), &None, n, c, v)
    }

    /// Per-row scalar values (N) of the score head for hidden states (N, C).
    pub fn values(&self, be: &B, hidden: &B::Buf, n: usize) -> Result<B::Buf> {
        let score = self.score_range()?;
        Ok(self.linear(be, hidden, &score, &None, n, self.cfg.hidden_size, 1))
    }

    /// Adds the gradient of `Σ dvalues·values` w.r.t. the score weight into `grads` and returns
    /// the gradient w.r.t. the hidden states (N, C).
    pub fn values_backward(
        &self,
        be: &B,
        hidden: &B::Buf,
        dvalues: &B::Buf,
        n: usize,
        grads: &mut B::Buf,
    ) -> Result<B::Buf> {
        let score = self.score_range()?;
        Ok(self.linear_backward(
            be,
            grads,
            dvalues,
            hidden,
            &score,
            &None,
            n,
            self.cfg.hidden_size,
            1,
        ))
    }

    fn score_range(&self) -> Result<Range<usize>> {
        self.layout.score.clone().ok_or_else(|| {
            Error::Invalid(
                "this model has no scalar head (score.weight); it is a language model".into(),
            )
        })
    }

    fn lm_range(&self) -> Result<Range<usize>> {
        if self.cfg.head != Head::Lm {
            return Err(Error::Invalid(
                "this model has a scalar head, not a language-model head".into(),
            ));
        }
        Ok(self.layout.lm_head_or_embed())
    }

    /// Log-probs (and optionally entropies) of `targets` under the LM head at `temperature`,
    /// computed `chunk` rows at a time so the (N, V) logits never exist at once.
    /// Returns `(logp, entropy)` as host vectors of N values.
    pub fn head_logprobs(
        &self,
        be: &B,
        hidden: &B::Buf,
        targets: &[u32],
        temperature: f32,
        with_entropy: bool,
        chunk: usize,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let w = self.lm_range()?;
        let (c, v, n) = (self.cfg.hidden_size, self.cfg.vocab_size, targets.len());
        check_targets(targets, v)?;
        let mut logp = Vec::with_capacity(n);
        let mut ent = with_entropy.then(|| Vec::with_capacity(n));
        for r in row_chunks(n, chunk) {
            let m = r.len();
            let mut logits = self.pool.take(be, m * v);
            be.matmul_forward(
                be.all_mut(&mut logits),
                be.view(hidden, r.start * c..r.end * c),
                self.p(be, &w),
                None,
                m,
                c,
                v,
            );
            let (mut lp, mut lse) = (self.pool.take(be, m), self.pool.take(be, m));
            let mut e = with_entropy.then(|| self.pool.take(be, m));
            be.logprobs_forward(
                be.all_mut(&mut lp),
                e.as_mut().map(|e| be.all_mut(e)),
                be.all_mut(&mut lse),
                be.all(&logits),
                &targets[r.clone()],
                m,
                v,
                temperature,
            );
            logp.extend(be.download(be.all(&lp)));
            if let (Some(ent), Some(e)) = (ent.as_mut(), e.as_ref()) {
                ent.extend(be.download(be.all(e)));
            }
            self.pool.put([logits, lp, lse].into_iter().chain(e));
        }
        Ok((logp, ent))
    }

    /// Backward of [`Self::head_logprobs`]: given `dlogp` (and `dentropy`) per row, adds the LM
    /// head's weight gradient into `grads` and returns `dhidden` (N, C) and the log-probs
    /// (N, as [`Self::head_logprobs`] gives them). Recomputes each chunk's logits rather than
    /// keeping them; a loss whose `dlogp` does not depend on the log-probs (SFT's) calls only
    /// this and computes the logits once.
    #[allow(clippy::too_many_arguments)]
    pub fn head_logprobs_backward(
        &self,
        be: &B,
        hidden: &B::Buf,
        targets: &[u32],
        temperature: f32,
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        chunk: usize,
        grads: &mut B::Buf,
    ) -> Result<(B::Buf, Vec<f32>)> {
        let w = self.lm_range()?;
        let (c, v, n) = (self.cfg.hidden_size, self.cfg.vocab_size, targets.len());
        let mut dhidden = self.pool.take_zeroed(be, n * c);
        let mut logp = Vec::with_capacity(n);
        for r in row_chunks(n, chunk) {
            let m = r.len();
            let h = be.view(hidden, r.start * c..r.end * c);
            let mut logits = self.pool.take(be, m * v);
            be.matmul_forward(be.all_mut(&mut logits), h, self.p(be, &w), None, m, c, v);
            let (mut lp, mut lse) = (self.pool.take(be, m), self.pool.take(be, m));
            be.logprobs_forward(
                be.all_mut(&mut lp),
                None,
                be.all_mut(&mut lse),
                be.all(&logits),
                &targets[r.clone()],
                m,
                v,
                temperature,
            );
            logp.extend(be.download(be.all(&lp)));
            let dlp = be.upload(&dlogp[r.clone()]);
            let dent = dentropy.map(|d| be.upload(&d[r.clone()]));
            let mut dlogits = self.pool.take_zeroed(be, m * v);
            be.logprobs_backward(
                be.all_mut(&mut dlogits),
                be.all(&logits),
                &targets[r.clone()],
                be.all(&lse),
                be.all(&dlp),
                dent.as_ref().map(|d| be.all(d)),
                m,
                v,
                temperature,
            );
            be.matmul_backward(
                Some(be.view_mut(&mut dhidden, r.start * c..r.end * c)),
                be.view_mut(grads, w.clone()),
                be.all(&dlogits),
                h,
                self.p(be, &w),
                m,
                c,
                v,
            );
            self.pool.put([logits, lp, lse, dlogits]);
        }
        Ok((dhidden, logp))
    }

    /// Next-token log-probs of a batch: `out[b][t] = log p(ids[b, t+1] | ids[b, ..=t])` for each
    /// row's real tokens (length `len_b - 1`). Rows may be right- or left-padded.
    pub fn next_token_logprobs(&self, be: &B, batch: &Batch) -> Result<Vec<Vec<f32>>> {
        let acts = self.forward(be, batch)?;
        let targets = shifted_targets(batch);
        let (logp, _) = self.head_logprobs(be, &acts.hidden, &targets, 1.0, false, 1024)?;
        Ok((0..batch.b)
            .map(|r| {
                let row = r * batch.t..(r + 1) * batch.t;
                (row.start..row.end - 1)
                    .filter(|&j| batch.mask[j] && batch.mask[j + 1])
                    .map(|j| logp[j])
                    .collect()
            })
            .collect())
    }
}

/// The next token of each row position (`ids[j + 1]`; the last column and pads point at the
/// row's own id so they stay in range): targets for teacher forcing.
pub fn shifted_targets(batch: &Batch) -> Vec<u32> {
    let t = batch.t;
    (0..batch.n())
        .map(|j| {
            if (j + 1) % t != 0 {
                batch.ids[j + 1]
            } else {
                batch.ids[j]
            }
        })
        .collect()
}

fn check_targets(targets: &[u32], v: usize) -> Result<()> {
    match targets.iter().find(|&&id| id as usize >= v) {
        Some(&id) => Err(Error::TokenOutOfRange { id, rows: v }),
        None => Ok(()),
    }
}

/// `0..n` in consecutive ranges of at most `chunk` rows.
fn row_chunks(n: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    (0..n.div_ceil(chunk)).map(move |k| k * chunk..((k + 1) * chunk).min(n))
}

/// Keys and values of every layer for a batch of sequences being generated, and the buffers one
/// decode step writes into: everything is allocated once, before the decode loop.
pub struct DecodeState<B: DecodeOps> {
    /// Per layer, (B, KVH, TMAX, HD).
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    /// Sequences in the batch.
    pub b: usize,
    /// Cache capacity in columns (prompt + new tokens).
    pub t_max: usize,
    /// Columns filled so far.
    pub len: usize,
    /// B·TMAX flags: which cache columns hold real tokens.
    pub key_mask: Vec<bool>,
    /// Next position id of each sequence.
    pub next_pos: Vec<u32>,
    /// One row per sequence.
    rows: RowBufs<B>,
    /// LM-head logits of the last step (B, V).
    pub logits: B::Buf,
}

/// What one pass through a block writes, for `n` rows at a time: one row per sequence in a
/// decode step, every prompt token in the prefill.
struct RowBufs<B: DecodeOps> {
    n: usize,
    x: B::Buf,
    ln: B::Buf,
    mean: B::Buf,
    rstd: B::Buf,
    qkv: B::Buf,
    att: B::Buf,
    o: B::Buf,
    fc: B::Buf,
    act: B::Buf,
}

impl<B: DecodeOps> Model<B> {
    /// Runs the (left-padded) prompt batch, fills a KV cache with room for `max_new` more
    /// tokens, and leaves the logits of each row's last prompt token in `state.logits`.
    ///
    /// Unlike the training forward it keeps no activations: one set of buffers serves every
    /// layer, and keys and values go straight into the cache. Only each row's last column is
    /// read from the last layer's attention on, so the rest of that layer runs on those B rows
    /// alone, through the decode step's code.
    pub fn prefill(&self, be: &B, batch: &Batch, max_new: usize) -> Result<DecodeState<B>> {
        self.check_batch(batch)?;
        let cfg = &self.cfg;
        let t_max = batch.t + max_new;
        if cfg.pos == Pos::Learned && t_max > cfg.max_position {
            return Err(Error::Invalid(format!(
                "prompt of {} tokens + {max_new} new tokens exceeds the model's {} positions",
                batch.t, cfg.max_position
            )));
        }
        let (b, c) = (batch.b, cfg.hidden_size);
        let shape = self.attn_shape(batch);
        let a = shape.out_width();
        let mut state = self.decode_state(be, batch, t_max);
        let mut r = self.row_bufs(be, batch.n());
        let mut lse = be.zeros(b * cfg.n_head * batch.t);
        let l = &self.layout;
        self.embed(be, &mut r.x, &batch.ids, &batch.pos);
        let last = l.blocks.len() - 1;
        for (li, bp) in l.blocks.iter().enumerate() {
            self.block_head(be, &mut r, bp, &batch.pos, shape);
            be.kv_cache_store(
                be.all_mut(&mut state.k[li]),
                be.all_mut(&mut state.v[li]),
                be.all(&r.qkv),
                shape,
                0,
                t_max,
            );
            let (att, lse) = (be.all_mut(&mut r.att), be.all_mut(&mut lse));
            be.attention_forward(att, lse, be.all(&r.qkv), &batch.mask, shape);
            if li == last {
                break;
            }
            self.block_tail(be, &mut r, bp);
        }
        // Each row's last column (left padding puts every prompt's end at t - 1).
        for row in 0..b {
            let col = row * batch.t + batch.t - 1;
            be.copy(
                be.view_mut(&mut state.rows.x, row * c..(row + 1) * c),
                be.view(&r.x, col * c..(col + 1) * c),
            );
            be.copy(
                be.view_mut(&mut state.rows.att, row * a..(row + 1) * a),
                be.view(&r.att, col * a..(col + 1) * a),
            );
        }
        self.block_tail(be, &mut state.rows, &l.blocks[last]);
        self.step_logits(be, &mut state)?;
        Ok(state)
    }

    /// The decode state of `batch` with an empty cache of `t_max` columns.
    fn decode_state(&self, be: &B, batch: &Batch, t_max: usize) -> DecodeState<B> {
        let cfg = &self.cfg;
        let (b, v) = (batch.b, cfg.vocab_size);
        let cache_len = b * cfg.n_kv_head * t_max * cfg.head_dim;
        let mut key_mask = vec![false; b * t_max];
        let mut next_pos = vec![0u32; b];
        for r in 0..b {
            let row = &batch.mask[r * batch.t..(r + 1) * batch.t];
            key_mask[r * t_max..r * t_max + batch.t].copy_from_slice(row);
            next_pos[r] = row.iter().filter(|&&m| m).count() as u32;
        }
        DecodeState {
            k: (0..cfg.n_layer).map(|_| be.zeros(cache_len)).collect(),
            v: (0..cfg.n_layer).map(|_| be.zeros(cache_len)).collect(),
            b,
            t_max,
            len: batch.t,
            key_mask,
            next_pos,
            rows: self.row_bufs(be, b),
            logits: be.zeros(b * v),
        }
    }

    /// Buffers for `n` rows of one pass through a block.
    fn row_bufs(&self, be: &B, n: usize) -> RowBufs<B> {
        let cfg = &self.cfg;
        let c = cfg.hidden_size;
        let qkv_w = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim;
        let (f, i) = self.mlp_widths();
        RowBufs {
            n,
            x: be.zeros(n * c),
            ln: be.zeros(n * c),
            mean: be.zeros(n),
            rstd: be.zeros(n),
            qkv: be.zeros(n * qkv_w),
            att: be.zeros(n * cfg.n_head * cfg.head_dim),
            o: be.zeros(n * c),
            fc: be.zeros(n * f),
            act: be.zeros(n * i),
        }
    }

    /// A block up to its attention, on the rows of `r.x`: the first norm, the q/k/v projection
    /// and, with RoPE, the rotation at positions `pos`, into `r.qkv`.
    fn block_head(&self, be: &B, r: &mut RowBufs<B>, bp: &BlockParams, pos: &[u32], s: AttnShape) {
        let c = self.cfg.hidden_size;
        let (ln, mean, rstd) = (&mut r.ln, &mut r.mean, &mut r.rstd);
        self.norm_forward(be, ln, mean, rstd, &r.x, &bp.ln1_w, &bp.ln1_b, r.n);
        let qkv_w = s.qkv_width();
        self.linear_into(be, &mut r.qkv, &r.ln, &bp.qkv_w, &bp.qkv_b, r.n, c, qkv_w);
        if let Some(theta) = self.rope_theta() {
            be.rope_forward(be.all_mut(&mut r.qkv), pos, s, theta);
        }
    }

    /// The rest of a block after its attention, on the rows of `r.att` and `r.x`: output
    /// projection and residual, then the MLP and its residual.
    fn block_tail(&self, be: &B, r: &mut RowBufs<B>, bp: &BlockParams) {
        let (n, c) = (r.n, self.cfg.hidden_size);
        let a = self.cfg.n_head * self.cfg.head_dim;
        let (f, i) = self.mlp_widths();
        self.linear_into(be, &mut r.o, &r.att, &bp.o_w, &bp.o_b, n, a, c);
        be.add_inplace(be.all_mut(&mut r.x), be.all(&r.o));
        let (ln, mean, rstd) = (&mut r.ln, &mut r.mean, &mut r.rstd);
        self.norm_forward(be, ln, mean, rstd, &r.x, &bp.ln2_w, &bp.ln2_b, n);
        self.linear_into(be, &mut r.fc, &r.ln, &bp.fc_w, &bp.fc_b, n, c, f);
        self.act_forward(be, &mut r.act, &r.fc, n);
        self.linear_into(be, &mut r.o, &r.act, &bp.proj_w, &bp.proj_b, n, i, c);
        be.add_inplace(be.all_mut(&mut r.x), be.all(&r.o));
    }

    /// The final norm and LM head of the B rows of `s.rows.x`, into `s.logits`.
    fn step_logits(&self, be: &B, s: &mut DecodeState<B>) -> Result<()> {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let (l, r) = (&self.layout, &mut s.rows);
        let (ln, mean, rstd) = (&mut r.ln, &mut r.mean, &mut r.rstd);
        self.norm_forward(be, ln, mean, rstd, &r.x, &l.lnf_w, &l.lnf_b, r.n);
        let lm = self.lm_range()?;
        self.linear_into(be, &mut s.logits, &r.ln, &lm, &None, r.n, c, v);
        Ok(())
    }

    /// Appends one token per sequence (`ids`, B values) to the cache and computes the next
    /// logits into `state.logits`. Allocates nothing.
    pub fn decode_step(&self, be: &B, state: &mut DecodeState<B>, ids: &[u32]) -> Result<()> {
        let cfg = &self.cfg;
        let (b, v) = (state.b, cfg.vocab_size);
        if state.len >= state.t_max {
            return Err(Error::Invalid(format!(
                "the KV cache is full ({} columns)",
                state.t_max
            )));
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= v) {
            return Err(Error::TokenOutOfRange { id, rows: v });
        }
        let shape = AttnShape {
            b,
            t: 1,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
        };
        let l = &self.layout;
        let col = state.len;
        for r in 0..b {
            state.key_mask[r * state.t_max + col] = true;
        }
        let s = state;
        self.embed(be, &mut s.rows.x, ids, &s.next_pos);
        for (li, bp) in l.blocks.iter().enumerate() {
            self.block_head(be, &mut s.rows, bp, &s.next_pos, shape);
            let r = &mut s.rows;
            let (kc, vc) = (&mut s.k[li], &mut s.v[li]);
            be.kv_cache_store(
                be.all_mut(kc),
                be.all_mut(vc),
                be.all(&r.qkv),
                shape,
                col,
                s.t_max,
            );
            be.attention_decode(
                be.all_mut(&mut r.att),
                be.all(&r.qkv),
                be.all(kc),
                be.all(vc),
                &s.key_mask,
                shape,
                col + 1,
                s.t_max,
            );
            self.block_tail(be, r, bp);
        }
        self.step_logits(be, s)?;
        s.len += 1;
        s.next_pos.iter_mut().for_each(|p| *p += 1);
        Ok(())
    }
}
