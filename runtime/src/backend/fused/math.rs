//! Branch-free f32 `exp`, `ln`, `tanh` and `sigmoid` that the compiler can
//! vectorise (the standard library's call libm one element at a time, which
//! would make a fused kernel slower than ONNX Runtime's vectorised ones).
//!
//! The polynomials are Cephes' (`expf.c`, `logf.c`, `tanhf.c`), accurate to
//! a few ulp over the whole range. Special values follow IEEE: NaN stays NaN
//! (the L2O divergence guard depends on it), `exp` overflows to +inf and
//! underflows to 0, `ln(0) = -inf`, `ln(x < 0) = NaN`. Results below the
//! smallest normal float are flushed to 0.

// The coefficients are written as Cephes publishes them.
#![allow(clippy::excessive_precision)]

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split so that `n * LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5 * 2^23 rounds an f32 to the nearest integer
/// without a (non-vectorisable, on baseline x86-64) `roundf` call.
const ROUND_MAGIC: f32 = 12_582_912.0;
const EXP_HI: f32 = 88.722_83;
const EXP_LO: f32 = -87.336_55;

#[inline(always)]
fn select(c: bool, a: f32, b: f32) -> f32 {
    if c {
        a
    } else {
        b
    }
}

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Comparisons with NaN are false, so NaN passes the clamps unchanged.
    let xc = select(x > EXP_HI, EXP_HI, select(x < EXP_LO, EXP_LO, x));
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let p = p * z + r + 1.0;
    // 2^n as two factors 2^(n/2) (n is in [-126, 128] after the clamp,
    // which one exponent field cannot hold at both ends).
    // n as an integer, read from the bits of `t` (an `as i32` conversion
    // saturates, which the compiler does not vectorise).
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let n1 = ni >> 1;
    let scale = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * scale(n1) * scale(ni - n1);
    select(x > EXP_HI, f32::INFINITY, select(x < EXP_LO, 0.0, y))
}

#[inline(always)]
pub fn ln(x: f32) -> f32 {
    // Subnormal inputs are scaled into the normal range first.
    let tiny = x < f32::MIN_POSITIVE;
    let xs = select(tiny, x * 8_388_608.0, x);
    let bits = xs.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let low = m < std::f32::consts::FRAC_1_SQRT_2;
    let e = select(low, (e - 1) as f32, e as f32);
    let m = select(low, m + m - 1.0, m - 1.0);
    let z = m * m;
    let y = ((((((((7.037_683_6e-2 * m - 1.151_461e-1) * m + 1.167_699_9e-1) * m
        - 1.242_014_1e-1)
        * m
        + 1.424_932_3e-1)
        * m
        - 1.666_805_8e-1)
        * m
        + 2.000_071_5e-1)
        * m
        - 2.499_999_4e-1)
        * m
        + 3.333_333_1e-1)
        * m
        * z;
    let y = y + e * LN2_LO - 0.5 * z;
    let r = m + y + e * LN2_HI;
    let r = select(tiny, r - 23.0 * std::f32::consts::LN_2, r);
    let r = select(x == f32::INFINITY, f32::INFINITY, r);
    let r = select(x == 0.0, f32::NEG_INFINITY, r);
    // x < 0 and NaN give NaN.
    select(x < 0.0 || x.is_nan(), f32::NAN, r)
}

#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_908_9e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328_2e-1)
            * z
            * x
            + x;
    let a = x.abs();
    let big = (1.0 - 2.0 / (exp(a + a) + 1.0)).copysign(x);
    // NaN fails the comparison and takes `big`, which is NaN.
    select(a < 0.625, small, big)
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest error over `xs`, relative to |reference| but at least `floor`.
    fn worst(f: fn(f32) -> f32, r: fn(f64) -> f64, xs: &[f32], floor: f64) -> (f64, f32) {
        xs.iter()
            .map(|&x| {
                let (got, want) = (f64::from(f(x)), r(f64::from(x)));
                ((got - want).abs() / want.abs().max(floor), x)
            })
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
    }

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| lo + (hi - lo) * i as f32 / n as f32)
            .collect()
    }

    #[test]
    fn accurate_over_the_range() {
        let (e, at) = worst(exp, f64::exp, &grid(-87.0, 88.5, 200_001), 0.0);
        assert!(e < 4e-7, "exp: relative error {e} at {at}");
        let mut xs = grid(1e-6, 10.0, 100_001);
        xs.extend(grid(10.0, 1e30, 10_001));
        xs.extend([1e-30, 1e-38, 1e-40, 1e-45, f32::MAX, 1.0]);
        let (e, at) = worst(ln, f64::ln, &xs, 1e-3);
        assert!(e < 4e-7, "ln: error {e} at {at}");
        let xs = grid(-20.0, 20.0, 400_001);
        let (e, at) = worst(tanh, f64::tanh, &xs, 0.0);
        assert!(e < 4e-7, "tanh: relative error {e} at {at}");
        let (e, at) = worst(
            sigmoid,
            |x| 1.0 / (1.0 + (-x).exp()),
            &grid(-80.0, 80.0, 400_001),
            0.0,
        );
        assert!(e < 4e-7, "sigmoid: relative error {e} at {at}");
    }

    #[test]
    fn special_values() {
        assert!(exp(f32::NAN).is_nan() && ln(f32::NAN).is_nan() && tanh(f32::NAN).is_nan());
        assert!(sigmoid(f32::NAN).is_nan());
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f32::NEG_INFINITY).is_nan());
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh(0.0), 0.0);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert_eq!(sigmoid(f32::NEG_INFINITY), 0.0);
        assert_eq!(sigmoid(-200.0), 0.0);
    }
}
