//! Synthetic optimizee problems of the L2O problem set: classic test
//! functions and small problems on random data. The parameters are the point
//! being optimised; any data is drawn once from a fixed seed and baked into
//! the graph as constants, so these problems take no batch inputs.
//!
//! Powers are written as products (not `Pow`), so every loss is a polynomial
//! or exp/log composite of plain elementwise ops.

use metac_graphs::{Graph, NodeId, Tensor};

use metac_contract::init::{InitRule, TensorInit};

use metac_contract::init::SeededRng;

/// The data seed of every synthetic problem: the baked constants are the
/// same in every run and for every parameter-init seed.
pub const DATA_SEED: u64 = 0x6d65_7461_6330_3031;

/// A synthetic problem: the function and its baked data.
#[derive(Clone, Debug, PartialEq)]
pub enum Synthetic {
    /// `1/2 ||W x - y||^2`, `W [n,n]` and `y [n]` with N(0,1) entries.
    Quadratic { w: Tensor, y: Tensor },
    /// `sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2`; minimum 0 at all ones.
    Rosenbrock { dim: usize },
    /// `(1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2`;
    /// minimum 0 at (3, 0.5).
    Beale,
    /// `(x + 2y - 7)^2 + (2x + y - 5)^2`; minimum 0 at (1, 3).
    Booth,
    /// `0.26 (x^2 + y^2) - 0.48 xy`; minimum 0 at (0, 0).
    Matyas,
    /// `1/2 sum_i (x_i^4 - 16 x_i^2 + 5 x_i)`; global minimum
    /// -39.16617 * dim at x_i = -2.903534.
    StyblinskiTang { dim: usize },
    /// Mean softmax cross-entropy of a linear classifier `x W + b` on baked
    /// random data `x [n, d]` (N(0,1)) and labels from a random linear
    /// teacher with a fraction of the labels replaced by random ones.
    SoftmaxRegression {
        x: Tensor,
        labels: Tensor,
        classes: usize,
    },
    /// `logsumexp(A x + b)`, `A = [A0; -A0]` with `A0 [n,n]` and `b [2n]`
    /// N(0,1): convex, and coercive when `A0` is invertible (the stacked
    /// `±A0` rows keep it bounded below).
    LogSumExp { a: Tensor, b: Tensor },
}

fn normal_tensor(rng: &mut SeededRng, shape: &[usize], std: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::f32(shape, (0..n).map(|_| (rng.normal() * std) as f32).collect())
}

impl Synthetic {
    /// `1/2 ||W x - y||^2` of size `n`, data drawn from `seed`.
    pub fn quadratic(n: usize, seed: u64) -> Self {
        let mut rng = SeededRng::new(seed, 0);
        let w = normal_tensor(&mut rng, &[n, n], 1.0);
        let y = normal_tensor(&mut rng, &[n], 1.0);
        Synthetic::Quadratic { w, y }
    }

    /// Softmax regression on `n` random examples of dimension `d` in
    /// `classes` classes; `noise` is the fraction of labels redrawn
    /// uniformly.
    pub fn softmax_regression(n: usize, d: usize, classes: usize, noise: f64, seed: u64) -> Self {
        let mut rng = SeededRng::new(seed, 0);
        let x = normal_tensor(&mut rng, &[n, d], 1.0);
        let teacher = normal_tensor(&mut rng, &[d, classes], 1.0);
        let (xv, tv) = (x.as_f32().unwrap(), teacher.as_f32().unwrap());
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let mut best = (f64::NEG_INFINITY, 0usize);
            for c in 0..classes {
                let s: f64 = (0..d)
                    .map(|k| xv[i * d + k] as f64 * tv[k * classes + c] as f64)
                    .sum();
                if s > best.0 {
                    best = (s, c);
                }
            }
            let label = if rng.uniform() < noise {
                rng.below(classes as u64) as usize
            } else {
                best.1
            };
            labels.push(label as i64);
        }
        Synthetic::SoftmaxRegression {
            x,
            labels: Tensor::i64(&[n], labels),
            classes,
        }
    }

    /// `logsumexp([A0; -A0] x + b)` in `n` dimensions.
    pub fn logsumexp(n: usize, seed: u64) -> Self {
        let mut rng = SeededRng::new(seed, 0);
        let a0 = normal_tensor(&mut rng, &[n, n], 1.0);
        let b = normal_tensor(&mut rng, &[2 * n], 1.0);
        let a0v = a0.as_f32().unwrap();
        let mut a = a0v.to_vec();
        a.extend(a0v.iter().map(|v| -v));
        Synthetic::LogSumExp {
            a: Tensor::f32(&[2 * n, n], a),
            b,
        }
    }

    /// Names and shapes of the parameters, in order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Synthetic::Quadratic { y, .. } => vec![("x".into(), y.shape.clone())],
            Synthetic::Rosenbrock { dim } | Synthetic::StyblinskiTang { dim } => {
                vec![("x".into(), vec![*dim])]
            }
            Synthetic::Beale | Synthetic::Booth | Synthetic::Matyas => vec![("x".into(), vec![2])],
            Synthetic::SoftmaxRegression { x, classes, .. } => {
                vec![
                    ("w".into(), vec![x.shape[1], *classes]),
                    ("b".into(), vec![*classes]),
                ]
            }
            Synthetic::LogSumExp { a, .. } => vec![("x".into(), vec![a.shape[1]])],
        }
    }

    /// How the initial parameters are drawn (the scheme of each problem is
    /// documented at [`crate::models::problems`]): a standard starting point
    /// plus N(0, 0.1^2) noise for the 2-D test functions, N(0, 1) for the
    /// others, small weights and a zero bias for softmax regression.
    pub fn init_rules(&self) -> Vec<TensorInit> {
        let shapes = self.param_shapes();
        let around = |start: Vec<f32>| {
            vec![TensorInit::new(
                &shapes[0].0,
                &[start.len()],
                InitRule::NormalAround {
                    point: start,
                    std: 0.1,
                    stream: 0,
                },
            )]
        };
        match self {
            Synthetic::Quadratic { .. }
            | Synthetic::LogSumExp { .. }
            | Synthetic::StyblinskiTang { .. } => shapes
                .iter()
                .enumerate()
                .map(|(i, (n, s))| {
                    TensorInit::new(
                        n,
                        s,
                        InitRule::Normal {
                            std: 1.0,
                            stream: i as u64,
                        },
                    )
                })
                .collect(),
            // The classic (-1.2, 1, -1.2, 1, ...) start.
            Synthetic::Rosenbrock { dim } => around(
                (0..*dim)
                    .map(|i| if i % 2 == 0 { -1.2 } else { 1.0 })
                    .collect(),
            ),
            Synthetic::Beale => around(vec![1.0, 1.0]),
            Synthetic::Booth => around(vec![0.0, 0.0]),
            Synthetic::Matyas => around(vec![5.0, 3.0]),
            // Small weights, zero bias: the loss starts near ln(classes).
            Synthetic::SoftmaxRegression { .. } => vec![
                TensorInit::new(
                    &shapes[0].0,
                    &shapes[0].1,
                    InitRule::Normal {
                        std: 0.01,
                        stream: 0,
                    },
                ),
                TensorInit::new(
                    &shapes[1].0,
                    &shapes[1].1,
                    InitRule::Constant { value: 0.0 },
                ),
            ],
        }
    }

    /// Deterministic initial parameters for `seed` ([`Synthetic::init_rules`] drawn).
    pub fn init_params(&self, seed: u64) -> Vec<Tensor> {
        self.init_rules().iter().map(|r| r.draw(seed)).collect()
    }

    /// The global minimiser and minimum value, where they are known exactly
    /// (in f32).
    pub fn known_minimum(&self) -> Option<(Vec<Tensor>, f64)> {
        let pt = |v: Vec<f32>| Some((vec![Tensor::f32(&[v.len()], v)], 0.0));
        match self {
            Synthetic::Rosenbrock { dim } => pt(vec![1.0; *dim]),
            Synthetic::Beale => pt(vec![3.0, 0.5]),
            Synthetic::Booth => pt(vec![1.0, 3.0]),
            Synthetic::Matyas => pt(vec![0.0, 0.0]),
            _ => None,
        }
    }

    /// The scalar loss at `params` (graph nodes of the shapes of
    /// [`Synthetic::param_shapes`]).
    pub fn loss(&self, g: &mut Graph, params: &[NodeId]) -> NodeId {
        match self {
            Synthetic::Quadratic { w, y } => {
                let (w, y) = (g.constant(w.clone()), g.constant(y.clone()));
                quadratic(g, params[0], w, y)
            }
            Synthetic::Rosenbrock { .. } => rosenbrock(g, params[0]),
            Synthetic::Beale => beale(g, params[0]),
            Synthetic::Booth => booth(g, params[0]),
            Synthetic::Matyas => matyas(g, params[0]),
            Synthetic::StyblinskiTang { .. } => styblinski_tang(g, params[0]),
            Synthetic::SoftmaxRegression { labels, .. } => {
                let logits = self.logits(g, params).expect("classifier");
                let labels = g.constant(labels.clone());
                g.softmax_cross_entropy(logits, labels)
            }
            Synthetic::LogSumExp { a, b } => {
                let n = a.shape[1];
                let (a, b) = (g.constant(a.clone()), g.constant(b.clone()));
                let xc = g.reshape(params[0], &[n, 1]);
                let ax = g.matmul(a, xc);
                let m = g.shape(ax)[0];
                let ax = g.reshape(ax, &[m]);
                let z = g.add(ax, b);
                logsumexp(g, z)
            }
        }
    }

    /// Logits of the classifier problems (on the baked data).
    pub fn logits(&self, g: &mut Graph, params: &[NodeId]) -> Option<NodeId> {
        match self {
            Synthetic::SoftmaxRegression { x, .. } => {
                let x = g.constant(x.clone());
                let z = g.matmul(x, params[0]);
                Some(g.add(z, params[1]))
            }
            _ => None,
        }
    }

    /// The baked labels of the classifier problems.
    pub fn labels(&self) -> Option<&Tensor> {
        match self {
            Synthetic::SoftmaxRegression { labels, .. } => Some(labels),
            _ => None,
        }
    }
}

// ---- the functions, on graph nodes ------------------------------------------

/// Elements `i` of a rank-1 node, as `[1]` nodes.
fn coords(g: &mut Graph, x: NodeId) -> Vec<NodeId> {
    let n = g.shape(x)[0];
    (0..n).map(|i| g.slice(x, 0, i, i + 1)).collect()
}

/// `1/2 ||W x - y||^2` for `x [n]`, `W [m, n]`, `y [m]`.
pub fn quadratic(g: &mut Graph, x: NodeId, w: NodeId, y: NodeId) -> NodeId {
    let n = g.shape(x)[0];
    let m = g.shape(w)[0];
    let xc = g.reshape(x, &[n, 1]);
    let wx = g.matmul(w, xc);
    let wx = g.reshape(wx, &[m]);
    let r = g.sub(wx, y);
    let r2 = g.square(r);
    let s = g.sum_all(r2);
    g.mul_scalar(s, 0.5)
}

/// Rosenbrock in sum form on `x [n]`, `n >= 2`.
pub fn rosenbrock(g: &mut Graph, x: NodeId) -> NodeId {
    let n = g.shape(x)[0];
    assert!(n >= 2, "rosenbrock needs at least 2 dimensions");
    let head = g.slice(x, 0, 0, n - 1);
    let tail = g.slice(x, 0, 1, n);
    let h2 = g.square(head);
    let d = g.sub(tail, h2);
    let d2 = g.square(d);
    let t1 = g.mul_scalar(d2, 100.0);
    let one = g.scalar(1.0);
    let e = g.sub(one, head);
    let t2 = g.square(e);
    let t = g.add(t1, t2);
    g.sum_all(t)
}

/// Beale on `x [2]`.
pub fn beale(g: &mut Graph, x: NodeId) -> NodeId {
    let c = coords(g, x);
    let (a, b) = (c[0], c[1]);
    let mut total: Option<NodeId> = None;
    let mut ypow = b;
    for (k, cst) in [1.5f32, 2.25, 2.625].into_iter().enumerate() {
        if k > 0 {
            ypow = g.mul(ypow, b);
        }
        let xy = g.mul(a, ypow);
        let cc = g.scalar(cst);
        let t = g.sub(cc, a);
        let t = g.add(t, xy);
        let t2 = g.square(t);
        total = g.add_opt(total, Some(t2));
    }
    g.sum_all(total.unwrap())
}

/// Booth on `x [2]`.
pub fn booth(g: &mut Graph, x: NodeId) -> NodeId {
    let c = coords(g, x);
    let (a, b) = (c[0], c[1]);
    let b2 = g.mul_scalar(b, 2.0);
    let t1 = g.add(a, b2);
    let t1 = g.add_scalar(t1, -7.0);
    let a2 = g.mul_scalar(a, 2.0);
    let t2 = g.add(a2, b);
    let t2 = g.add_scalar(t2, -5.0);
    let s1 = g.square(t1);
    let s2 = g.square(t2);
    let s = g.add(s1, s2);
    g.sum_all(s)
}

/// Matyas on `x [2]`.
pub fn matyas(g: &mut Graph, x: NodeId) -> NodeId {
    let c = coords(g, x);
    let (a, b) = (c[0], c[1]);
    let x2 = g.square(x);
    let r2 = g.sum_all(x2);
    let t1 = g.mul_scalar(r2, 0.26);
    let ab = g.mul(a, b);
    let ab = g.sum_all(ab);
    let t2 = g.mul_scalar(ab, 0.48);
    g.sub(t1, t2)
}

/// Styblinski-Tang on `x [n]`.
pub fn styblinski_tang(g: &mut Graph, x: NodeId) -> NodeId {
    let x2 = g.square(x);
    let x4 = g.square(x2);
    let t2 = g.mul_scalar(x2, -16.0);
    let t3 = g.mul_scalar(x, 5.0);
    let t = g.add(x4, t2);
    let t = g.add(t, t3);
    let s = g.sum_all(t);
    g.mul_scalar(s, 0.5)
}

/// Numerically stable `log(sum(exp(z)))` of a rank-1 `z`, as a scalar. The
/// shift by the (gradient-stopped) maximum does not change the value, so the
/// gradient is exact.
pub fn logsumexp(g: &mut Graph, z: NodeId) -> NodeId {
    let m = g.reduce_max(z, &[0], true);
    let m = g.stop_gradient(m);
    let d = g.sub(z, m);
    let e = g.exp(d);
    let s = g.sum_all(e);
    let l = g.log(s);
    let m = g.reshape(m, &[]);
    g.add(l, m)
}
