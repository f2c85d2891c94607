//! Reverse mode: walk the nodes backwards from the outputs, applying each
//! op's VJP rule and summing cotangents.

use crate::graph::{Graph, NodeId};
use crate::ops::{self, Op};

/// Which nodes carry a derivative from `wrt`: float nodes downstream of a
/// `wrt` node, not cut by `StopGradient`.
pub(crate) fn depends_on(g: &Graph, wrt: &[NodeId], upto: usize) -> Vec<bool> {
    let mut dep = vec![false; upto];
    for &w in wrt {
        dep[w.index()] = true;
    }
    let first = wrt.iter().map(|w| w.index()).min().unwrap_or(upto);
    for i in first..upto {
        let n = &g.nodes()[i];
        if dep[i] || matches!(n.op, Op::StopGradient) || !n.ty.dtype.is_float() {
            continue;
        }
        dep[i] = n.inputs.iter().any(|x| dep[x.index()]);
    }
    dep
}

/// Cotangents of `wrt` given `(output, cotangent)` seeds; `None` where no
/// path leads from a `wrt` node to an output.
pub fn vjp(g: &mut Graph, seeds: &[(NodeId, NodeId)], wrt: &[NodeId]) -> Vec<Option<NodeId>> {
    let n0 = g.len();
    let dep = depends_on(g, wrt, n0);
    let mut cot: Vec<Option<NodeId>> = vec![None; n0];
    for &(y, dy) in seeds {
        if dep[y.index()] {
            cot[y.index()] = g.add_opt(cot[y.index()], Some(dy));
        }
    }
    let last = seeds
        .iter()
        .map(|(y, _)| y.index())
        .max()
        .map_or(0, |m| m + 1);
    for i in (0..last).rev() {
        let Some(dy) = cot[i] else { continue };
        let node = g.node(NodeId(i as u32));
        if node.inputs.is_empty() || !node.inputs.iter().any(|x| dep[x.index()]) {
            continue;
        }
        let inputs = node.inputs.clone();
        let dxs = ops::vjp(g, NodeId(i as u32), dy);
        for (x, dx) in inputs.into_iter().zip(dxs) {
            if let (true, Some(dx)) = (dep[x.index()], dx) {
                cot[x.index()] = g.add_opt(cot[x.index()], Some(dx));
            }
        }
    }
    wrt.iter().map(|w| cot[w.index()]).collect()
}
