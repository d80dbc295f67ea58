//! Branch-free `exp` and `tanh` for f32 that the compiler can vectorise, and `simd_dispatch!`,
//! which compiles a loop for the CPU's widest vector instructions.
//!
//! The standard library's `f32::exp` and `f32::tanh` call libm one element at a time (about 2 ns
//! and 10 ns here); the vocabulary-wide softmax of `logprobs_*` and every GELU call spend most
//! of their time there. These versions are written with selects instead of branches and bit
//! tricks instead of `floor`, so a loop over a slice becomes SIMD code, and stay within a few
//! ulp of the correctly rounded result (tested below against f64).
//!
//! Both are plain functions of their argument: the same input gives the same output whatever
//! the loop around them, so vectorisation does not change results.

/// Defines `fn $name(args) -> ret` that runs `$body`, an `#[inline(always)]` function taking the
/// same arguments, compiled for the widest SIMD instruction set this CPU has: AVX-512, AVX2, or
/// the x86-64 baseline (SSE2) that the crate is built for, so that one binary runs anywhere.
///
/// The hot elementwise loops are written once as plain Rust; `#[inline(always)]` guarantees that
/// each copy below gets the whole loop compiled with its instruction set (GELU runs 2× faster
/// with AVX2 and 4× with AVX-512 than with SSE2). Rust never fuses `a·b + c` into an FMA on its
/// own and the lane-wise sums fix their association explicitly, so the vector width does not
/// change any result (`simd_gives_the_same_bits` checks it).
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// The sum of 16 lanes by the fixed tree `[l] + [l + 8]`, then `+ 4`, `+ 2`, `+ 1`: the order
/// [`lane_sums16`] adds in, so a portable loop and its AVX-512 copy give the same bits.
#[inline(always)]
pub fn halve_lanes<T: Copy + std::ops::Add<Output = T>>(mut lanes: [T; 16]) -> T {
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            lanes[l] = lanes[l] + lanes[l + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// The lane sums of 16 AVX-512 accumulators, `out[a]` = the sum of `acc[a]`'s 16 lanes by the
/// fixed tree `[l] + [l + 8]`, then `+ 4`, `+ 2`, `+ 1` — the tree a portable loop narrowing one
/// accumulator at a time uses, so both give the same bits. Folding two vectors into one per step
/// takes 15 vector adds and their shuffles in all, where narrowing each accumulator on its own
/// takes four steps each: at a width of 64 that cost as much as the dot products feeding it
/// (the skinny matmul, the decode attention's scores).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn lane_sums16(acc: [std::arch::x86_64::__m512; 16]) -> [f32; 16] {
    use std::arch::x86_64::*;
    let mut sums = [0.0f32; 16];
    // SAFETY: `SUM_LANE` and `sums` hold 16 elements; AVX-512F by the caller's contract.
    unsafe {
        let v = _mm512_permutexvar_ps(
            _mm512_loadu_si512(SUM_LANE.as_ptr().cast()),
            lane_sums16_shuffled(acc),
        );
        _mm512_storeu_ps(sums.as_mut_ptr(), v);
    }
    sums
}

/// Where [`lane_sums16_shuffled`] leaves accumulator `a`'s sum: lane `4·(a % 4) + a / 4` (i32,
/// as a vector permutation's indices).
#[cfg(target_arch = "x86_64")]
pub const SUM_LANE: [i32; 16] = {
    let mut lane = [0; 16];
    let mut a = 0;
    while a < 16 {
        lane[a] = (4 * (a % 4) + a / 4) as i32;
        a += 1;
    }
    lane
};

/// [`lane_sums16`] left in a vector, accumulator `a`'s sum in lane [`SUM_LANE`]`[a]`: a caller
/// that goes on with vector work (a bias, a scatter) saves the trip through memory.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn lane_sums16_shuffled(
    acc: [std::arch::x86_64::__m512; 16],
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Step 1 (128-bit quarters): [a.q0 + a.q2, a.q1 + a.q3, b.q0 + b.q2, b.q1 + b.q3] — each
    // accumulator's 8 lanes `[l] + [l + 8]`.
    let v: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (acc[2 * i], acc[2 * i + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // Step 2: quarter i of u[m] holds accumulator 4m + i's 4 lanes `[l] + [l + 4]`.
    let u: [__m512; 4] = std::array::from_fn(|m| {
        let (a, b) = (v[2 * m], v[2 * m + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // Step 3 (within quarters): quarter r of t[n] holds accumulators 8n + r and 8n + 4 + r,
    // 2 lanes each, `[l] + [l + 2]`.
    let t: [__m512; 2] = std::array::from_fn(|n| {
        let (a, b) = (u[2 * n], u[2 * n + 1]);
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        )
    });
    // Step 4: lane 4r + s holds accumulator 4s + r's sum, `[0] + [1]`.
    _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(t[0], t[1]),
        _mm512_shuffle_ps::<0xDD>(t[0], t[1]),
    )
}

/// Below this `exp` returns exactly 0: `e^-87.33` is the smallest normal f32, and flushing the
/// subnormal range keeps the exponent arithmetic simple. A softmax term that small is zero to
/// f32 precision against a sum that is at least 1.
const EXP_LO: f32 = -87.336_55;
/// Above this `exp` returns +inf (`e^88.72` is the largest finite f32).
const EXP_HI: f32 = 88.0;
/// Adding `1.5 · 2^23` rounds a float of magnitude below `2^22` to the nearest integer and leaves
/// that integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `e^x` within 2 ulp for `x` in `[-87.3, 88]`; 0 below, +inf above, NaN for NaN.
///
/// Cephes' `expf`: `x = n·ln2 + r` with `|r| <= ln2/2`, a degree-6 polynomial for `e^r`, and
/// `2^n` built in the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // ln 2 split in two so that `n · LN2_HI` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // NaN passes through `clamp` and makes the polynomial NaN.
    let xc = x.clamp(EXP_LO, EXP_HI);
    let t = xc * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * (r * r) + r + 1.0;
    let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
    let y = er * two_n;
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `tanh(x)` within a few ulp.
///
/// `(1 - e)/(1 + e)` with `e = e^(-2|x|)` loses relative precision as `|x| → 0` (`1 - e`
/// cancels), so below 0.25 the Taylor series is used instead (truncation error below 1e-8
/// relative there).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let e = exp(-2.0 * a);
    let big = (1.0 - e) / (1.0 + e);
    let x2 = a * a;
    let mut s = -1382.0 / 155_925.0_f32;
    s = s * x2 + 62.0 / 2835.0;
    s = s * x2 - 17.0 / 315.0;
    s = s * x2 + 2.0 / 15.0;
    s = s * x2 - 1.0 / 3.0;
    let small = a + a * x2 * s;
    let r = if a < 0.25 { small } else { big };
    r.copysign(x)
}

/// The logistic function `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units of the last place between an f32 and the exact value (f64).
    fn ulps(got: f32, exact: f64) -> f64 {
        let rounded = exact as f32;
        let ulp = (f32::from_bits(rounded.abs().to_bits() + 1) - rounded.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.3f32;
        while x < 88.0 {
            worst = worst.max(ulps(exp(x), (x as f64).exp()));
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "worst exp error {worst} ulp");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    /// The loop of `simd_gives_the_same_bits`.
    #[inline(always)]
    fn mix(out: &mut [f32], x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = exp(v) + tanh(v) * sigmoid(v);
        }
    }

    simd_dispatch! {
        fn mix_wide(out: &mut [f32], x: &[f32]) = mix;
    }

    /// `simd_dispatch` promises the same bits whatever the vector width: compare its widest copy
    /// of a loop with the baseline one.
    #[test]
    fn simd_gives_the_same_bits() {
        let x: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 0.0173).collect();
        let (mut baseline, mut wide) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        mix(&mut baseline, &x);
        mix_wide(&mut wide, &x);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert!(bits(&wide) == bits(&baseline));
    }

    #[test]
    fn tanh_is_within_four_ulp() {
        let mut worst = 0.0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            worst = worst.max(ulps(tanh(x), (x as f64).tanh()));
            x += 0.000_137;
        }
        for x in [1e-30f32, 1e-8, 1e-4, 0.2499, 0.25, 0.2501] {
            worst = worst.max(ulps(tanh(x), (x as f64).tanh()));
            worst = worst.max(ulps(tanh(-x), (-x as f64).tanh()));
        }
        assert!(worst <= 4.0, "worst tanh error {worst} ulp");
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-50.0), -1.0);
        assert_eq!(tanh(0.0), 0.0);
    }
}
