//! Fused clusters compute what the ops they replace compute: each cluster's
//! program (found and written by `metac_graphs::fusion`), run by the
//! runtime's interpreter on the reference values of its inputs, matches the
//! reference values of its outputs.

use std::collections::HashMap;

use metac_graphs::eval::{eval_nodes, Value};
use metac_graphs::fusion::{find_clusters, Cluster};
use metac_graphs::{DType, Graph, NodeId};
use metac_runtime::backend::fused::Execute;
use ndarray::{ArrayD, IxDyn};

fn values(shape: &[usize], seed: usize) -> Value {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f64 / 1000.0 - 1.0) * 2.5)
        .collect();
    Value::F(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
}

/// Elementwise chains with every broadcast pattern, comparisons feeding
/// `Where` and a mask cast, split by a MatMul and a reduction.
fn graph() -> Graph {
    let mut g = Graph::new();
    let a = g.input("a", DType::F32, &[4, 300]);
    let b = g.input("b", DType::F32, &[1, 300]);
    let c = g.input("c", DType::F32, &[4, 1]);
    let s = g.input("s", DType::F32, &[]);
    let w = g.input("w", DType::F32, &[300, 4]);
    let ab = g.mul(a, b);
    let x = g.add(ab, c);
    let y = g.tanh(x);
    let z0 = g.sigmoid(y);
    let na = g.abs(a);
    let na = g.neg(na);
    let ea = g.exp(na);
    let z = g.mul(z0, ea);
    let cut = g.scalar(0.1);
    let near = g.less(x, cut);
    let ay = g.abs(y);
    let ay1 = g.add_scalar(ay, 1.0);
    let ly = g.log(ay1);
    let wv = g.node_with(metac_graphs::Op::Where, &[near, z, ly]);
    let m = g.max(wv, a);
    let bb = g.abs(b);
    let bb = g.add(bb, s);
    let rb = g.sqrt(bb);
    let out1 = g.div(m, rb);
    let mask = g.greater(a, cut);
    let maskf = g.node_with(metac_graphs::Op::Cast(DType::F32), &[mask]);
    let masked = g.mul(maskf, out1);
    let mm = g.matmul(masked, w);
    let q0 = g.asinh(mm);
    let q1 = g.relu(mm);
    let q = g.sub(q0, q1);
    let sq = g.sign(q);
    let q = g.min(q, sq);
    let r = g.sum(x, &[1], false);
    g.output("out1", out1);
    g.output("x", x);
    g.output("q", q);
    g.output("r", r);
    g
}

/// Runs every cluster's program on the reference values of its inputs and
/// compares its outputs with the reference values (f32 tolerance).
fn assert_clusters_match_reference(
    g: &Graph,
    clusters: &[Cluster],
    inputs: &HashMap<String, Value>,
) {
    let roots: Vec<NodeId> = (0..g.len() as u32).map(NodeId).collect();
    let all = eval_nodes(g, inputs, &roots).unwrap();
    let f32s = |id: NodeId| -> Vec<f32> {
        all[id.index()]
            .as_ref()
            .unwrap()
            .f()
            .iter()
            .map(|&x| x as f32)
            .collect()
    };
    for c in clusters {
        let ins: Vec<Vec<f32>> = c.inputs.iter().map(|&i| f32s(i)).collect();
        let in_refs: Vec<&[f32]> = ins.iter().map(|v| v.as_slice()).collect();
        let mut outs: Vec<Vec<f32>> = (0..c.outputs.len())
            .map(|k| vec![0.0; c.program.output_shape(k).iter().product()])
            .collect();
        let mut out_refs: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        c.program.run(&in_refs, &mut out_refs);
        for (j, (o, got)) in c.outputs.iter().zip(&outs).enumerate() {
            let want = f32s(*o);
            // A contraction sums thousands of f32 products.
            let tol = if j < c.program.out_rows.len() || c.program.columns.is_none() {
                1e-5
            } else {
                2e-4
            };
            for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= tol * w.abs().max(1.0),
                    "output {o} element {k}: fused {g}, reference {w}"
                );
            }
        }
    }
}

#[test]
fn clusters_match_the_reference() {
    let g = graph();
    let clusters = find_clusters(&g);
    // The [4, 300] chain before the MatMul, the [1, 300] chain of `b` and
    // the [4, 4] chain after it.
    let mut shapes: Vec<&[usize]> = clusters
        .iter()
        .map(|c| c.program.shape.as_slice())
        .collect();
    shapes.sort();
    assert_eq!(shapes, [&[1, 300][..], &[4, 4], &[4, 300]], "{clusters:#?}");
    assert!(clusters.iter().any(|c| c.members.len() > 15));
    let inputs: HashMap<String, Value> = [
        ("a", &[4usize, 300][..]),
        ("b", &[1, 300]),
        ("c", &[4, 1]),
        ("s", &[]),
        ("w", &[300, 4]),
    ]
    .iter()
    .enumerate()
    .map(|(k, (n, s))| {
        let mut v = values(s, k);
        if *n == "s" {
            v = Value::F(ArrayD::from_elem(IxDyn(&[]), 0.5));
        }
        (n.to_string(), v)
    })
    .collect();
    assert_clusters_match_reference(&g, &clusters, &inputs);
}

/// Short rows with a bias and a per-row input (units of several rows),
/// including a last unit of fewer rows.
#[test]
fn short_rows_match_the_reference() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[1001, 20]);
    let b = g.input("b", DType::F32, &[20]);
    let r = g.input("r", DType::F32, &[1001, 1]);
    let h = g.add(x, b);
    let h = g.sigmoid(h);
    let h = g.mul(h, r);
    let h = g.exp(h);
    g.output("h", h);
    let c = find_clusters(&g);
    assert_eq!(c.len(), 1);
    let vals = [
        values(&[1001, 20], 1),
        values(&[20], 2),
        values(&[1001, 1], 3),
    ];
    let ins: Vec<Vec<f32>> = vals
        .iter()
        .map(|v| v.f().iter().map(|&x| x as f32).collect())
        .collect();
    let refs: Vec<&[f32]> = c[0]
        .inputs
        .iter()
        .map(|&i| {
            let k = ["x", "b", "r"]
                .iter()
                .position(|n| g.find_input(n) == Some(i))
                .unwrap();
            ins[k].as_slice()
        })
        .collect();
    let mut out = vec![0.0; 1001 * 20];
    c[0].program.run(&refs, &mut [&mut out]);
    for i in 0..1001 {
        for j in 0..20 {
            let s = 1.0 / (1.0 + (-(ins[0][i * 20 + j] + ins[1][j])).exp());
            let want = (s * ins[2][i]).exp();
            let got = out[i * 20 + j];
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "({i}, {j}): {got} vs {want}"
            );
        }
    }
}

/// Slices read in place: blocks of rows and of columns, and a slice of a
/// value the cluster itself computes (which must stay a slice).
#[test]
fn sliced_inputs_match_the_reference() {
    let mut g = Graph::new();
    let x = g.input("x", DType::F32, &[6, 40]);
    let y = g.input("y", DType::F32, &[30, 8]);
    let rows = g.slice(x, 0, 2, 5); // [3, 40]
    let cols = g.slice(y, 1, 3, 5); // [30, 2]
    let cols = g.reshape(cols, &[3, 20]);
    let cols = g.node_with(metac_graphs::Op::Concat { axis: 1 }, &[cols, cols]);
    let a = g.mul(rows, cols);
    let b = g.exp(a);
    let c = g.add(b, rows);
    let own = g.slice(c, 0, 0, 1); // [1, 40], broadcast back over the rows
    let d = g.tanh(c);
    let e = g.add(d, own);
    g.output("e", e);
    g.output("b", b);
    let xv = values(&[6, 40], 1);
    let yv = values(&[30, 8], 2);
    let inputs: HashMap<String, Value> = [("x".to_string(), xv), ("y".to_string(), yv)]
        .into_iter()
        .collect();
    let clusters = find_clusters(&g);
    assert!(clusters
        .iter()
        .any(|c| c.program.views.iter().any(|v| v.is_some())));
    assert_clusters_match_reference(&g, &clusters, &inputs);
}

/// A GRU over feature-major `[k, n]` state, as in the HierarchicalRNN: the
/// features, the hidden state and a row of ones stacked by `Concat`, the
/// gates as one product with a small weight matrix, sliced, and the update;
/// with per-row scalars, broadcast rows, a reshaped `[n]` input, a
/// comparison feeding `Where`, and a tail of 1,100 - 1,024 columns.
#[test]
fn column_local_chains_match_the_reference() {
    const N: usize = 1100;
    let mut g = Graph::new();
    let feats = g.input("feats", DType::F32, &[3, N]);
    let h = g.input("h", DType::F32, &[4, N]);
    let grad = g.input("grad", DType::F32, &[N]);
    let wg = g.input("wg", DType::F32, &[8, 9]);
    let wc = g.input("wc", DType::F32, &[4, 9]);
    let scale = g.input("scale", DType::F32, &[4, 1]);
    let ones = g.input("ones", DType::F32, &[1, N]);
    let g1 = g.reshape(grad, &[1, N]);
    let f = g.mul(feats, g1); // [3, N] * [1, N]
    let x = g.concat(&[f, h, ones], 0); // [8, N]... plus the hidden state
    let x = g.concat(&[x, g1], 0); // [9, N]
    let gates = g.matmul(wg, x); // [8, N]
    let gates = g.sigmoid(gates);
    let r = g.slice(gates, 0, 0, 4);
    let z = g.slice(gates, 0, 4, 8);
    let rh = g.mul(r, h);
    let xc = g.concat(&[f, rh, ones, g1], 0); // [9, N]
    let cand = g.matmul(wc, xc);
    let cand = g.tanh(cand);
    let cand = g.mul(cand, scale); // per-row scalars
    let one_minus = g.neg(z);
    let one_minus = g.add_scalar(one_minus, 1.0);
    let keep = g.mul(z, h);
    let new = g.mul(one_minus, cand);
    let hn = g.add(keep, new);
    let cut = g.scalar(0.0);
    let neg = g.less(hn, cut);
    let g4 = g.expand(g1, &[4, N]);
    let hw = g.node_with(metac_graphs::Op::Where, &[neg, g4, hn]);
    let out = g.slice(hw, 0, 1, 3);
    g.output("h_next", hw);
    g.output("out", out);
    g.output("x", xc);
    let clusters = find_clusters(&g);
    assert_eq!(clusters.len(), 1, "{clusters:#?}");
    let c = &clusters[0];
    assert_eq!(c.program.columns, Some(N));
    assert_eq!(c.members.len(), 22, "every op but the scalar constants");
    assert_eq!(
        (0..3)
            .map(|k| c.program.output_shape(k))
            .collect::<Vec<_>>(),
        [vec![9, N], vec![4, N], vec![2, N]]
    );
    let inputs: HashMap<String, Value> = [
        ("feats", &[3, N][..]),
        ("h", &[4, N]),
        ("grad", &[N]),
        ("wg", &[8, 9]),
        ("wc", &[4, 9]),
        ("scale", &[4, 1]),
        ("ones", &[1, N]),
    ]
    .iter()
    .enumerate()
    .map(|(k, (n, s))| (n.to_string(), values(s, k + 3)))
    .collect();
    assert_clusters_match_reference(&g, &clusters, &inputs);
    // The program survives its text form.
    let text = c.program.encode();
    assert_eq!(
        metac_graphs::fusion::FusedProgram::decode(&text).unwrap(),
        c.program
    );
}

/// A log-softmax over rows with sums over columns, as in a loss over a set
/// laid out as columns: maxima, sums and means over rows, a weight
/// gradient `A @ Y^T` (and one whose `Y` the cluster computes), per-tensor
/// sums against a one-hot constant, a mean
/// over columns, a sum over both axes, and a concatenation taller than a
/// value may otherwise be; over 2,500 columns (two chunks and a tail).
#[test]
fn contractions_and_row_reductions_match_the_reference() {
    use metac_graphs::fusion::contraction_forms::contraction_forms;
    use metac_graphs::Tensor;
    const N: usize = 2500;
    let mut g = Graph::new();
    let z = g.input("z", DType::F32, &[6, N]);
    let y = g.input("y", DType::F32, &[3, N]);
    let top = g.reduce_max(z, &[0], true);
    let shifted = g.sub(z, top);
    let e = g.exp(shifted);
    let total = g.sum(e, &[0], true);
    let log_total = g.log(total);
    let log_p = g.sub(shifted, log_total);
    let row_mean = g.mean(z, &[0], true);
    let centred = g.sub(z, row_mean);
    let yt = g.transpose(y, &[1, 0]);
    let dw = g.matmul(log_p, yt); // [6, 3]

    // A contraction with a value of the cluster on the right: that value is
    // read through its transpose only, so it is not written out.
    let sq = g.mul(z, e);
    let sqt = g.transpose(sq, &[1, 0]);
    let gram = g.matmul(centred, sqt); // [6, 6]
    let onehot: Vec<f32> = (0..N * 2)
        .map(|k| f32::from((k / 2) * 2 / N == k % 2))
        .collect();
    let c = g.constant(Tensor::f32(&[N, 2], onehot));
    let per_half = g.matmul(centred, c); // [6, 2]
    let pe = g.mul(log_p, e);
    let col_mean = g.mean(pe, &[1], false); // [6]
    let all = g.sum_all(log_total); // []
    let blocks: Vec<NodeId> = (0..12)
        .map(|k| if k % 2 == 0 { log_p } else { centred })
        .collect();
    let tall = g.concat(&blocks, 0); // [72, N]
    g.output("dw", dw);
    g.output("gram", gram);
    g.output("per_half", per_half);
    g.output("col_mean", col_mean);
    g.output("all", all);
    g.output("tall", tall);
    let g = contraction_forms(&g);
    let clusters = find_clusters(&g);
    assert_eq!(clusters.len(), 1, "{clusters:#?}");
    let p = &clusters[0].program;
    assert_eq!(p.columns, Some(N));
    assert_eq!(p.out_rows, [72], "the tall concatenation, written out");
    assert_eq!(p.sums, [[6, 3], [6, 6], [6, 2], [6, 1], [1, 1]]);
    let inputs: HashMap<String, Value> = [("z", &[6, N][..]), ("y", &[3, N])]
        .iter()
        .enumerate()
        .map(|(k, (n, s))| (n.to_string(), values(s, k + 11)))
        .collect();
    assert_clusters_match_reference(&g, &clusters, &inputs);
    let text = p.encode();
    assert_eq!(
        &metac_graphs::fusion::FusedProgram::decode(&text).unwrap(),
        p
    );
}
