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
    vjp_with_hook(g, seeds, wrt, &[], &mut |_, _, _| vec![])
}

/// A custom derivative inside a reverse pass: called with a node of
/// `hooked` and its complete cotangent when the pass reaches it, returns
/// extra `(node, cotangent)` pairs to add to nodes the pass has not reached
/// yet (earlier nodes).
pub type VjpHook<'a> = dyn FnMut(&mut Graph, NodeId, NodeId) -> Vec<(NodeId, NodeId)> + 'a;

/// [`vjp`] with a hook on the nodes `hooked`: the way to give a subgraph a
/// derivative of one's own (as JAX's `custom_vjp`). Cut the subgraph's
/// inputs with `StopGradient` in the forward, and let the hook on its output
/// add the cotangents of those inputs; the hook sees the output's cotangent
/// once every use of the output has contributed to it.
///
/// # Panics
/// If the hook returns a cotangent for a node at or after the hooked one.
pub fn vjp_with_hook(
    g: &mut Graph,
    seeds: &[(NodeId, NodeId)],
    wrt: &[NodeId],
    hooked: &[NodeId],
    hook: &mut VjpHook<'_>,
) -> Vec<Option<NodeId>> {
    let n0 = g.len();
    // A hooked node carries a derivative (its hook's) even where its inputs
    // are cut by StopGradient.
    let carriers: Vec<NodeId> = wrt.iter().chain(hooked).copied().collect();
    let dep = depends_on(g, &carriers, n0);
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
        if hooked.iter().any(|h| h.index() == i) {
            for (x, dx) in hook(g, NodeId(i as u32), dy) {
                assert!(
                    x.index() < i,
                    "vjp hook: a cotangent for node {} at or after the hooked node {i}",
                    x.index()
                );
                if dep[x.index()] {
                    cot[x.index()] = g.add_opt(cot[x.index()], Some(dx));
                }
            }
        }
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
