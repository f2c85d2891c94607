//! 2-D convolution (NCHW input, OIHW weight, optionally grouped) and its
//! adjoint in the input, the transposed convolution. The weight gradient of
//! either is a (grouped) convolution of transposed tensors, so the pair is
//! closed under differentiation.
//!
//! With `group = G`, the `C` input channels and `O` output channels split
//! into `G` groups; output channel `o` reads only the `C / G` input channels
//! of its group `o / (O / G)`, through weight `[O, C / G, kh, kw]` (ONNX's
//! `group`; depthwise convolution is `G = C`). One op, whatever `G`: a
//! 576-group convolution is one node, as are its adjoints.

use ndarray::{Array4, ArrayD, IxDyn};

use crate::eval::Value;
use crate::graph::{Graph, NodeId};
use crate::types::{DType, TensorType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvParams {
    pub stride: [usize; 2],
    /// top, left, bottom, right (ONNX order: begins then ends).
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    /// Channel groups (1: an ordinary convolution).
    pub group: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        ConvParams {
            stride: [1, 1],
            pads: [0; 4],
            dilation: [1, 1],
            group: 1,
        }
    }
}

fn check4(x: &TensorType, w: &TensorType) -> Result<(), String> {
    if x.dtype != DType::F32 || w.dtype != DType::F32 || x.rank() != 4 || w.rank() != 4 {
        return Err("expects f32 input and weight of rank 4".into());
    }
    Ok(())
}

fn out_len(input: usize, pad: usize, k: usize, s: usize, d: usize) -> Option<usize> {
    let eff = d * (k - 1) + 1;
    (input + pad >= eff).then(|| (input + pad - eff) / s + 1)
}

pub fn conv_shape(x: &TensorType, w: &TensorType, p: &ConvParams) -> Result<TensorType, String> {
    check4(x, w)?;
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (o, ci, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    let gr = p.group;
    if gr == 0 || o % gr != 0 || c != ci * gr {
        return Err(format!(
            "input has {c} channels, weight {:?} with group={gr} expects {}",
            w.shape,
            ci * gr
        ));
    }
    let ho = out_len(h, p.pads[0] + p.pads[2], kh, p.stride[0], p.dilation[0])
        .ok_or("kernel larger than padded input")?;
    let wo = out_len(wd, p.pads[1] + p.pads[3], kw, p.stride[1], p.dilation[1])
        .ok_or("kernel larger than padded input")?;
    Ok(TensorType::f32(&[n, o, ho, wo]))
}

/// Output size of the transposed convolution along one axis.
fn tr_len(input: usize, pad: usize, k: usize, s: usize, d: usize, op: usize) -> Option<usize> {
    (s * (input - 1) + op + d * (k - 1) + 1).checked_sub(pad)
}

pub fn conv_transpose_shape(
    x: &TensorType,
    w: &TensorType,
    p: &ConvParams,
    op: [usize; 2],
) -> Result<TensorType, String> {
    check4(x, w)?;
    let (n, o, ho, wo) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (wo_, cg, kh, kw) = (w.shape[0], w.shape[1], w.shape[2], w.shape[3]);
    let gr = p.group;
    if o != wo_ || gr == 0 || o % gr != 0 {
        return Err(format!(
            "input has {o} channels, weight {:?} with group={gr} expects {wo_}",
            w.shape
        ));
    }
    let c = cg * gr;
    let h = tr_len(
        ho,
        p.pads[0] + p.pads[2],
        kh,
        p.stride[0],
        p.dilation[0],
        op[0],
    )
    .ok_or("padding exceeds output")?;
    let wd = tr_len(
        wo,
        p.pads[1] + p.pads[3],
        kw,
        p.stride[1],
        p.dilation[1],
        op[1],
    )
    .ok_or("padding exceeds output")?;
    Ok(TensorType::f32(&[n, c, h, wd]))
}

fn as4(a: &ArrayD<f64>) -> ndarray::ArrayView4<'_, f64> {
    a.view().into_dimensionality().expect("rank 4")
}

/// Calls `f(n, o, oy, ox, c, iy, ix, a, b, ci)` for every (output, input,
/// tap) triple of the forward convolution whose input position is in range:
/// `c` indexes the weight's input channels, `ci` the input's (`c` in the
/// group of `o`).
fn for_each_tap(
    xs: &[usize],
    ws: &[usize],
    ys: &[usize],
    p: &ConvParams,
    mut f: impl FnMut([usize; 10]),
) {
    let per_group = ys[1] / p.group;
    for n in 0..ys[0] {
        for o in 0..ys[1] {
            let first = (o / per_group) * ws[1];
            for oy in 0..ys[2] {
                for ox in 0..ys[3] {
                    for c in 0..ws[1] {
                        for a in 0..ws[2] {
                            let iy = (oy * p.stride[0] + a * p.dilation[0]) as isize
                                - p.pads[0] as isize;
                            if iy < 0 || iy >= xs[2] as isize {
                                continue;
                            }
                            for b in 0..ws[3] {
                                let ix = (ox * p.stride[1] + b * p.dilation[1]) as isize
                                    - p.pads[1] as isize;
                                if ix < 0 || ix >= xs[3] as isize {
                                    continue;
                                }
                                f([n, o, oy, ox, c, iy as usize, ix as usize, a, b, first + c]);
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn conv_eval(x: &Value, w: &Value, p: &ConvParams, out: &TensorType) -> Value {
    let (xa, wa) = (as4(x.f()), as4(w.f()));
    let s = &out.shape;
    let mut y = Array4::<f64>::zeros((s[0], s[1], s[2], s[3]));
    for_each_tap(
        xa.shape(),
        wa.shape(),
        s,
        p,
        |[n, o, oy, ox, c, iy, ix, a, b, ci]| {
            y[[n, o, oy, ox]] += xa[[n, ci, iy, ix]] * wa[[o, c, a, b]];
        },
    );
    Value::F(y.into_dyn())
}

pub fn conv_transpose_eval(x: &Value, w: &Value, p: &ConvParams, out: &TensorType) -> Value {
    // x plays the role of the forward conv's output, `out` of its input.
    let (xa, wa) = (as4(x.f()), as4(w.f()));
    let s = &out.shape;
    let mut y = Array4::<f64>::zeros((s[0], s[1], s[2], s[3]));
    for_each_tap(
        s,
        wa.shape(),
        xa.shape(),
        p,
        |[n, o, oy, ox, c, iy, ix, a, b, ci]| {
            y[[n, ci, iy, ix]] += xa[[n, o, oy, ox]] * wa[[o, c, a, b]];
        },
    );
    Value::F(ArrayD::from_shape_vec(IxDyn(s), y.into_raw_vec_and_offset().0).unwrap())
}

/// Gradient of <gout, conv(inp, W)> with respect to W, as a convolution of
/// the transposed tensors: batch and channel axes swap roles, and stride and
/// dilation swap too. With groups, the input's channels of group `g` become
/// the batch entries `n` of channel block `g`: `[N, G, C/G, H, W]` is laid
/// out as `[C/G, G * N, H, W]` and convolved in `G` groups with the output
/// gradient `[O, N, Ho, Wo]`, which gives `[C/G, O, kh, kw]`, the weight's
/// layout once transposed.
pub fn filter_grad(
    g: &mut Graph,
    inp: NodeId,
    gout: NodeId,
    p: &ConvParams,
    kernel: [usize; 2],
) -> NodeId {
    let s = g.shape(inp).to_vec();
    let gr = p.group;
    let it = if gr == 1 {
        g.transpose(inp, &[1, 0, 2, 3])
    } else {
        let (n, cg) = (s[0], s[1] / gr);
        let r = g.reshape(inp, &[n, gr, cg, s[2], s[3]]);
        let t = g.transpose(r, &[2, 1, 0, 3, 4]);
        g.reshape(t, &[cg, gr * n, s[2], s[3]])
    };
    let gt = g.transpose(gout, &[1, 0, 2, 3]);
    let q = ConvParams {
        stride: p.dilation,
        pads: p.pads,
        dilation: p.stride,
        group: gr,
    };
    let z = g.conv2d(it, gt, q);
    let z = g.slice(z, 2, 0, kernel[0]);
    let z = g.slice(z, 3, 0, kernel[1]);
    g.transpose(z, &[1, 0, 2, 3])
}

/// Transposed convolution that produces exactly `target` spatial size.
pub fn conv_transpose_to(
    g: &mut Graph,
    dy: NodeId,
    w: NodeId,
    p: &ConvParams,
    target: [usize; 2],
) -> NodeId {
    let (ys, ws) = (g.shape(dy).to_vec(), g.shape(w).to_vec());
    let mut op = [0; 2];
    for i in 0..2 {
        let base = tr_len(
            ys[2 + i],
            p.pads[i] + p.pads[i + 2],
            ws[2 + i],
            p.stride[i],
            p.dilation[i],
            0,
        )
        .unwrap_or(0);
        op[i] = target[i].saturating_sub(base);
    }
    g.node_with(
        super::Op::ConvTranspose2d {
            params: *p,
            output_padding: op,
        },
        &[dy, w],
    )
}

pub fn conv_vjp(
    g: &mut Graph,
    x: NodeId,
    w: NodeId,
    p: &ConvParams,
    dy: NodeId,
) -> Vec<Option<NodeId>> {
    let (xs, ws) = (g.shape(x).to_vec(), g.shape(w).to_vec());
    let dx = conv_transpose_to(g, dy, w, p, [xs[2], xs[3]]);
    let dw = filter_grad(g, x, dy, p, [ws[2], ws[3]]);
    vec![Some(dx), Some(dw)]
}

pub fn conv_transpose_vjp(
    g: &mut Graph,
    x: NodeId,
    w: NodeId,
    p: &ConvParams,
    dy: NodeId,
) -> Vec<Option<NodeId>> {
    let ws = g.shape(w).to_vec();
    let dx = g.conv2d(dy, w, *p);
    let dw = filter_grad(g, dy, x, p, [ws[2], ws[3]]);
    vec![Some(dx), Some(dw)]
}
