//! The baseline optimizers' step graphs, evaluated with the f64 reference
//! interpreter for 3 steps on a small quadratic, against hand-written f64
//! implementations of the same updates.
//!
//! Graph constants are f32, so the references use the same f32-rounded
//! hyperparameters (and `1 - beta` computed in f32, as the graph builder does);
//! everything else is f64 on both sides.

use std::collections::HashMap;

use metac_compiler::models::baselines::{Adagrad, Adam, Baseline, RmsProp, Sgd, StepOptimizer};
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::{DType, Graph, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPES: [&[usize]; 2] = [&[3, 2], &[2]];

/// f64 value of a given shape.
fn value(shape: &[usize], data: &[f64]) -> Value {
    let mut v = Value::from_tensor(&Tensor::f32(shape, vec![0.0; data.len()]));
    if let Value::F(a) = &mut v {
        for (x, d) in a.iter_mut().zip(data) {
            *x = *d;
        }
    }
    v
}

fn data(v: &Value) -> Vec<f64> {
    v.f().iter().copied().collect()
}

/// The quadratic `sum 1/2 a x^2 + b x` per tensor: curvatures, offsets.
struct Quadratic {
    a: Vec<Vec<f64>>,
    b: Vec<Vec<f64>>,
}

impl Quadratic {
    fn new(rng: &mut ChaCha8Rng) -> Self {
        let n = |s: &[usize]| s.iter().product::<usize>();
        Quadratic {
            a: SHAPES
                .iter()
                .map(|s| (0..n(s)).map(|_| rng.random_range(0.5..2.0)).collect())
                .collect(),
            b: SHAPES
                .iter()
                .map(|s| (0..n(s)).map(|_| rng.random_range(-1.0..1.0)).collect())
                .collect(),
        }
    }
    fn grad(&self, x: &[Vec<f64>]) -> Vec<Vec<f64>> {
        x.iter()
            .zip(&self.a)
            .zip(&self.b)
            .map(|((x, a), b)| {
                x.iter()
                    .zip(a)
                    .zip(b)
                    .map(|((x, a), b)| a * x + b)
                    .collect()
            })
            .collect()
    }
}

/// A hand-written optimizer over flat f64 vectors.
trait Reference {
    fn step(&mut self, x: &mut [Vec<f64>], g: &[Vec<f64>]);
}

fn f(x: f32) -> f64 {
    x as f64
}

struct AdamRef {
    o: Adam,
    m: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    t: f64,
}
impl Reference for AdamRef {
    fn step(&mut self, x: &mut [Vec<f64>], g: &[Vec<f64>]) {
        let o = self.o;
        self.t += 1.0;
        let bc1 = 1.0 - f(o.beta1).powf(self.t);
        let bc2 = 1.0 - f(o.beta2).powf(self.t);
        for k in 0..x.len() {
            for i in 0..x[k].len() {
                let gi = g[k][i];
                self.m[k][i] = f(o.beta1) * self.m[k][i] + f(1.0 - o.beta1) * gi;
                self.v[k][i] = f(o.beta2) * self.v[k][i] + f(1.0 - o.beta2) * gi * gi;
                let mhat = self.m[k][i] / bc1;
                let vhat = self.v[k][i] / bc2;
                x[k][i] -= f(o.lr) * (mhat / (vhat.sqrt() + f(o.eps)));
            }
        }
    }
}

struct SgdRef {
    o: Sgd,
    buf: Vec<Vec<f64>>,
}
impl Reference for SgdRef {
    fn step(&mut self, x: &mut [Vec<f64>], g: &[Vec<f64>]) {
        for k in 0..x.len() {
            for i in 0..x[k].len() {
                self.buf[k][i] = f(self.o.momentum) * self.buf[k][i] + g[k][i];
                x[k][i] -= f(self.o.lr) * self.buf[k][i];
            }
        }
    }
}

struct RmsPropRef {
    o: RmsProp,
    ms: Vec<Vec<f64>>,
}
impl Reference for RmsPropRef {
    fn step(&mut self, x: &mut [Vec<f64>], g: &[Vec<f64>]) {
        let o = self.o;
        for k in 0..x.len() {
            for i in 0..x[k].len() {
                let gi = g[k][i];
                self.ms[k][i] = f(o.decay) * self.ms[k][i] + f(1.0 - o.decay) * gi * gi;
                x[k][i] -= f(o.lr) * gi / (self.ms[k][i] + f(o.eps)).sqrt();
            }
        }
    }
}

struct AdagradRef {
    o: Adagrad,
    acc: Vec<Vec<f64>>,
}
impl Reference for AdagradRef {
    fn step(&mut self, x: &mut [Vec<f64>], g: &[Vec<f64>]) {
        let o = self.o;
        for k in 0..x.len() {
            for i in 0..x[k].len() {
                let gi = g[k][i];
                self.acc[k][i] += gi * gi;
                x[k][i] -= f(o.lr) * gi / (self.acc[k][i].sqrt() + f(o.eps));
            }
        }
    }
}

fn zeros() -> Vec<Vec<f64>> {
    SHAPES
        .iter()
        .map(|s| vec![0.0; s.iter().product()])
        .collect()
}
fn consts(v: f32) -> Vec<Vec<f64>> {
    SHAPES
        .iter()
        .map(|s| vec![v as f64; s.iter().product()])
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-300
}

/// Run the optimizer's graph and the reference side by side for 3 steps.
fn check(opt: &dyn StepOptimizer, mut reference: Box<dyn Reference>, seed: u64) {
    let shapes: Vec<Vec<usize>> = SHAPES.iter().map(|s| s.to_vec()).collect();
    let mut g = Graph::new();
    let params: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| g.input(&format!("x{k}"), DType::F32, s))
        .collect();
    let grads: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| g.input(&format!("g{k}"), DType::F32, s))
        .collect();
    let state = opt.state_inputs(&mut g, &shapes);
    let (np, ns) = opt.step(&mut g, &params, &grads, &state);
    assert_eq!(np.len(), params.len());
    assert_eq!(ns.len(), state.len());
    for (k, &p) in np.iter().enumerate() {
        g.output(&format!("new.x{k}"), p);
    }
    let specs = opt.state_specs(&shapes);
    for ((name, shape), &s) in specs.iter().zip(&ns) {
        assert_eq!(
            g.shape(s),
            shape.as_slice(),
            "{}: new state {name} shape",
            opt.name()
        );
        g.output(&format!("new.{name}"), s);
    }

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let quad = Quadratic::new(&mut rng);
    let mut x_ref: Vec<Vec<f64>> = shapes
        .iter()
        .map(|s| {
            (0..s.iter().product())
                .map(|_| rng.random_range(-2.0..2.0))
                .collect()
        })
        .collect();
    let mut feeds: HashMap<String, Value> = HashMap::new();
    for (k, s) in shapes.iter().enumerate() {
        feeds.insert(format!("x{k}"), value(s, &x_ref[k]));
    }
    for (name, t) in opt.initial_state(&shapes) {
        feeds.insert(name, Value::from_tensor(&t));
    }
    for step in 0..3 {
        // The graph's own trajectory: its gradient at its own parameters.
        let x_graph: Vec<Vec<f64>> = (0..shapes.len())
            .map(|k| data(&feeds[&format!("x{k}")]))
            .collect();
        let g_graph = quad.grad(&x_graph);
        for (k, s) in shapes.iter().enumerate() {
            feeds.insert(format!("g{k}"), value(s, &g_graph[k]));
        }
        let out = eval_graph(&g, &feeds).unwrap();
        let g_ref = quad.grad(&x_ref);
        reference.step(&mut x_ref, &g_ref);
        for (k, xr) in x_ref.iter().enumerate() {
            let got = data(&out[k].1);
            for (i, (&a, &b)) in got.iter().zip(xr).enumerate() {
                assert!(
                    close(a, b),
                    "{} step {step}: x{k}[{i}] = {a}, reference {b}",
                    opt.name()
                );
                assert!(
                    a != x_graph[k][i],
                    "{} step {step}: x{k}[{i}] did not move",
                    opt.name()
                );
            }
        }
        // Outputs `new.NAME` feed back as inputs `NAME`.
        for (name, v) in out {
            feeds.insert(name.trim_start_matches("new.").to_string(), v);
        }
    }
}

#[test]
fn adam_matches_reference() {
    let o = Adam {
        lr: 0.1,
        ..Adam::default()
    };
    let r = AdamRef {
        o,
        m: zeros(),
        v: zeros(),
        t: 0.0,
    };
    check(&o, Box::new(r), 1);
    // Defaults too (lr 1e-3).
    let o = Adam::default();
    check(
        &o,
        Box::new(AdamRef {
            o,
            m: zeros(),
            v: zeros(),
            t: 0.0,
        }),
        2,
    );
}

#[test]
fn sgd_momentum_matches_reference() {
    let o = Sgd {
        lr: 0.1,
        momentum: 0.9,
    };
    check(&o, Box::new(SgdRef { o, buf: zeros() }), 3);
    assert_eq!(
        o.state_specs(&[vec![3, 2]]),
        vec![("sgd.p0.buf".to_string(), vec![3, 2])]
    );
}

#[test]
fn plain_sgd_matches_reference_and_has_no_state() {
    let o = Sgd {
        lr: 0.1,
        momentum: 0.0,
    };
    assert!(o.state_specs(&[vec![3, 2], vec![2]]).is_empty());
    check(&o, Box::new(SgdRef { o, buf: zeros() }), 4);
}

#[test]
fn rmsprop_matches_reference() {
    let o = RmsProp {
        lr: 0.01,
        ..RmsProp::default()
    };
    check(&o, Box::new(RmsPropRef { o, ms: zeros() }), 5);
    // TF1-style accumulator starting at 1.
    let o = RmsProp {
        lr: 0.01,
        initial_ms: 1.0,
        ..RmsProp::default()
    };
    check(&o, Box::new(RmsPropRef { o, ms: consts(1.0) }), 6);
}

#[test]
fn adagrad_matches_reference() {
    let o = Adagrad {
        lr: 0.1,
        ..Adagrad::default()
    };
    check(
        &o,
        Box::new(AdagradRef {
            o,
            acc: consts(0.1),
        }),
        7,
    );
}

#[test]
fn baseline_enum_dispatches() {
    let o = Adagrad::default();
    let b = Baseline::Adagrad(o);
    assert_eq!(b.name(), "adagrad");
    check(
        &b,
        Box::new(AdagradRef {
            o,
            acc: consts(0.1),
        }),
        8,
    );
    let shapes = [vec![3, 2], vec![2]];
    let a = Baseline::Adam(Adam::default());
    let names: Vec<String> = a.state_specs(&shapes).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["adam.p0.m", "adam.p0.v", "adam.p1.m", "adam.p1.v", "adam.t"]
    );
    let st = a.initial_state(&shapes);
    assert_eq!(st.last().unwrap().1, Tensor::scalar_f32(0.0));
}
