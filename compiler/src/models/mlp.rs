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
}
