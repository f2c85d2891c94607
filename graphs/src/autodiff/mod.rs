//! Automatic differentiation as graph-to-graph transforms.
//!
//! Both modes append their derivative nodes to the graph they differentiate,
//! built from the ordinary op set; a derivative is therefore an ordinary
//! subgraph that can be differentiated again (HVPs, meta-gradients through
//! gradients, third-order terms).

mod forward;
mod reverse;

pub use forward::jvp;
pub use reverse::{vjp, vjp_with_hook, VjpHook};

use crate::graph::{Graph, NodeId};
use crate::types::DType;

/// Gradient of the scalar `loss` with respect to each of `wrt` (zeros where
/// the loss does not depend on it).
pub fn grad(g: &mut Graph, loss: NodeId, wrt: &[NodeId]) -> Vec<NodeId> {
    assert!(
        g.shape(loss).is_empty(),
        "grad: the loss must be a scalar, got shape {:?}",
        g.shape(loss)
    );
    let seed = g.fill(1.0, DType::F32, &[]);
    let cots = vjp(g, &[(loss, seed)], wrt);
    materialize(g, cots, wrt)
}

/// Hessian-vector product by forward-over-reverse: the JVP of the gradient
/// in the direction `v` (one tangent per `wrt`).
pub fn hvp_forward_over_reverse(
    g: &mut Graph,
    loss: NodeId,
    wrt: &[NodeId],
    v: &[NodeId],
) -> Vec<NodeId> {
    let grads = grad(g, loss, wrt);
    let pairs: Vec<(NodeId, NodeId)> = wrt.iter().copied().zip(v.iter().copied()).collect();
    let t = jvp(g, &pairs, &grads);
    materialize(g, t, wrt)
}

/// Hessian-vector product by reverse-over-reverse: the gradient of
/// `<grad loss, v>`.
pub fn hvp_reverse_over_reverse(
    g: &mut Graph,
    loss: NodeId,
    wrt: &[NodeId],
    v: &[NodeId],
) -> Vec<NodeId> {
    let grads = grad(g, loss, wrt);
    let dot = inner_product(g, &grads, v);
    grad(g, dot, wrt)
}

/// `sum_i <a_i, b_i>` as a scalar node.
pub fn inner_product(g: &mut Graph, a: &[NodeId], b: &[NodeId]) -> NodeId {
    let mut acc: Option<NodeId> = None;
    for (&x, &y) in a.iter().zip(b) {
        let p = g.mul(x, y);
        let s = g.sum_all(p);
        acc = g.add_opt(acc, Some(s));
    }
    acc.unwrap_or_else(|| g.fill(0.0, DType::F32, &[]))
}

/// Replace symbolic zeros (`None`) by zero tensors shaped like `like`.
fn materialize(g: &mut Graph, xs: Vec<Option<NodeId>>, like: &[NodeId]) -> Vec<NodeId> {
    xs.into_iter()
        .zip(like)
        .map(|(x, &l)| x.unwrap_or_else(|| g.zeros_like(l)))
        .collect()
}
