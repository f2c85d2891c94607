//! Pooling and local response normalisation: MaxPool, AveragePool, LRN.
//!
//! These become IR primitives with their own derivative rules, so their
//! gradients and HVPs follow from autodiff like every other op's:
//!
//! * A pool over a `k_h x k_w` window is the elementwise `Max` (or `Add`) of
//!   the `k_h * k_w` strided views of the padded input, one per window
//!   offset. The input is padded once (with `-inf` for MaxPool, zeros for
//!   AveragePool) and reshaped so that a stride `s` becomes a separate axis
//!   of length `s`: every view is then four unit-step `Slice`s, whose
//!   adjoints are zero-padding concatenations. No gather, no scatter.
//! * MaxPool's subgradient routes to the **first** maximum of a window in
//!   row-major order, as PyTorch's does: `Max(a, b)` passes the derivative to
//!   `b` only where `a < b`, and the views are combined in window order.
//! * AveragePool multiplies the window sum by a constant `1 / count`, whose
//!   count follows `count_include_pad`: the window's elements inside the
//!   input, or inside the input and its explicit `pads`; positions that
//!   `ceil_mode` adds beyond the explicit padding never count (ONNX Runtime's
//!   and PyTorch's rule).
//! * LRN sums the squares of `size` channel-shifted slices of the
//!   zero-padded input.

#[allow(unused_imports)]
use super::*;

/// The loaders of this family, by ONNX op type.
pub(super) const LOADERS: &[(&str, Loader)] = &[
    ("MaxPool", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.pool(c, true)?])
    }),
    ("AveragePool", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.pool(c, false)?])
    }),
    ("LRN", |im: &mut Importer, c: &Ctx| Ok(vec![im.lrn(c)?])),
];

/// One spatial axis of a pool: the output length and where each window
/// offset reads.
struct AxisPlan {
    /// Output length.
    out: usize,
    /// Length of the padded axis (a multiple of `stride`).
    len: usize,
    /// Explicit padding at the start and the input length.
    pad: usize,
    n: usize,
    stride: usize,
    /// Per window offset `i`: `(i * dilation) / stride` and
    /// `(i * dilation) % stride`.
    offsets: Vec<(usize, usize)>,
    /// Per output position: `1 / count` factor's count along this axis, for
    /// AveragePool.
    counts: Vec<usize>,
}

impl AxisPlan {
    /// `n` input elements, a window of `k` elements `d` apart moved by `s`,
    /// `pads` explicit padding; `ceil` rounds the output length up (a
    /// window that would start in the end padding is dropped).
    fn new(
        n: usize,
        (k, s, d): (usize, usize, usize),
        pads: (usize, usize),
        ceil: bool,
        include_pad: bool,
    ) -> R<AxisPlan> {
        let (pb, pe) = pads;
        let eff = d * (k - 1) + 1;
        let total = n + pb + pe;
        if total < eff {
            return invalid(format!(
                "the window ({eff} elements with dilation) is larger than the padded input ({total})"
            ));
        }
        let num = total - eff;
        let mut out = if ceil {
            num.div_ceil(s) + 1
        } else {
            num / s + 1
        };
        if ceil && (out - 1) * s >= n + pb {
            out -= 1;
        }
        let offsets: Vec<(usize, usize)> = (0..k).map(|i| (i * d / s, i * d % s)).collect();
        let rows = offsets.iter().map(|&(q, _)| q + out).max().unwrap_or(out);
        let mut counts = vec![];
        for o in 0..out {
            let pos = (0..k).map(|i| o * s + i * d);
            let real = pos.clone().filter(|&p| p >= pb && p < pb + n).count();
            if real == 0 {
                return invalid(format!(
                    "output position {o} pools a window of padding only (pads {pads:?}, input {n})"
                ));
            }
            counts.push(if include_pad {
                pos.filter(|&p| p < total).count()
            } else {
                real
            });
        }
        Ok(AxisPlan {
            out,
            len: rows * s,
            pad: pb,
            n,
            stride: s,
            offsets,
            counts,
        })
    }
}

impl Importer<'_> {
    /// MaxPool (`max`) or AveragePool of a 1-D or 2-D input.
    pub(super) fn pool(&mut self, c: &Ctx, max: bool) -> R<NodeId> {
        let x = c.x(0)?;
        self.require_float(x, "input")?;
        let xs = self.shape(x);
        if !(3..=4).contains(&xs.len()) {
            return invalid(format!(
                "only 1-D and 2-D pooling is supported (input {})",
                self.ty(x)
            ));
        }
        if max && c.wants(1) {
            return invalid("the Indices output is not supported (only the pooled values)");
        }
        let sp = xs.len() - 2;
        let kernel = c
            .ints("kernel_shape")
            .ok_or("missing attribute 'kernel_shape'")?;
        if kernel.len() != sp {
            return invalid(format!(
                "kernel_shape {kernel:?} has {} values for {sp} spatial axes",
                kernel.len()
            ));
        }
        let kernel: Vec<usize> = kernel
            .iter()
            .map(|&k| match to_usize(k, "kernel_shape")? {
                0 => invalid("kernel_shape has a 0"),
                k => Ok(k),
            })
            .collect::<R<_>>()?;
        let (strides, dil, pads) = self.window_attrs(c, &xs[2..], &kernel, true)?;
        if strides.contains(&0) || dil.contains(&0) {
            return invalid("strides and dilations must be at least 1");
        }
        let ceil = c.int("ceil_mode", 0) != 0;
        let include_pad = !max && c.int("count_include_pad", 0) != 0;
        // 1-D pools run as 2-D ones over a unit height.
        let x4 = self.lift_1d(x)?;
        let s4 = self.shape(x4);
        let lift = |v: &[usize], one: usize| -> Vec<usize> {
            if sp == 1 {
                vec![one, v[0]]
            } else {
                v.to_vec()
            }
        };
        let (kernel, strides, dil) = (lift(&kernel, 1), lift(&strides, 1), lift(&dil, 1));
        let (pb, pe) = if sp == 1 {
            (vec![0, pads[0]], vec![0, pads[1]])
        } else {
            (pads[..2].to_vec(), pads[2..].to_vec())
        };
        let plans: Vec<AxisPlan> = (0..2)
            .map(|a| {
                AxisPlan::new(
                    s4[2 + a],
                    (kernel[a], strides[a], dil[a]),
                    (pb[a], pe[a]),
                    ceil,
                    include_pad,
                )
            })
            .collect::<R<_>>()?;
        let fill = if max { f64::NEG_INFINITY } else { 0.0 };
        let mut p = x4;
        for (a, plan) in plans.iter().enumerate() {
            p = self.pad_axis(p, 2 + a, plan, fill)?;
        }
        // [N, C, H', W'] -> [N, C, H'/s_h, s_h, W'/s_w, s_w].
        let (h, w) = (&plans[0], &plans[1]);
        let (n, ch) = (s4[0], s4[1]);
        let p = self.reshape(
            p,
            &[
                n,
                ch,
                h.len / h.stride,
                h.stride,
                w.len / w.stride,
                w.stride,
            ],
        )?;
        let mut acc: Option<NodeId> = None;
        for &(qh, rh) in &h.offsets {
            for &(qw, rw) in &w.offsets {
                let mut v = self.slice(p, 2, qh, qh + h.out)?;
                v = self.slice(v, 3, rh, rh + 1)?;
                v = self.slice(v, 4, qw, qw + w.out)?;
                v = self.slice(v, 5, rw, rw + 1)?;
                acc = Some(match acc {
                    None => v,
                    Some(a) if max => self.bin(BinaryOp::Max, a, v)?,
                    Some(a) => self.add(a, v)?,
                });
            }
        }
        let mut y = acc.ok_or("empty window")?;
        if !max {
            let mut inv = Vec::with_capacity(h.out * w.out);
            for &a in &h.counts {
                for &b in &w.counts {
                    inv.push(1.0 / (a * b) as f32);
                }
            }
            let k = self.konst(Tensor::f32(&[h.out, 1, w.out, 1], inv));
            y = self.mul(y, k)?;
        }
        let out = if sp == 1 {
            vec![n, ch, w.out]
        } else {
            vec![n, ch, h.out, w.out]
        };
        self.reshape(y, &out)
    }

    /// `x` along `axis` laid out as `plan` wants it: `plan.pad` elements of
    /// `fill`, the input (cut where the output never reads it), and `fill`
    /// up to `plan.len`.
    fn pad_axis(&mut self, x: NodeId, axis: usize, plan: &AxisPlan, fill: f64) -> R<NodeId> {
        let keep = plan.n.min(plan.len.saturating_sub(plan.pad));
        let body = self.slice(x, axis, 0, keep)?;
        let after = plan.len - plan.pad - keep;
        self.pad_with(body, axis, (plan.pad, after), fill)
    }

    /// `x` with `pads.0` elements of `value` before it and `pads.1` after it
    /// along `axis`.
    fn pad_with(&mut self, x: NodeId, axis: usize, pads: (usize, usize), value: f64) -> R<NodeId> {
        let s = self.shape(x);
        let fill = |im: &mut Self, len: usize| -> R<NodeId> {
            let mut fs = s.clone();
            fs[axis] = len;
            im.nd(
                Op::Fill {
                    value,
                    ty: TensorType::new(DType::F32, &fs),
                },
                &[],
            )
        };
        let mut parts = vec![];
        if pads.0 > 0 {
            parts.push(fill(self, pads.0)?);
        }
        parts.push(x);
        if pads.1 > 0 {
            parts.push(fill(self, pads.1)?);
        }
        self.concat(&parts, axis)
    }

    /// LRN: `x / (bias + alpha / size * S)^beta`, `S` the sum of squares
    /// over channels `c - floor((size-1)/2) ..= c + ceil((size-1)/2)` (ONNX's
    /// window; channels outside the input count as 0).
    pub(super) fn lrn(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        self.require_float(x, "input")?;
        let xs = self.shape(x);
        if xs.len() < 3 {
            return invalid(format!(
                "input must have rank >= 3 (N, C, spatial...), got {}",
                self.ty(x)
            ));
        }
        let size = to_usize(c.attr("size").ok_or("missing attribute 'size'")?.i, "size")?;
        if size == 0 {
            return invalid("size must be at least 1");
        }
        let alpha = c.float("alpha", 1e-4) as f64;
        let beta = c.float("beta", 0.75) as f64;
        let bias = c.float("bias", 1.0) as f64;
        let (before, after) = ((size - 1) / 2, size - 1 - (size - 1) / 2);
        let sq = self.mul(x, x)?;
        let ch = xs[1];
        let padded = self.pad_with(sq, 1, (before, after), 0.0)?;
        let mut sum: Option<NodeId> = None;
        for i in 0..size {
            let v = self.slice(padded, 1, i, i + ch)?;
            sum = Some(match sum {
                None => v,
                Some(a) => self.add(a, v)?,
            });
        }
        let sum = sum.ok_or("size is 0")?;
        let scaled = self.mul_scalar(sum, alpha / size as f64)?;
        let b = self.scalar(DType::F32, bias);
        let base = self.add(scaled, b)?;
        let e = self.scalar(DType::F32, beta);
        let den = self.pow(base, e)?;
        self.div(x, den)
    }
}
