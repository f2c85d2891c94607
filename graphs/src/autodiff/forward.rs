//! Forward mode: walk the nodes forwards from the inputs with tangents,
//! applying each op's JVP rule.

use crate::graph::{Graph, NodeId};
use crate::ops;
use crate::passes::dce::live_nodes;

/// Tangents of `outputs` given `(input, tangent)` pairs; `None` where the
/// tangent is zero.
pub fn jvp(
    g: &mut Graph,
    tangents: &[(NodeId, NodeId)],
    outputs: &[NodeId],
) -> Vec<Option<NodeId>> {
    let n0 = g.len();
    let wrt: Vec<NodeId> = tangents.iter().map(|(x, _)| *x).collect();
    let dep = super::reverse::depends_on(g, &wrt, n0);
    let live = live_nodes(g, outputs);
    let mut tan: Vec<Option<NodeId>> = vec![None; n0];
    for &(x, dx) in tangents {
        tan[x.index()] = Some(dx);
    }
    let first = wrt.iter().map(|w| w.index()).min().unwrap_or(n0);
    for i in first..n0 {
        if !dep[i] || !live[i] || tan[i].is_some() {
            continue;
        }
        let node = g.node(NodeId(i as u32));
        let dxs: Vec<Option<NodeId>> = node.inputs.iter().map(|x| tan[x.index()]).collect();
        tan[i] = ops::jvp(g, NodeId(i as u32), &dxs);
    }
    outputs.iter().map(|o| tan[o.index()]).collect()
}
