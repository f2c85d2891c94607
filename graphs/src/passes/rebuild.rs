//! One forward rebuild of the graph that applies, node by node: algebraic
//! simplification, constant folding and common-subexpression elimination.
//! Nodes are visited in topological order, so each sees already-simplified
//! inputs and cascades resolve in a single pass.

use std::collections::HashMap;

use super::simplify::{simplify, Simplified};
use crate::eval::Value;
use crate::graph::{Graph, NodeId};
use crate::ops::{self, Op};
use crate::types::DType;

pub struct RebuildOptions {
    /// Fold constant subgraphs whose result has at most this many elements
    /// (larger results stay as computations so bundles stay small).
    pub fold_limit: usize,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        RebuildOptions {
            fold_limit: 1 << 12,
        }
    }
}

/// A hashable identity of a node for CSE.
#[derive(PartialEq, Eq, Hash)]
enum Key {
    Const(Vec<usize>, u8, Vec<u64>),
    Other(String, Vec<NodeId>),
}

fn key(op: &Op, inputs: &[NodeId]) -> Key {
    match op {
        Op::Const(t) => {
            let (s, tag, bits) = t.bits_key();
            Key::Const(s, tag, bits)
        }
        // Debug of f64 round-trips, so distinct attributes give distinct keys.
        other => Key::Other(format!("{other:?}"), inputs.to_vec()),
    }
}

pub fn cse_fold_simplify(g: &Graph, opts: &RebuildOptions) -> Graph {
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(g.len());
    let mut seen: HashMap<Key, NodeId> = HashMap::new();
    for node in g.nodes() {
        let inputs: Vec<NodeId> = node.inputs.iter().map(|x| map[x.index()]).collect();
        let mut op = node.op.clone();
        let mut ins = inputs;
        if let Op::Input { name } = &op {
            let id = out
                .try_input(name, node.ty.dtype, &node.ty.shape)
                .expect("inputs are unique");
            map.push(id);
            continue;
        }
        // Simplify until stable (a rewrite may expose another).
        loop {
            match simplify(&mut out, &op, &ins, &node.ty) {
                Simplified::Alias(id) => {
                    map.push(id);
                    break;
                }
                Simplified::Replace(o, i) => {
                    op = o;
                    ins = i;
                    continue;
                }
                Simplified::Keep => {}
            }
            if let Some(folded) = fold(&out, &op, &ins, &node.ty, opts) {
                op = folded;
                ins = vec![];
            }
            let k = key(&op, &ins);
            let id = match seen.get(&k) {
                Some(&id) => id,
                None => {
                    let id = out
                        .try_node(op.clone(), &ins)
                        .unwrap_or_else(|e| panic!("rebuild: {e}"));
                    seen.insert(k, id);
                    id
                }
            };
            map.push(id);
            break;
        }
    }
    let outputs = g
        .outputs()
        .iter()
        .map(|(n, id)| (n.clone(), map[id.index()]))
        .collect();
    out.set_outputs(outputs);
    out
}

/// Evaluate an op whose inputs are all constants, if the result is small.
fn fold(
    g: &Graph,
    op: &Op,
    ins: &[NodeId],
    ty: &crate::types::TensorType,
    opts: &RebuildOptions,
) -> Option<Op> {
    if ins.is_empty() || matches!(op, Op::Input { .. }) {
        return None;
    }
    let small = ty.numel() <= opts.fold_limit || ty.dtype != DType::F32 && ty.numel() <= 1 << 16;
    if !small {
        return None;
    }
    let mut vals = Vec::with_capacity(ins.len());
    for &i in ins {
        let v = match &g.node(i).op {
            Op::Const(t) => Value::from_tensor(t),
            Op::Fill { value, ty } if ty.numel() <= 1 << 16 => Value::fill(*value, ty),
            _ => return None,
        };
        vals.push(v);
    }
    let refs: Vec<&Value> = vals.iter().collect();
    Some(Op::Const(ops::eval(op, &refs, ty).to_tensor()))
}
