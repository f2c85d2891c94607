//! Multilayer perceptrons on flattened images (the MNIST optimizees).

use metac_graphs::{DType, Graph, NodeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Sigmoid,
    Relu,
}

/// An MLP with the given layer sizes (`[784, 20, 10]` is the L2O training
/// problem). Parameters are graph inputs named `w{i}`, `b{i}`.
pub struct Mlp {
    pub sizes: Vec<usize>,
    pub activation: Activation,
}

impl Mlp {
    pub fn new(sizes: &[usize], activation: Activation) -> Self {
        Mlp {
            sizes: sizes.to_vec(),
            activation,
        }
    }

    /// Names and shapes of the parameters, in order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![];
        for (i, w) in self.sizes.windows(2).enumerate() {
            v.push((format!("w{i}"), vec![w[0], w[1]]));
            v.push((format!("b{i}"), vec![w[1]]));
        }
        v
    }

    /// Number of FLOPs of one forward pass on `batch` examples (2 per
    /// multiply-add of the matrix products).
    pub fn forward_flops(&self, batch: usize) -> u64 {
        self.sizes
            .windows(2)
            .map(|w| 2 * (batch * w[0] * w[1]) as u64)
            .sum()
    }

    /// Declare the parameters as graph inputs.
    pub fn params(&self, g: &mut Graph) -> Vec<NodeId> {
        self.param_shapes()
            .iter()
            .map(|(n, s)| g.input(n, DType::F32, s))
            .collect()
    }

    /// Logits for `x[N, 784]`.
    pub fn logits(&self, g: &mut Graph, params: &[NodeId], x: NodeId) -> NodeId {
        let layers = self.sizes.len() - 1;
        let mut h = x;
        for i in 0..layers {
            let z = g.matmul(h, params[2 * i]);
            h = g.add(z, params[2 * i + 1]);
            if i + 1 < layers {
                h = match self.activation {
                    Activation::Sigmoid => g.sigmoid(h),
                    Activation::Relu => g.relu(h),
                };
            }
        }
        h
    }

    /// Mean softmax cross-entropy on `x[N, 784]`, `labels[N]` (i64).
    pub fn loss(&self, g: &mut Graph, params: &[NodeId], x: NodeId, labels: NodeId) -> NodeId {
        let logits = self.logits(g, params, x);
        g.softmax_cross_entropy(logits, labels)
    }

    /// [`Self::loss`], computed with the examples as columns: activations
    /// `[units, N]`, the first layer `W^T @ x^T`, the softmax over rows.
    ///
    /// The value is the same; the layout is what suits a large set. Every
    /// tensor after the first product is a few rows of `N` columns, which
    /// the fusion of column-local values runs as one kernel per layer stack
    /// (its sums over examples as contractions), and the products of
    /// several parameter sets with one set share their right operand `x^T`
    /// (merged into one product, whose per-set blocks are contiguous rows).
    pub fn loss_by_columns(
        &self,
        g: &mut Graph,
        params: &[NodeId],
        x: NodeId,
        labels: NodeId,
    ) -> NodeId {
        let n = g.shape(x)[0];
        let layers = self.sizes.len() - 1;
        let mut h = g.transpose(x, &[1, 0]);
        for i in 0..layers {
            let wt = g.transpose(params[2 * i], &[1, 0]);
            let z = g.matmul(wt, h);
            let b = g.reshape(params[2 * i + 1], &[self.sizes[i + 1], 1]);
            h = g.add(z, b);
            if i + 1 < layers {
                h = match self.activation {
                    Activation::Sigmoid => g.sigmoid(h),
                    Activation::Relu => g.relu(h),
                };
            }
        }
        // Log-softmax over the classes (rows), shifted by the column maximum
        // (a constant for the gradient, which it does not change).
        let classes = self.sizes[layers];
        let top = g.reduce_max(h, &[0], true);
        let top = g.stop_gradient(top);
        let shifted = g.sub(h, top);
        let e = g.exp(shifted);
        let total = g.sum(e, &[0], true);
        let log_total = g.log(total);
        let log_p = g.sub(shifted, log_total);
        let row = g.reshape(labels, &[1, n]);
        let class = g.const_i64(&[classes, 1], (0..classes as i64).collect());
        let onehot = g.equal(row, class);
        let onehot = g.cast(onehot, DType::F32);
        let picked = g.mul(log_p, onehot);
        let per_example = g.sum(picked, &[0], true);
        let sum = g.sum_all(per_example);
        g.mul_scalar(sum, -1.0 / n as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metac_graphs::autodiff::grad;
    use metac_graphs::eval::{eval_graph, Value};
    use ndarray::{ArrayD, IxDyn};
    use std::collections::HashMap;

    /// The loss with examples as columns has the value and the gradient of
    /// the loss with examples as rows.
    #[test]
    fn loss_by_columns_matches_the_row_major_loss() {
        for activation in [Activation::Sigmoid, Activation::Relu] {
            let mlp = Mlp::new(&[7, 5, 4, 3], activation);
            let n = 9;
            let graph = |by_columns: bool| {
                let mut g = Graph::new();
                let params = mlp.params(&mut g);
                let x = g.input("x", DType::F32, &[n, 7]);
                let y = g.input("y", DType::I64, &[n]);
                let loss = if by_columns {
                    mlp.loss_by_columns(&mut g, &params, x, y)
                } else {
                    mlp.loss(&mut g, &params, x, y)
                };
                let grads = grad(&mut g, loss, &params);
                g.output("loss", loss);
                for (k, d) in grads.into_iter().enumerate() {
                    g.output(&format!("d{k}"), d);
                }
                g
            };
            let f = |shape: &[usize], k: f64| {
                let len: usize = shape.iter().product();
                let v = (0..len).map(|i| (i as f64 * k).sin()).collect();
                Value::F(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
            };
            let mut ins: HashMap<String, Value> = mlp
                .param_shapes()
                .iter()
                .enumerate()
                .map(|(k, (name, s))| (name.clone(), f(s, 0.3 + k as f64 * 0.17)))
                .collect();
            ins.insert("x".into(), f(&[n, 7], 0.9));
            let labels = (0..n as i64).map(|i| (i * 2) % 3).collect();
            ins.insert(
                "y".into(),
                Value::I(ArrayD::from_shape_vec(IxDyn(&[n]), labels).unwrap()),
            );
            let rows = eval_graph(&graph(false), &ins).unwrap();
            let cols = eval_graph(&graph(true), &ins).unwrap();
            for ((name, a), (_, b)) in rows.iter().zip(&cols) {
                let (Value::F(a), Value::F(b)) = (a, b) else {
                    panic!("f32 outputs")
                };
                assert_eq!(a.shape(), b.shape(), "{name}");
                for (p, q) in a.iter().zip(b) {
                    assert!((p - q).abs() < 1e-12, "{activation:?} {name}: {p} vs {q}");
                }
            }
        }
    }
}
