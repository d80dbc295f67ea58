//! The CPU backend: plain, parallel Rust (rayon + `gemm`). It is the numerical reference every
//! other backend is validated against, so clarity comes before cleverness; reductions use fixed
//! chunking so results never depend on thread scheduling.

mod activation;
mod attention;
mod decode;
mod elementwise;
mod logprob;
mod loss;
mod math;
mod matmul;
mod model_ops;
mod norm;
mod optim;
mod reduce;
mod rope;
mod sample;
mod team;

use super::Backend;
use std::ops::Range;

/// The rayon CPU backend. Buffers are `Vec<f32>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn zeros(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn download(&self, v: &[f32]) -> Vec<f32> {
        v.to_vec()
    }
    fn len(&self, b: &Vec<f32>) -> usize {
        b.len()
    }
    fn view<'a>(&self, b: &'a Vec<f32>, r: Range<usize>) -> &'a [f32] {
        &b[r]
    }
    fn view_mut<'a>(&self, b: &'a mut Vec<f32>, r: Range<usize>) -> &'a mut [f32] {
        &mut b[r]
    }
    fn fill(&self, v: &mut [f32], value: f32) {
        v.fill(value)
    }
    fn copy(&self, dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src)
    }
}
