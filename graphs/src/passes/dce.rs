//! Dead-code elimination.

use crate::graph::{Graph, Node, NodeId};
use crate::ops::Op;

/// Which nodes the `roots` depend on.
pub fn live_nodes(g: &Graph, roots: &[NodeId]) -> Vec<bool> {
    let mut live = vec![false; g.len()];
    for r in roots {
        live[r.index()] = true;
    }
    for i in (0..g.len()).rev() {
        if live[i] {
            for x in &g.nodes()[i].inputs {
                live[x.index()] = true;
            }
        }
    }
    live
}

/// Remove nodes no output depends on. Graph inputs are kept even when
/// unused: they are the graph's interface.
pub fn dce(g: &Graph) -> Graph {
    let roots: Vec<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let mut live = live_nodes(g, &roots);
    for (i, n) in g.nodes().iter().enumerate() {
        if matches!(n.op, Op::Input { .. }) {
            live[i] = true;
        }
    }
    let mut map = vec![NodeId(u32::MAX); g.len()];
    let mut nodes: Vec<Node> = Vec::new();
    for (i, n) in g.nodes().iter().enumerate() {
        if !live[i] {
            continue;
        }
        let mut n = n.clone();
        n.inputs = n.inputs.iter().map(|x| map[x.index()]).collect();
        map[i] = NodeId(nodes.len() as u32);
        nodes.push(n);
    }
    let outputs = g
        .outputs()
        .iter()
        .map(|(name, id)| (name.clone(), map[id.index()]))
        .collect();
    Graph::from_parts(nodes, outputs)
}
