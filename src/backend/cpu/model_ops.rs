//! `ModelOps` for the CPU backend: each method forwards to the free function of the same name in
//! the file that holds that op family (`matmul`, `norm`, `activation`, `rope`, `attention`,
//! `logprob`, `elementwise`, `optim`), where the shapes, formulas and the reasons for each choice
//! are written down.

use super::{activation, attention, elementwise, logprob, matmul, norm, optim, rope, Cpu};
use crate::backend::{AdamW, AttnShape, ModelOps};

impl ModelOps for Cpu {
    fn embedding_forward(
        &self,
        out: &mut [f32],
        table: &[f32],
        ids: &[u32],
        c: usize,
        accumulate: bool,
    ) {
        elementwise::embedding_forward(out, table, ids, c, accumulate)
    }
    fn embedding_backward(&self, dtable: &mut [f32], dout: &[f32], ids: &[u32], c: usize) {
        elementwise::embedding_backward(dtable, dout, ids, c)
    }

    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        c: usize,
        oc: usize,
    ) {
        matmul::matmul_forward(out, inp, w, bias, n, c, oc)
    }
    fn matmul_backward(
        &self,
        dinp: Option<&mut [f32]>,
        dw: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        n: usize,
        c: usize,
        oc: usize,
    ) {
        matmul::matmul_backward(dinp, dw, dout, inp, w, n, c, oc)
    }
    fn bias_backward(&self, dbias: &mut [f32], dout: &[f32], n: usize, oc: usize) {
        matmul::bias_backward(dbias, dout, n, oc)
    }

    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        b: &[f32],
        n: usize,
        c: usize,
        eps: f32,
    ) {
        norm::layernorm_forward(out, mean, rstd, inp, w, b, n, c, eps)
    }
    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        n: usize,
        c: usize,
    ) {
        norm::layernorm_backward(dinp, dw, dout, inp, w, mean, rstd, n, c)
    }

    fn rmsnorm_forward(
        &self,
        out: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        w: &[f32],
        n: usize,
        c: usize,
        eps: f32,
    ) {
        norm::rmsnorm_forward(out, rstd, inp, w, n, c, eps)
    }
    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dw: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        rstd: &[f32],
        n: usize,
        c: usize,
    ) {
        norm::rmsnorm_backward(dinp, dw, dout, inp, w, rstd, n, c)
    }

    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        activation::gelu_forward(out, inp)
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        activation::gelu_backward(dinp, inp, dout)
    }
    fn swiglu_forward(&self, out: &mut [f32], inp: &[f32], n: usize, i: usize) {
        activation::swiglu_forward(out, inp, n, i)
    }
    fn swiglu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32], n: usize, i: usize) {
        activation::swiglu_backward(dinp, inp, dout, n, i)
    }

    fn rope_forward(&self, qkv: &mut [f32], pos: &[u32], shape: AttnShape, theta: f32) {
        rope::rope_forward(qkv, pos, shape, theta)
    }
    fn rope_backward(&self, dqkv: &mut [f32], pos: &[u32], shape: AttnShape, theta: f32) {
        rope::rope_backward(dqkv, pos, shape, theta)
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        key_mask: &[bool],
        shape: AttnShape,
    ) {
        attention::attention_forward(out, lse, qkv, key_mask, shape)
    }
    fn attention_backward(
        &self,
        dqkv: &mut [f32],
        dout: &[f32],
        qkv: &[f32],
        out: &[f32],
        lse: &[f32],
        key_mask: &[bool],
        shape: AttnShape,
    ) {
        attention::attention_backward(dqkv, dout, qkv, out, lse, key_mask, shape)
    }

    fn add(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        elementwise::add(out, a, b)
    }
    fn add_inplace(&self, acc: &mut [f32], x: &[f32]) {
        elementwise::add_inplace(acc, x)
    }
    fn scale(&self, x: &mut [f32], s: f32) {
        elementwise::scale(x, s)
    }

    fn logprobs_forward(
        &self,
        logp: &mut [f32],
        entropy: Option<&mut [f32]>,
        lse: &mut [f32],
        logits: &[f32],
        targets: &[u32],
        n: usize,
        v: usize,
        temperature: f32,
    ) {
        logprob::logprobs_forward(logp, entropy, lse, logits, targets, n, v, temperature)
    }
    fn logprobs_backward(
        &self,
        dlogits: &mut [f32],
        logits: &[f32],
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        dentropy: Option<&[f32]>,
        n: usize,
        v: usize,
        temperature: f32,
    ) {
        logprob::logprobs_backward(
            dlogits,
            logits,
            targets,
            lse,
            dlogp,
            dentropy,
            n,
            v,
            temperature,
        )
    }

    fn sum_squares(&self, x: &[f32]) -> f64 {
        optim::sum_squares(x)
    }
    fn adamw(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], h: AdamW) {
        optim::adamw(params, grads, m, v, h)
    }
}
