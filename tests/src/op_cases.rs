//! Shared test material: one small case per op, and the harness that wraps
//! a case in a loss with first-, second- and third-order derivative outputs.

use metac_graphs::autodiff::{
    grad, hvp_forward_over_reverse, hvp_reverse_over_reverse, inner_product,
};
use metac_graphs::eval::Value;
use metac_graphs::{ConvParams, DType, Graph, NodeId, Tensor};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to draw an input: uniform in [lo, hi], or integers below `n` (indices).
#[derive(Clone, Copy)]
pub enum Dist {
    U(f64, f64),
    Idx(i64),
}

pub struct Case {
    pub name: &'static str,
    pub inputs: Vec<(Vec<usize>, Dist)>,
    pub build: fn(&mut Graph, &[NodeId]) -> NodeId,
}

fn case(
    name: &'static str,
    inputs: Vec<(Vec<usize>, Dist)>,
    build: fn(&mut Graph, &[NodeId]) -> NodeId,
) -> Case {
    Case {
        name,
        inputs,
        build,
    }
}

pub fn sample(rng: &mut ChaCha8Rng, shape: &[usize], d: Dist) -> Value {
    let n: usize = shape.iter().product();
    match d {
        Dist::U(lo, hi) => Value::F(
            ArrayD::from_shape_vec(
                IxDyn(shape),
                (0..n).map(|_| rng.random_range(lo..hi)).collect(),
            )
            .unwrap(),
        ),
        Dist::Idx(k) => Value::I(
            ArrayD::from_shape_vec(
                IxDyn(shape),
                (0..n).map(|_| rng.random_range(0..k)).collect(),
            )
            .unwrap(),
        ),
    }
}

/// Build `loss = sum(r1 * y + r2 * y^2)` around the case's output so that
/// every op sees a non-trivial cotangent and a non-zero second derivative.
pub struct Harness {
    pub g: Graph,
    pub float_inputs: Vec<(String, NodeId)>,
}

pub fn harness(c: &Case, rng: &mut ChaCha8Rng) -> Harness {
    let mut g = Graph::new();
    let mut xs = vec![];
    for (i, (s, d)) in c.inputs.iter().enumerate() {
        let dt = if matches!(d, Dist::Idx(_)) {
            DType::I64
        } else {
            DType::F32
        };
        xs.push(g.input(&format!("x{i}"), dt, s));
    }
    let y = (c.build)(&mut g, &xs);
    harness_on(g, y, rng)
}

/// The derivative harness of a graph `g` with a float output `y`: the loss
/// `sum(r1 * y + r2 * y^2)` (random constants), its gradient `g{i}` with
/// respect to every float input, both HVPs (`hf{i}`, `hr{i}`) along inputs
/// `v{i}`, and the gradient `t{i}` of `t = <HVP(v), w>` (third order) with
/// `w{i}`.
pub fn harness_on(mut g: Graph, y: NodeId, rng: &mut ChaCha8Rng) -> Harness {
    let ys = g.shape(y).to_vec();
    let n: usize = ys.iter().product();
    let r1 = g.constant(Tensor::f32(
        &ys,
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect(),
    ));
    let r2 = g.constant(Tensor::f32(
        &ys,
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect(),
    ));
    let a = g.mul(r1, y);
    let y2 = g.mul(y, y);
    let b = g.mul(r2, y2);
    let s = g.add(a, b);
    let loss = g.sum_all(s);
    let float_inputs: Vec<(String, NodeId)> = g
        .inputs()
        .into_iter()
        .filter(|(_, id)| g.dtype(*id) == DType::F32)
        .collect();
    let wrt: Vec<NodeId> = float_inputs.iter().map(|(_, id)| *id).collect();
    let vs: Vec<NodeId> = wrt
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let s = g.shape(w).to_vec();
            g.input(&format!("v{i}"), DType::F32, &s)
        })
        .collect();
    let ws: Vec<NodeId> = wrt
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let s = g.shape(w).to_vec();
            g.input(&format!("w{i}"), DType::F32, &s)
        })
        .collect();
    g.output("loss", loss);
    let grads = grad(&mut g, loss, &wrt);
    let hvp_fr = hvp_forward_over_reverse(&mut g, loss, &wrt, &vs);
    let hvp_rr = hvp_reverse_over_reverse(&mut g, loss, &wrt, &vs);
    // Third order: gradient of <HVP(v), w>.
    let t = inner_product(&mut g, &hvp_rr, &ws);
    g.output("t", t);
    let third = grad(&mut g, t, &wrt);
    for (i, id) in grads.iter().enumerate() {
        g.output(&format!("g{i}"), *id);
    }
    for (i, id) in hvp_fr.iter().enumerate() {
        g.output(&format!("hf{i}"), *id);
    }
    for (i, id) in hvp_rr.iter().enumerate() {
        g.output(&format!("hr{i}"), *id);
    }
    for (i, id) in third.iter().enumerate() {
        g.output(&format!("t{i}"), *id);
    }
    Harness { g, float_inputs }
}

pub fn cases() -> Vec<Case> {
    use Dist::*;
    let s = |d: &[usize]| d.to_vec();
    let u = U(-1.5, 1.5);
    let pos = U(0.5, 2.0);
    vec![
        case("neg", vec![(s(&[3, 4]), u)], |g, x| g.neg(x[0])),
        case("exp", vec![(s(&[3, 4]), u)], |g, x| g.exp(x[0])),
        case("log", vec![(s(&[3, 4]), pos)], |g, x| g.log(x[0])),
        case("sqrt", vec![(s(&[3, 4]), pos)], |g, x| g.sqrt(x[0])),
        case("sigmoid", vec![(s(&[3, 4]), u)], |g, x| g.sigmoid(x[0])),
        case("tanh", vec![(s(&[3, 4]), u)], |g, x| g.tanh(x[0])),
        case("relu", vec![(s(&[3, 4]), u)], |g, x| g.relu(x[0])),
        case("abs", vec![(s(&[3, 4]), u)], |g, x| g.abs(x[0])),
        case("sign", vec![(s(&[3, 4]), u)], |g, x| {
            let sg = g.sign(x[0]);
            g.mul(sg, x[0])
        }),
        case("asinh", vec![(s(&[3, 4]), U(-3.0, 3.0))], |g, x| {
            g.asinh(x[0])
        }),
        case("erf", vec![(s(&[3, 4]), u)], |g, x| g.erf(x[0])),
        case(
            "add_broadcast",
            vec![(s(&[3, 4]), u), (s(&[4]), u)],
            |g, x| g.add(x[0], x[1]),
        ),
        case(
            "sub_broadcast",
            vec![(s(&[3, 1]), u), (s(&[1, 4]), u)],
            |g, x| g.sub(x[0], x[1]),
        ),
        case(
            "mul_broadcast",
            vec![(s(&[2, 3, 4]), u), (s(&[3, 1]), u)],
            |g, x| g.mul(x[0], x[1]),
        ),
        case("div", vec![(s(&[3, 4]), u), (s(&[3, 4]), pos)], |g, x| {
            g.div(x[0], x[1])
        }),
        case(
            "pow",
            vec![(s(&[3, 4]), pos), (s(&[3, 4]), U(-1.0, 2.0))],
            |g, x| g.pow(x[0], x[1]),
        ),
        case("min", vec![(s(&[3, 4]), u), (s(&[3, 4]), u)], |g, x| {
            g.min(x[0], x[1])
        }),
        case("max", vec![(s(&[3, 4]), u), (s(&[4]), u)], |g, x| {
            g.max(x[0], x[1])
        }),
        case(
            "where_compare",
            vec![(s(&[3, 4]), u), (s(&[3, 4]), u)],
            |g, x| {
                let c = g.less(x[0], x[1]);
                let a = g.mul(x[0], x[1]);
                let b = g.exp(x[1]);
                g.where_(c, a, b)
            },
        ),
        case("greater_equal_not_cast", vec![(s(&[3, 4]), u)], |g, x| {
            let z = g.scalar(0.0);
            let gt = g.greater(x[0], z);
            let eq = g.equal(x[0], x[0]);
            let ng = g.not(gt);
            let m = g.where_(eq, ng, gt);
            let f = g.cast(m, DType::F32);
            let e = g.exp(x[0]);
            g.mul(f, e)
        }),
        case("matmul", vec![(s(&[3, 4]), u), (s(&[4, 5]), u)], |g, x| {
            g.matmul(x[0], x[1])
        }),
        case(
            "matmul_batched",
            vec![(s(&[2, 3, 4]), u), (s(&[2, 4, 2]), u)],
            |g, x| g.matmul(x[0], x[1]),
        ),
        case(
            "matmul_broadcast_weight",
            vec![(s(&[2, 3, 4]), u), (s(&[4, 2]), u)],
            |g, x| g.matmul(x[0], x[1]),
        ),
        case(
            "matmul_broadcast_batch",
            vec![(s(&[2, 1, 3, 4]), u), (s(&[3, 4, 2]), u)],
            |g, x| g.matmul(x[0], x[1]),
        ),
        case("reduce_sum", vec![(s(&[2, 3, 4]), u)], |g, x| {
            g.sum(x[0], &[0, 2], false)
        }),
        case("reduce_mean_keep", vec![(s(&[2, 3, 4]), u)], |g, x| {
            g.mean(x[0], &[1], true)
        }),
        case("reduce_max", vec![(s(&[2, 3, 4]), u)], |g, x| {
            g.reduce_max(x[0], &[2], false)
        }),
        case("reshape", vec![(s(&[2, 6]), u)], |g, x| {
            let r = g.reshape(x[0], &[3, 4]);
            g.exp(r)
        }),
        case("transpose", vec![(s(&[2, 3, 4]), u)], |g, x| {
            g.transpose(x[0], &[2, 0, 1])
        }),
        case("concat", vec![(s(&[2, 3]), u), (s(&[2, 2]), u)], |g, x| {
            g.concat(&[x[0], x[1], x[0]], 1)
        }),
        case("slice", vec![(s(&[4, 5]), u)], |g, x| {
            g.slice(x[0], 1, 1, 4)
        }),
        case(
            "gather",
            vec![(s(&[5, 3]), u), (s(&[2, 4]), Idx(5))],
            |g, x| g.gather(x[0], x[1], 0),
        ),
        case(
            "scatter_add",
            vec![(s(&[5, 3]), u), (s(&[6]), Idx(5)), (s(&[6, 3]), u)],
            |g, x| g.scatter_add(x[0], x[1], x[2]),
        ),
        case(
            "gather_axis1",
            vec![(s(&[2, 5, 3]), u), (s(&[4]), Idx(5))],
            |g, x| g.gather(x[0], x[1], 1),
        ),
        case("expand", vec![(s(&[3, 1]), u)], |g, x| {
            g.expand(x[0], &[2, 3, 4])
        }),
        case("softmax", vec![(s(&[3, 4]), u)], |g, x| g.softmax(x[0], 1)),
        case("softmax_axis0", vec![(s(&[3, 4]), u)], |g, x| {
            g.softmax(x[0], 0)
        }),
        case("log_softmax", vec![(s(&[3, 4]), u)], |g, x| {
            g.log_softmax(x[0], 1)
        }),
        case(
            "cross_entropy",
            vec![(s(&[4, 5]), u), (s(&[4]), Idx(5))],
            |g, x| g.softmax_cross_entropy(x[0], x[1]),
        ),
        case(
            "conv2d",
            vec![(s(&[2, 2, 5, 5]), u), (s(&[3, 2, 3, 3]), u)],
            |g, x| g.conv2d(x[0], x[1], ConvParams::default()),
        ),
        case(
            "conv2d_stride_pad",
            vec![(s(&[1, 2, 6, 5]), u), (s(&[2, 2, 3, 2]), u)],
            |g, x| {
                g.conv2d(
                    x[0],
                    x[1],
                    ConvParams {
                        stride: [2, 2],
                        pads: [1, 0, 1, 1],
                        dilation: [1, 1],
                        group: 1,
                    },
                )
            },
        ),
        case(
            "conv2d_dilation",
            vec![(s(&[1, 1, 7, 7]), u), (s(&[2, 1, 2, 3]), u)],
            |g, x| {
                g.conv2d(
                    x[0],
                    x[1],
                    ConvParams {
                        stride: [1, 2],
                        pads: [1, 1, 0, 1],
                        dilation: [2, 2],
                        group: 1,
                    },
                )
            },
        ),
        case(
            "conv_transpose",
            vec![(s(&[1, 2, 3, 3]), u), (s(&[2, 3, 3, 3]), u)],
            |g, x| {
                metac_graphs::ops::conv::conv_transpose_to(
                    g,
                    x[0],
                    x[1],
                    &ConvParams {
                        stride: [2, 2],
                        pads: [1, 1, 1, 1],
                        dilation: [1, 1],
                        group: 1,
                    },
                    [6, 5],
                )
            },
        ),
        case(
            "conv2d_grouped",
            vec![(s(&[2, 4, 5, 6]), u), (s(&[6, 2, 3, 2]), u)],
            |g, x| {
                g.conv2d(
                    x[0],
                    x[1],
                    ConvParams {
                        stride: [2, 1],
                        pads: [1, 0, 1, 1],
                        dilation: [1, 2],
                        group: 2,
                    },
                )
            },
        ),
        case(
            "conv2d_depthwise",
            vec![(s(&[1, 3, 5, 5]), u), (s(&[3, 1, 3, 3]), u)],
            |g, x| {
                g.conv2d(
                    x[0],
                    x[1],
                    ConvParams {
                        stride: [2, 2],
                        pads: [1, 1, 1, 1],
                        dilation: [1, 1],
                        group: 3,
                    },
                )
            },
        ),
        case(
            "conv_transpose_grouped",
            vec![(s(&[1, 4, 3, 3]), u), (s(&[4, 3, 2, 3]), u)],
            |g, x| {
                metac_graphs::ops::conv::conv_transpose_to(
                    g,
                    x[0],
                    x[1],
                    &ConvParams {
                        stride: [2, 1],
                        pads: [0, 1, 1, 0],
                        dilation: [1, 1],
                        group: 2,
                    },
                    [6, 4],
                )
            },
        ),
    ]
}

/// Inputs for a case's harness: the case's inputs, and random directions
/// `v*`, `w*` for every float input.
pub fn harness_inputs(c: &Case, h: &Harness, rng: &mut ChaCha8Rng) -> Vec<(String, Value)> {
    let mut env = vec![];
    for (i, (s, d)) in c.inputs.iter().enumerate() {
        env.push((format!("x{i}"), sample(rng, s, *d)));
    }
    for (i, (name, _)) in h.float_inputs.iter().enumerate() {
        let s = env
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .shape()
            .to_vec();
        env.push((format!("v{i}"), sample(rng, &s, Dist::U(-1.0, 1.0))));
        env.push((format!("w{i}"), sample(rng, &s, Dist::U(-1.0, 1.0))));
    }
    env
}

/// A deterministic generator for tests.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}
