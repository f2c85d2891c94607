//! Finding fusable clusters and compiling them to [`FusedProgram`]s.
//!
//! A cluster is a set of nodes that is convex (no path leaves it and comes
//! back), so it can run as one node: either elementwise f32 nodes of one
//! output shape, or *column-local* nodes over `[k, n]` tensors with one
//! (large) `n` and any row count `k`: elementwise ops, `Concat`, `Slice` and
//! `Expand` along rows, sums, means and maxima over rows, and products
//! `W[a, b] @ X[b, n]` with a small `W` from outside the cluster. Column `j`
//! of such a cluster's outputs depends only on column `j` of its `[k, n]`
//! inputs, which is what the feature-major HierarchicalRNN state is made
//! of; the cluster compiles to a column-stacked program (see
//! [`super::program`]).
//! Nodes join greedily in topological order: a node joins the cluster of one
//! of its producers when its other inputs do not depend on that cluster.
//! Then *contractions* `A[p, n] @ Y[q, n]^T` over a column-local `n` (weight
//! gradients, per-tensor sums against one-hot rows) join the cluster of an
//! operand as sinks: the program sums them chunk by chunk, and `A` and `Y`
//! need not be written out for them.
//! Comparisons (bool results) may only feed `Where` nodes of their own
//! cluster, since the kernel's registers are f32.

use std::collections::HashMap;

use super::program::{destination, sum_shapes, Fn1, Fn2, FusedProgram, Instr, View};
use crate::graph::{Graph, NodeId};
use crate::ops::{BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};
use crate::types::{DType, TensorData};

/// Nodes that run as one fused kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// In topological order.
    pub members: Vec<NodeId>,
    /// The tensors the fused node receives: values from outside the cluster
    /// (scalar constants are folded into the program instead; for a slice,
    /// the tensor it slices, read in place through the program's view).
    pub inputs: Vec<NodeId>,
    /// Members read outside the cluster or by the graph's outputs.
    pub outputs: Vec<NodeId>,
    pub program: FusedProgram,
}

/// Column-local clusters need at least this many columns (so that a chunk
/// of a row is a long vector run) and at most this many rows per value
/// (the rows of a product's `W` too, whose columns are bounded by
/// [`super::program::MAX_INNER`]).
const MIN_COLUMNS: usize = 1024;
const MAX_ROWS: usize = 64;

/// A row-stacked `Concat` may be taller: its rows cost no instruction, and
/// a value of more than [`MAX_ROWS`] rows is read by nothing in the
/// cluster, only written out (the stacked gradients of several parameter
/// sets, for one product with the objective set).
const MAX_CONCAT_ROWS: usize = 256;

/// Which nodes may share a cluster: elementwise nodes of one shape, or
/// column-local nodes over one number of columns.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Class {
    Shape(Vec<usize>),
    Columns(usize),
}

/// How a column-local node computes, beyond [`Kind`].
enum Layout {
    Elementwise(Kind),
    /// Rows of its inputs, one after the other.
    Concat,
    /// Rows `start..end` of its input.
    Rows(usize, usize),
    /// Its input's rows, repeated where it has one.
    Broadcast,
    /// `W @ X`, `W` read from outside.
    Product,
    /// A sum, mean or maximum over its input's rows (`[k, n] -> [1, n]`).
    RowReduce(ReduceOp),
}

/// Is `s` the shape of a value a column-local cluster can hold?
pub fn column_local_shape(s: &[usize]) -> bool {
    columns(s).is_some()
}

/// Can node `id` be computed in a column-local cluster?
pub fn column_local_node(g: &Graph, id: NodeId) -> bool {
    layout(g, id).is_some()
}

/// `[k, n]` with `n` columns enough for a column-local cluster.
fn columns(s: &[usize]) -> Option<(usize, usize)> {
    match *s {
        [k, n] if n >= MIN_COLUMNS && k <= MAX_ROWS => Some((k, n)),
        _ => None,
    }
}

/// A contraction `A[p, n] @ Transpose(Y[q, n])` over `n` columns enough
/// for a column-local cluster: `(A, Y, n)`.
fn contraction(g: &Graph, id: NodeId) -> Option<(NodeId, NodeId, usize)> {
    let node = g.node(id);
    if !matches!(node.op, Op::MatMul) || node.inputs.len() != 2 {
        return None;
    }
    let (a, t) = (node.inputs[0], node.inputs[1]);
    let y = match &g.node(t).op {
        Op::Transpose(perm) if perm.as_slice() == [1, 0] => g.node(t).inputs[0],
        _ => return None,
    };
    let (_, n) = columns(g.shape(a))?;
    let (_, m) = columns(g.shape(y))?;
    let f32s = [id, a, y].iter().all(|&x| g.dtype(x) == DType::F32);
    (n == m && f32s).then_some((a, y, n))
}

/// What member `m` reads: its inputs, but a contraction reads the rows `Y`
/// of its transposed operand.
fn member_reads(g: &Graph, m: NodeId, is_sum: bool) -> Vec<NodeId> {
    if !is_sum {
        return g.node(m).inputs.clone();
    }
    let (a, y, _) = contraction(g, m).expect("a contraction member");
    vec![a, y]
}

/// Can a `[k, n]` column-local value read an operand of shape `s` row by
/// row (numpy broadcasting)?
fn row_readable(s: &[usize], k: usize, n: usize) -> bool {
    match *s {
        [] => true,
        [m] => m == 1 || m == n,
        [r, m] => (r == 1 || r == k) && (m == 1 || m == n),
        _ => false,
    }
}

/// How a node computes in a column-local cluster, if it can be in one.
fn layout(g: &Graph, id: NodeId) -> Option<Layout> {
    let node = g.node(id);
    let (k, n) = match (&node.op, g.shape(id)) {
        (Op::Concat { axis: 0 }, &[k, n]) if n >= MIN_COLUMNS && k <= MAX_CONCAT_ROWS => (k, n),
        (_, s) => columns(s)?,
    };
    let f32s = node.ty.dtype == DType::F32 && node.inputs.iter().all(|&i| g.dtype(i) == DType::F32);
    let shape = |i: usize| g.shape(node.inputs[i]);
    let l = match &node.op {
        Op::Concat { axis: 0 } if f32s => {
            if !node
                .inputs
                .iter()
                .all(|&i| matches!(*g.shape(i), [_, m] if m == n))
            {
                return None;
            }
            Layout::Concat
        }
        Op::Slice {
            axis: 0,
            start,
            end,
        } if f32s && shape(0).len() == 2 => Layout::Rows(*start, *end),
        Op::Expand(_) | Op::Reshape(_) if f32s && row_readable(shape(0), k, n) => {
            // A reshape keeps the rows only from `[n]` or `[1, n]` to `[1, n]`.
            if matches!(node.op, Op::Reshape(_))
                && (k != 1 || !matches!(*shape(0), [m] | [1, m] if m == n))
            {
                return None;
            }
            Layout::Broadcast
        }
        Op::Reduce {
            op,
            axes,
            keepdims: true,
        } if f32s && axes.as_slice() == [0] && k == 1 && matches!(*shape(0), [_, m] if m == n) => {
            Layout::RowReduce(*op)
        }
        Op::MatMul if f32s => match (shape(0), shape(1)) {
            ([a, b], [b2, m])
                if *a == k && b == b2 && *m == n && *b <= super::program::MAX_INNER =>
            {
                Layout::Product
            }
            _ => return None,
        },
        _ => {
            let kd = kind(g, id)?;
            if !node.inputs.iter().all(|&i| row_readable(g.shape(i), k, n)) {
                return None;
            }
            Layout::Elementwise(kd)
        }
    };
    Some(l)
}

/// The cluster class of a node, if it can be fused at all.
fn class(g: &Graph, id: NodeId) -> Option<Class> {
    if layout(g, id).is_some() {
        return Some(Class::Columns(g.shape(id)[1]));
    }
    kind(g, id).map(|_| Class::Shape(g.shape(id).to_vec()))
}

/// How a fusable node computes.
enum Kind {
    Unary(Fn1),
    Binary(Fn2),
    Where,
    /// StopGradient and f32 -> f32 casts: the value itself.
    Alias,
}

fn kind(g: &Graph, id: NodeId) -> Option<Kind> {
    let n = g.node(id);
    let f32_in = n.inputs.iter().all(|&i| g.dtype(i) == DType::F32);
    let k = match &n.op {
        Op::Unary(u) if f32_in => Kind::Unary(match u {
            UnaryOp::Neg => Fn1::Neg,
            UnaryOp::Exp => Fn1::Exp,
            UnaryOp::Log => Fn1::Log,
            UnaryOp::Sqrt => Fn1::Sqrt,
            UnaryOp::Sigmoid => Fn1::Sigmoid,
            UnaryOp::Tanh => Fn1::Tanh,
            UnaryOp::Relu => Fn1::Relu,
            UnaryOp::Abs => Fn1::Abs,
            UnaryOp::Sign => Fn1::Sign,
            UnaryOp::Asinh => Fn1::Asinh,
            UnaryOp::Erf | UnaryOp::Not => return None,
        }),
        Op::Binary(b) if f32_in => Kind::Binary(match b {
            BinaryOp::Add => Fn2::Add,
            BinaryOp::Sub => Fn2::Sub,
            BinaryOp::Mul => Fn2::Mul,
            BinaryOp::Div => Fn2::Div,
            BinaryOp::Min => Fn2::Min,
            BinaryOp::Max => Fn2::Max,
            BinaryOp::Pow => return None,
        }),
        Op::Compare(c) if f32_in => Kind::Binary(match c {
            CompareOp::Less => Fn2::Less,
            CompareOp::Greater => Fn2::Greater,
            CompareOp::Equal => Fn2::Equal,
        }),
        Op::Where
            if n.ty.dtype == DType::F32
                && g.dtype(n.inputs[0]) == DType::Bool
                && g.dtype(n.inputs[1]) == DType::F32
                && g.dtype(n.inputs[2]) == DType::F32 =>
        {
            Kind::Where
        }
        Op::StopGradient if f32_in && n.ty.dtype == DType::F32 => Kind::Alias,
        // Masks are 1.0/0.0 in registers already.
        Op::Cast(DType::F32) if matches!(g.dtype(n.inputs[0]), DType::F32 | DType::Bool) => {
            Kind::Alias
        }
        _ => return None,
    };
    Some(k)
}

/// A scalar f32 constant, folded into a program as an immediate.
fn immediate(g: &Graph, id: NodeId) -> Option<f32> {
    match &g.node(id).op {
        Op::Const(t) if t.shape.iter().product::<usize>() == 1 => match &t.data {
            TensorData::F32(v) => Some(v[0]),
            _ => None,
        },
        Op::Fill { value, ty } if ty.dtype == DType::F32 => Some(*value as f32),
        _ => None,
    }
}

/// Does `from` depend on cluster `c` once every cluster is one node? A
/// path may enter another cluster at one member and leave it at another, so
/// reaching any member of a cluster continues from the inputs of all of them
/// (otherwise two convex clusters could still depend on each other).
fn reaches(
    g: &Graph,
    from: NodeId,
    c: usize,
    cluster_of: &[Option<usize>],
    members: &[Vec<NodeId>],
) -> bool {
    let mut stack = vec![from];
    let mut seen = vec![false; g.len()];
    while let Some(n) = stack.pop() {
        if seen[n.index()] {
            continue;
        }
        match cluster_of[n.index()] {
            Some(k) if k == c => return true,
            Some(k) => {
                for &m in &members[k] {
                    seen[m.index()] = true;
                    stack.extend(&g.node(m).inputs);
                }
            }
            None => {
                seen[n.index()] = true;
                stack.extend(&g.node(n).inputs);
            }
        }
    }
    false
}

/// Can clusters `a` and `b` merge: does no input of one, from outside both,
/// depend on the other?
fn independent(
    g: &Graph,
    a: usize,
    b: usize,
    cluster_of: &[Option<usize>],
    members: &[Vec<NodeId>],
) -> bool {
    let outside = |x: NodeId| !matches!(cluster_of[x.index()], Some(k) if k == a || k == b);
    let feeds = |from: usize, to: usize| {
        members[from].iter().any(|&m| {
            g.node(m)
                .inputs
                .iter()
                .any(|&q| outside(q) && reaches(g, q, to, cluster_of, members))
        })
    };
    !feeds(a, b) && !feeds(b, a)
}

/// The clusters of two or more live nodes, each compiled to a program.
pub fn find_clusters(g: &Graph) -> Vec<Cluster> {
    let roots: Vec<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let live = crate::passes::dce::live_nodes(g, &roots);
    let mut consumers: Vec<Vec<NodeId>> = vec![vec![]; g.len()];
    for (i, n) in g.nodes().iter().enumerate() {
        if live[i] {
            for &x in &n.inputs {
                consumers[x.index()].push(NodeId(i as u32));
            }
        }
    }
    let mut is_output = vec![false; g.len()];
    for r in &roots {
        is_output[r.index()] = true;
    }
    // A comparison fuses only if every reader can take its mask in a
    // register: a fusable node of its shape, not a graph output.
    // `MatMul` + bias `Add` is left to ONNX Runtime, which runs the pair as
    // one GEMM with the bias folded in.
    let gemm_bias = |id: NodeId| {
        let n = g.node(id);
        matches!(n.op, Op::Binary(BinaryOp::Add))
            && n.ty.shape.len() == 2
            && n.inputs.iter().any(|&p| {
                matches!(g.node(p).op, Op::MatMul)
                    && g.shape(g.node(p).inputs[0]).len() == 2
                    && g.shape(g.node(p).inputs[1]).len() == 2
                    && consumers[p.index()].len() == 1
            })
            && n.inputs.iter().any(|&p| {
                let s = g.shape(p);
                s.len() == 1 || (s.len() == 2 && s[0] == 1)
            })
    };
    let fusable = |id: NodeId| {
        let Some(cl) = class(g, id) else {
            return false;
        };
        // A mask cast to f32 fuses only with the comparison that makes it:
        // a bool tensor from outside cannot be read into a register.
        let outside_mask = g.node(id).inputs.iter().any(|&x| {
            g.dtype(x) == DType::Bool
                && matches!(g.node(id).op, Op::Cast(_))
                && kind(g, x).is_none()
        });
        if outside_mask {
            return false;
        }
        !(matches!(cl, Class::Shape(_)) && gemm_bias(id))
            && (g.dtype(id) == DType::F32
                || (!is_output[id.index()]
                    && consumers[id.index()]
                        .iter()
                        .all(|&u| kind(g, u).is_some() && g.shape(u) == g.shape(id))))
    };
    let mut cluster_of: Vec<Option<usize>> = vec![None; g.len()];
    let mut members: Vec<Vec<NodeId>> = vec![];
    let mut classes: Vec<Class> = vec![];
    for i in 0..g.len() {
        let id = NodeId(i as u32);
        if !live[i] || !fusable(id) {
            continue;
        }
        let cl = class(g, id).expect("fusable nodes have a class");
        let ins = &g.node(id).inputs;
        // The clusters of its producers of its class.
        let mut cands: Vec<usize> = vec![];
        for &p in ins {
            if let Some(c) = cluster_of[p.index()] {
                if classes[c] == cl && !cands.contains(&c) {
                    cands.push(c);
                }
            }
        }
        let joinable = |c: usize, cluster_of: &[Option<usize>], members: &[Vec<NodeId>]| {
            !ins.iter()
                .filter(|&&q| cluster_of[q.index()] != Some(c))
                .any(|&q| reaches(g, q, c, cluster_of, members))
        };
        let Some(pos) = cands
            .iter()
            .position(|&c| joinable(c, &cluster_of, &members))
        else {
            cluster_of[i] = Some(members.len());
            members.push(vec![id]);
            classes.push(cl);
            continue;
        };
        let c = cands[pos];
        members[c].push(id);
        cluster_of[i] = Some(c);
        // Its other producer clusters merge in where no path leaves one and
        // enters the other.
        for &c2 in &cands[pos + 1..] {
            if independent(g, c, c2, &cluster_of, &members) {
                for m in std::mem::take(&mut members[c2]) {
                    cluster_of[m.index()] = Some(c);
                    members[c].push(m);
                }
                members[c].sort();
            }
        }
    }

    let is_sum = absorb_contractions(g, &live, &mut cluster_of, &mut members, &classes);
    let readers = readers(g, &live, &is_sum, &is_output);
    members
        .into_iter()
        .enumerate()
        .filter(|(_, m)| m.len() >= 2)
        .filter_map(|(c, m)| {
            let inside = |x: NodeId| cluster_of[x.index()] == Some(c);
            // Row outputs first, then contractions (the program's order).
            let (sums, rows): (Vec<NodeId>, Vec<NodeId>) = m
                .iter()
                .copied()
                .filter(|&x| is_output[x.index()] || readers[x.index()].iter().any(|&u| !inside(u)))
                .partition(|x| is_sum[x.index()]);
            let outputs: Vec<NodeId> = rows.iter().chain(&sums).copied().collect();
            // What the members read from outside, and what the node receives
            // for it: a slice is read in place from the tensor it slices.
            let mut reads: Vec<NodeId> = vec![];
            for &x in &m {
                for &p in &member_reads(g, x, is_sum[x.index()]) {
                    if !inside(p) && immediate(g, p).is_none() && !reads.contains(&p) {
                        reads.push(p);
                    }
                }
            }
            let stacked = match classes[c] {
                Class::Columns(n) => Some(n),
                Class::Shape(_) => None,
            };
            let (inputs, views): (Vec<NodeId>, Vec<Option<View>>) = reads
                .iter()
                .map(|&p| match slice_view(g, p) {
                    // Column-stacked programs address their inputs by row;
                    // a slice of the cluster's own value stays a slice node.
                    _ if stacked.is_some() => (p, None),
                    (src, _) if inside(src) => (p, None),
                    view => view,
                })
                .unzip();
            // Bool values never cross the boundary: registers are f32.
            let bool_edge = outputs
                .iter()
                .chain(&inputs)
                .any(|&x| g.dtype(x) != DType::F32);
            if bool_edge || outputs.is_empty() {
                return None;
            }
            let program = match stacked {
                Some(n) => compile_stacked(g, n, &m, &reads, &rows, &sums),
                None => compile(g, &m, &reads, &inputs, views, &outputs),
            };
            Some(Cluster {
                members: m,
                inputs,
                outputs,
                program,
            })
        })
        .collect()
}

/// Adds each live contraction (see [`contraction`]) to the column-local
/// cluster of one of its operands, where its other operand does not depend
/// on that cluster (so the cluster stays convex: nothing in it reads the
/// contraction). Returns which nodes are contraction members.
fn absorb_contractions(
    g: &Graph,
    live: &[bool],
    cluster_of: &mut [Option<usize>],
    members: &mut [Vec<NodeId>],
    classes: &[Class],
) -> Vec<bool> {
    let mut is_sum = vec![false; g.len()];
    for i in 0..g.len() {
        let id = NodeId(i as u32);
        if !live[i] || cluster_of[i].is_some() {
            continue;
        }
        let Some((a, y, n)) = contraction(g, id) else {
            continue;
        };
        // The operands' clusters, the left operand's first: a weight
        // gradient `dY @ X^T` belongs with the backward pass that computes
        // `dY` (the forward pass computing `X` comes before it).
        let mut cands: Vec<usize> = vec![];
        for x in [a, y] {
            if let Some(c) = cluster_of[x.index()] {
                if classes[c] == Class::Columns(n) && !cands.contains(&c) {
                    cands.push(c);
                }
            }
        }
        for c in cands {
            let convex = [a, y]
                .into_iter()
                .filter(|x| cluster_of[x.index()] != Some(c))
                .all(|x| !reaches(g, x, c, cluster_of, members));
            if convex {
                members[c].push(id);
                members[c].sort();
                cluster_of[i] = Some(c);
                is_sum[i] = true;
                break;
            }
        }
    }
    is_sum
}

/// Who reads each live value once contractions are cluster members: a
/// contraction reads the rows `Y` of its transposed operand, and a
/// transpose that only contractions read is no longer computed, so it
/// reads nothing.
fn readers(g: &Graph, live: &[bool], is_sum: &[bool], is_output: &[bool]) -> Vec<Vec<NodeId>> {
    let mut readers: Vec<Vec<NodeId>> = vec![vec![]; g.len()];
    for (i, &l) in live.iter().enumerate() {
        if l {
            let u = NodeId(i as u32);
            for x in member_reads(g, u, is_sum[i]) {
                readers[x.index()].push(u);
            }
        }
    }
    for i in 0..g.len() {
        let t = NodeId(i as u32);
        let unread = live[i] && readers[i].is_empty() && !is_output[i];
        if unread && matches!(g.node(t).op, Op::Transpose(_)) {
            let y = g.node(t).inputs[0];
            readers[y.index()].retain(|&u| u != t);
        }
    }
    readers
}

/// What a fused node receives for a value its members read: the value, or,
/// for a slice of an f32 tensor, the tensor it slices and the block.
fn slice_view(g: &Graph, p: NodeId) -> (NodeId, Option<View>) {
    let n = g.node(p);
    match n.op {
        Op::Slice { axis, start, .. } if n.ty.dtype == DType::F32 => {
            let src = n.inputs[0];
            let stride: usize = g.shape(src)[axis + 1..].iter().product();
            let view = View {
                shape: n.ty.shape.clone(),
                offset: start * stride,
            };
            (src, Some(view))
        }
        _ => (p, None),
    }
}

/// The register program of a cluster: SSA values first, then registers
/// reused once a value's last reader has run. `reads[k]` is what the members
/// read for input `k`, `inputs[k]` the tensor the node receives for it.
fn compile(
    g: &Graph,
    members: &[NodeId],
    reads: &[NodeId],
    inputs: &[NodeId],
    views: Vec<Option<View>>,
    outputs: &[NodeId],
) -> FusedProgram {
    // Values: node -> SSA index; instructions over SSA indices.
    let mut value: HashMap<NodeId, usize> = HashMap::new();
    let mut ssa: Vec<Instr> = vec![];
    let operand =
        |g: &Graph, x: NodeId, value: &mut HashMap<NodeId, usize>, ssa: &mut Vec<Instr>| {
            if let Some(&v) = value.get(&x) {
                return v as u16;
            }
            let instr = match immediate(g, x) {
                Some(c) => Instr::Const { dst: 0, value: c },
                None => Instr::Load {
                    dst: 0,
                    input: reads.iter().position(|&i| i == x).expect("cluster input") as u16,
                },
            };
            ssa.push(instr);
            value.insert(x, ssa.len() - 1);
            (ssa.len() - 1) as u16
        };
    for &m in members {
        let ins: Vec<u16> = g
            .node(m)
            .inputs
            .iter()
            .map(|&x| operand(g, x, &mut value, &mut ssa))
            .collect();
        let instr = match kind(g, m).expect("fusable member") {
            Kind::Alias => {
                value.insert(m, ins[0] as usize);
                continue;
            }
            kd => instruction(&kd, &ins),
        };
        ssa.push(instr);
        value.insert(m, ssa.len() - 1);
    }
    let out_values: Vec<usize> = outputs.iter().map(|o| value[o]).collect();
    let mut p = allocate(
        ssa,
        vec![],
        &out_values,
        g.shape(members[0]).to_vec(),
        inputs.iter().map(|&i| g.shape(i).to_vec()).collect(),
    );
    p.views = views;
    p
}

/// The column-stacked program of a column-local cluster over `n` columns:
/// every value is a list of SSA rows; stacking and slicing rows only
/// rearranges those lists, and inputs are loaded row by row where first
/// read. `reads[k]` is the cluster's input `k`.
fn compile_stacked(
    g: &Graph,
    n: usize,
    members: &[NodeId],
    reads: &[NodeId],
    outputs: &[NodeId],
    sums: &[NodeId],
) -> FusedProgram {
    struct Builder<'a> {
        g: &'a Graph,
        reads: &'a [NodeId],
        ssa: Vec<Instr>,
        lists: Vec<Vec<u16>>,
        rows: HashMap<NodeId, Vec<u16>>,
        loaded: HashMap<(NodeId, usize), u16>,
    }
    impl Builder<'_> {
        fn push(&mut self, i: Instr) -> u16 {
            self.ssa.push(i);
            (self.ssa.len() - 1) as u16
        }
        /// Rows a value offers: its own, or an input's (one for broadcast
        /// rows and scalars).
        fn source_rows(&self, x: NodeId) -> usize {
            match self.rows.get(&x) {
                Some(r) => r.len(),
                None => match *self.g.shape(x) {
                    [r, _] => r,
                    _ => 1,
                },
            }
        }
        /// Row `r` of value `x` (row 0 of a one-row value).
        fn row(&mut self, x: NodeId, r: usize) -> u16 {
            let r = if self.source_rows(x) == 1 { 0 } else { r };
            if let Some(rows) = self.rows.get(&x) {
                return rows[r];
            }
            if let Some(&v) = self.loaded.get(&(x, r)) {
                return v;
            }
            let instr = match immediate(self.g, x) {
                Some(c) => Instr::Const { dst: 0, value: c },
                None => Instr::LoadRow {
                    dst: 0,
                    input: self.input(x),
                    row: r as u32,
                },
            };
            let v = self.push(instr);
            self.loaded.insert((x, r), v);
            v
        }
        fn input(&self, x: NodeId) -> u16 {
            self.reads
                .iter()
                .position(|&i| i == x)
                .expect("cluster input") as u16
        }
        /// Value `x` as `k` rows (broadcast where it has one).
        fn rows_of(&mut self, x: NodeId, k: usize) -> Vec<u16> {
            (0..k).map(|r| self.row(x, r)).collect()
        }
    }
    let mut b = Builder {
        g,
        reads,
        ssa: vec![],
        lists: vec![],
        rows: HashMap::new(),
        loaded: HashMap::new(),
    };
    for &m in members {
        if let Some(out) = sums.iter().position(|&x| x == m) {
            let (a, y, _) = contraction(g, m).expect("contraction member");
            let (p, q) = (g.shape(a)[0], g.shape(y)[0]);
            for (x, k) in [(a, p), (y, q)] {
                let rows = b.rows_of(x, k);
                b.lists.push(rows);
            }
            let l = b.lists.len() as u16;
            b.push(Instr::Contract {
                out: out as u16,
                a: l - 2,
                b: l - 1,
            });
            continue;
        }
        let k = g.shape(m)[0];
        let ins = g.node(m).inputs.clone();
        let rows: Vec<u16> = match layout(g, m).expect("column-local member") {
            Layout::Elementwise(Kind::Alias) | Layout::Broadcast => b.rows_of(ins[0], k),
            Layout::Elementwise(kd) => (0..k)
                .map(|r| {
                    let a: Vec<u16> = ins.iter().map(|&x| b.row(x, r)).collect();
                    b.push(instruction(&kd, &a))
                })
                .collect(),
            Layout::Concat => ins
                .iter()
                .flat_map(|&x| {
                    let r = g.shape(x)[0];
                    b.rows_of(x, r)
                })
                .collect(),
            Layout::Rows(start, end) => (start..end).map(|r| b.row(ins[0], r)).collect(),
            Layout::RowReduce(op) => {
                let k_in = g.shape(ins[0])[0];
                let rows = b.rows_of(ins[0], k_in);
                let f = match op {
                    ReduceOp::Max => Fn2::Max,
                    ReduceOp::Sum | ReduceOp::Mean => Fn2::Add,
                };
                let mut acc = rows[0];
                for &r in &rows[1..] {
                    acc = b.push(instruction(&Kind::Binary(f), &[acc, r]));
                }
                if op == ReduceOp::Mean && k_in > 1 {
                    let scale = b.push(Instr::Const {
                        dst: 0,
                        value: 1.0 / k_in as f32,
                    });
                    acc = b.push(instruction(&Kind::Binary(Fn2::Mul), &[acc, scale]));
                }
                vec![acc]
            }
            Layout::Product => {
                let inner = g.shape(ins[0])[1];
                let src = b.rows_of(ins[1], inner);
                let w = b.input(ins[0]);
                (0..k)
                    .map(|r| {
                        b.lists.push(src.clone());
                        let list = (b.lists.len() - 1) as u16;
                        b.push(Instr::Dot {
                            dst: 0,
                            input: w,
                            row: r as u32,
                            list,
                        })
                    })
                    .collect()
            }
        };
        b.rows.insert(m, rows);
    }
    let out_values: Vec<usize> = outputs
        .iter()
        .flat_map(|o| b.rows[o].iter().map(|&v| v as usize))
        .collect();
    let mut p = allocate(
        b.ssa,
        b.lists,
        &out_values,
        vec![n],
        reads.iter().map(|&i| g.shape(i).to_vec()).collect(),
    );
    p.columns = Some(n);
    p.out_rows = outputs.iter().map(|o| b.rows[o].len()).collect();
    p.sums = sum_shapes(&p.instrs, &p.lists).expect("contractions numbered in order");
    p
}

/// The instruction of an arithmetic node with operand registers `a`
/// (destination 0 until allocation).
fn instruction(kd: &Kind, a: &[u16]) -> Instr {
    match *kd {
        Kind::Unary(f) => Instr::Unary { f, dst: 0, a: a[0] },
        Kind::Binary(f) => Instr::Binary {
            f,
            dst: 0,
            a: a[0],
            b: a[1],
        },
        Kind::Where => Instr::Where {
            dst: 0,
            c: a[0],
            a: a[1],
            b: a[2],
        },
        Kind::Alias => unreachable!("an alias is its operand, not an instruction"),
    }
}

/// Linear-scan register allocation of SSA instructions (operands, and the
/// entries of `lists`, are SSA indices). A destination is taken before the
/// operands are freed, so it never aliases them; outputs stay live to the
/// end.
fn allocate(
    ssa: Vec<Instr>,
    lists: Vec<Vec<u16>>,
    outputs: &[usize],
    shape: Vec<usize>,
    input_shapes: Vec<Vec<usize>>,
) -> FusedProgram {
    let mut p = FusedProgram {
        shape,
        views: vec![None; input_shapes.len()],
        inputs: input_shapes,
        instrs: vec![],
        outputs: vec![],
        registers: 0,
        columns: None,
        out_rows: vec![],
        lists,
        sums: vec![],
    };
    let mut last_use = vec![0usize; ssa.len()];
    for (k, i) in ssa.iter().enumerate() {
        for a in p.operands(i) {
            last_use[a as usize] = k;
        }
    }
    for &o in outputs {
        last_use[o] = usize::MAX;
    }
    let mut reg_of = vec![0u16; ssa.len()];
    let mut free: Vec<u16> = vec![];
    let mut registers = 0u16;
    let mut instrs = Vec::with_capacity(ssa.len());
    for (k, i) in ssa.iter().enumerate() {
        // A contraction writes no register.
        let writes = destination(i).is_some();
        let dst = if writes {
            free.pop().unwrap_or_else(|| {
                registers += 1;
                registers - 1
            })
        } else {
            0
        };
        reg_of[k] = dst;
        let mut ops = p.operands(i);
        let lists: &[u16] = match i {
            Instr::Dot { list, .. } => &[*list],
            Instr::Contract { a, b, .. } => &[*a, *b],
            _ => &[],
        };
        for &list in lists {
            for r in p.lists[list as usize].iter_mut() {
                *r = reg_of[*r as usize];
            }
        }
        instrs.push(with_registers(i, dst, &|a| reg_of[a as usize]));
        ops.sort();
        ops.dedup();
        for a in ops {
            if last_use[a as usize] == k && !free.contains(&reg_of[a as usize]) {
                free.push(reg_of[a as usize]);
            }
        }
        // A value nobody reads (cannot happen for members, which are live)
        // frees its register at once.
        if writes && last_use[k] == 0 && !outputs.contains(&k) {
            free.push(dst);
        }
    }
    p.instrs = instrs;
    p.outputs = outputs.iter().map(|&o| reg_of[o]).collect();
    p.registers = registers as usize;
    p
}

/// An instruction with its destination and operand registers assigned
/// (a `Dot`'s list is remapped separately).
fn with_registers(i: &Instr, dst: u16, map: &dyn Fn(u16) -> u16) -> Instr {
    match *i {
        Instr::Load { input, .. } => Instr::Load { dst, input },
        Instr::LoadRow { input, row, .. } => Instr::LoadRow { dst, input, row },
        Instr::Dot {
            input, row, list, ..
        } => Instr::Dot {
            dst,
            input,
            row,
            list,
        },
        Instr::Const { value, .. } => Instr::Const { dst, value },
        Instr::Contract { .. } => *i,
        Instr::Unary { f, a, .. } => Instr::Unary { f, dst, a: map(a) },
        Instr::Binary { f, a, b, .. } => Instr::Binary {
            f,
            dst,
            a: map(a),
            b: map(b),
        },
        Instr::Where { c, a, b, .. } => Instr::Where {
            dst,
            c: map(c),
            a: map(a),
            b: map(b),
        },
    }
}
