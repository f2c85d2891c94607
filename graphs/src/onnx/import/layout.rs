//! Layout ops: Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice,
//! Gather, ScatterND (row-wise add), Expand, Tile, Trilu.

#[allow(unused_imports)]
use super::*;

/// The loaders of this family, by ONNX op type.
pub(super) const LOADERS: &[(&str, Loader)] = &[
    ("Reshape", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.reshape_op(c)?])
    }),
    ("Flatten", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            let s = im.shape(x);
            let r = s.len() as i64;
            let axis = c.int("axis", 1);
            let a = if axis < 0 { axis + r } else { axis };
            if a < 0 || a > r {
                return invalid(format!("axis {axis} is out of range for rank {r}"));
            }
            let a = a as usize;
            im.reshape(x, &[numel(&s[..a]), numel(&s[a..])])?
        }])
    }),
    ("Squeeze", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            let s = im.shape(x);
            let axes = match im.axes_operand(c, 1)? {
                Some(a) if !a.is_empty() => norm_axes(&a, s.len())?,
                _ => (0..s.len()).filter(|&i| s[i] == 1).collect(),
            };
            if let Some(&a) = axes.iter().find(|&&a| s[a] != 1) {
                return invalid(format!(
                    "cannot squeeze axis {a} of size {} (shape {s:?})",
                    s[a]
                ));
            }
            let out: Vec<usize> = (0..s.len())
                .filter(|i| !axes.contains(i))
                .map(|i| s[i])
                .collect();
            im.reshape(x, &out)?
        }])
    }),
    ("Unsqueeze", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            let s = im.shape(x);
            let axes = im.axes_operand(c, 1)?.ok_or("missing axes")?;
            let r = s.len() + axes.len();
            let axes = norm_axes(&axes, r)?;
            let mut rest = s.iter();
            let out: Vec<usize> = (0..r)
                .map(|i| {
                    if axes.contains(&i) {
                        1
                    } else {
                        *rest.next().unwrap()
                    }
                })
                .collect();
            im.reshape(x, &out)?
        }])
    }),
    ("Transpose", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            let r = im.rank(x);
            let perm = match c.ints("perm") {
                Some(p) => p
                    .iter()
                    .map(|&v| to_usize(v, "perm"))
                    .collect::<R<Vec<_>>>()?,
                None => (0..r).rev().collect(),
            };
            im.transpose(x, &perm)?
        }])
    }),
    ("Concat", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let xs: Vec<NodeId> = (0..c.ins.len()).map(|i| c.x(i)).collect::<R<_>>()?;
            let first = *xs.first().ok_or("needs at least one input")?;
            let axis = norm_axis(
                c.attr("axis").ok_or("missing attribute 'axis'")?.i,
                im.rank(first),
            )?;
            im.concat(&xs, axis)?
        }])
    }),
    ("Split", |im: &mut Importer, c: &Ctx| im.split(c)),
    ("SplitToSequence", |im: &mut Importer, c: &Ctx| {
        im.split_to_sequence(c)
    }),
    ("SequenceAt", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.sequence_at(c)?])
    }),
    ("Slice", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.slice_op(c)?])
    }),
    ("Gather", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.gather(c)?])
    }),
    ("ScatterND", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.scatter_nd(c)?])
    }),
    ("Expand", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            let s = im.const_ints(c, 1, "shape")?;
            let s: Vec<usize> = s.iter().map(|&d| to_usize(d, "shape")).collect::<R<_>>()?;
            let out = broadcast_shapes(&im.shape(x), &s)?;
            im.expand(x, &out)?
        }])
    }),
    ("Tile", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let mut x = c.x(0)?;
            let reps = im.const_ints(c, 1, "repeats")?;
            if reps.len() != im.rank(x) {
                return invalid(format!("{} repeats for rank {}", reps.len(), im.rank(x)));
            }
            for (axis, &r) in reps.iter().enumerate() {
                let r = to_usize(r, "repeats")?;
                x = if r == 0 {
                    im.slice(x, axis, 0, 0)?
                } else {
                    im.concat(&vec![x; r], axis)?
                };
            }
            x
        }])
    }),
    ("Trilu", |im: &mut Importer, c: &Ctx| Ok(vec![im.trilu(c)?])),
];

impl Importer<'_> {
    /// Trilu: `x` masked by a constant triangle.
    pub(super) fn trilu(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let s = self.shape(x);
        if s.len() < 2 {
            return invalid(format!("input must have rank >= 2, got {}", self.ty(x)));
        }
        let k = match c.opt(1) {
            Some(_) => self
                .const_scalar(c, 1, "k")?
                .as_i64()
                .ok_or("k must be int64")?[0],
            None => 0,
        };
        let upper = c.int("upper", 1) != 0;
        let (m, n) = (s[s.len() - 2], s[s.len() - 1]);
        let mask: Vec<bool> = (0..m * n)
            .map(|p| {
                let d = (p % n) as i64 - (p / n) as i64;
                if upper {
                    d >= k
                } else {
                    d <= k
                }
            })
            .collect();
        let mask = self.konst(Tensor::bool(&[m, n], mask));
        let zero = self.scalar(self.dtype(x), 0.0);
        let y = self.where_(mask, x, zero)?;
        self.expand(y, &s)
    }

    pub(super) fn reshape_op(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let xs = self.shape(x);
        let spec = match c.opt(1) {
            Some(_) => self.const_ints(c, 1, "shape")?,
            None => c.ints("shape").ok_or("missing shape")?,
        };
        let allowzero = c.int("allowzero", 0) != 0;
        let mut out = vec![];
        let mut infer = None;
        for (i, &d) in spec.iter().enumerate() {
            match d {
                -1 => {
                    if infer.replace(i).is_some() {
                        return invalid(format!("shape {spec:?} has more than one -1"));
                    }
                    out.push(1);
                }
                0 if !allowzero => out.push(*xs.get(i).ok_or_else(|| {
                    format!(
                        "shape {spec:?}: 0 at axis {i} copies a dimension the input {xs:?} lacks"
                    )
                })?),
                d if d < 0 => return invalid(format!("shape {spec:?} has invalid dimension {d}")),
                d => out.push(d as usize),
            }
        }
        if let Some(i) = infer {
            let known = numel(&out);
            if known == 0 || !numel(&xs).is_multiple_of(known) {
                return invalid(format!("cannot reshape {xs:?} to {spec:?}"));
            }
            out[i] = numel(&xs) / known;
        }
        if numel(&out) != numel(&xs) {
            return invalid(format!(
                "cannot reshape {xs:?} ({} elements) to {spec:?}",
                numel(&xs)
            ));
        }
        self.reshape(x, &out)
    }

    pub(super) fn split(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        let x = c.x(0)?;
        let xs = self.shape(x);
        let axis = norm_axis(c.int("axis", 0), xs.len())?;
        let dim = xs[axis];
        let n_out = c.n_outputs();
        let sizes: Vec<usize> = if c.opt(1).is_some() {
            let v = self.const_ints(c, 1, "split")?;
            v.iter().map(|&s| to_usize(s, "split")).collect::<R<_>>()?
        } else if let Some(v) = c.ints("split") {
            v.iter().map(|&s| to_usize(s, "split")).collect::<R<_>>()?
        } else {
            let k = match c.attr("num_outputs") {
                Some(a) => to_usize(a.i, "num_outputs")?,
                None => n_out,
            };
            if k == 0 {
                return invalid("no outputs to split into");
            }
            let chunk = dim.div_ceil(k);
            if chunk * (k - 1) > dim {
                return invalid(format!("cannot split {dim} into {k} parts"));
            }
            let mut v = vec![chunk; k - 1];
            v.push(dim - chunk * (k - 1));
            v
        };
        if sizes.iter().sum::<usize>() != dim {
            return invalid(format!("split sizes {sizes:?} do not add up to {dim}"));
        }
        if sizes.len() < n_out {
            return invalid(format!("{} split sizes for {n_out} outputs", sizes.len()));
        }
        let mut outs = vec![];
        let mut off = 0;
        for s in sizes {
            outs.push(self.slice(x, axis, off, off + s)?);
            off += s;
        }
        Ok(outs)
    }

    /// SplitToSequence (what `torch.chunk` and `torch.split` export as with
    /// `dynamo=True`): the pieces are kept as a sequence of the importer,
    /// for SequenceAt; nothing else reads sequences.
    pub(super) fn split_to_sequence(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        let x = c.x(0)?;
        let xs = self.shape(x);
        let axis = norm_axis(c.int("axis", 0), xs.len())?;
        let dim = xs[axis];
        let mut squeeze = false;
        let sizes: Vec<usize> = match c.opt(1) {
            Some(id) => {
                let Some(t) = self.const_tensor(id) else {
                    return invalid("input 1 ('split') must be a constant");
                };
                let v = match t.data {
                    TensorData::I64(v) => v,
                    _ => return invalid("input 1 ('split') must be int64"),
                };
                if t.shape.is_empty() {
                    // One chunk length: equal pieces, the last shorter.
                    let k = to_usize(v[0], "split")?;
                    if k == 0 {
                        return invalid("split length 0");
                    }
                    let mut s = vec![k; dim / k];
                    if !dim.is_multiple_of(k) {
                        s.push(dim % k);
                    }
                    s
                } else {
                    v.iter().map(|&s| to_usize(s, "split")).collect::<R<_>>()?
                }
            }
            None => {
                squeeze = c.int("keepdims", 1) == 0;
                vec![1; dim]
            }
        };
        if sizes.iter().sum::<usize>() != dim {
            return invalid(format!("split sizes {sizes:?} do not add up to {dim}"));
        }
        let mut pieces = vec![];
        let mut off = 0;
        for s in sizes {
            let mut p = self.slice(x, axis, off, off + s)?;
            if squeeze {
                let mut shape = self.shape(p);
                shape.remove(axis);
                p = self.reshape(p, &shape)?;
            }
            pieces.push(p);
            off += s;
        }
        let out = c.node.output.first().ok_or("no output")?;
        self.seqs.insert(out.clone(), pieces);
        Ok(vec![])
    }

    /// SequenceAt of a sequence of the importer, at a constant position.
    pub(super) fn sequence_at(&mut self, c: &Ctx) -> R<NodeId> {
        let name = c.input_name(0);
        let Some(seq) = self.seqs.get(name) else {
            return invalid(format!(
                "input 0 ('{name}') is not a sequence this importer knows (only SplitToSequence's)"
            ));
        };
        let n = seq.len() as i64;
        let seq = seq.clone();
        let pos = self.const_ints(c, 1, "position")?;
        let p = *pos.first().ok_or("position is empty")?;
        let q = if p < 0 { p + n } else { p };
        if !(0..n).contains(&q) {
            return invalid(format!("position {p} is out of range for {n} tensors"));
        }
        Ok(seq[q as usize])
    }

    pub(super) fn slice_op(&mut self, c: &Ctx) -> R<NodeId> {
        let mut x = c.x(0)?;
        let xs = self.shape(x);
        let r = xs.len();
        let (starts, ends, axes, steps) = if c.ins.len() >= 3 {
            let starts = self.const_ints(c, 1, "starts")?;
            let ends = self.const_ints(c, 2, "ends")?;
            let axes = match c.opt(3) {
                Some(_) => Some(self.const_ints(c, 3, "axes")?),
                None => None,
            };
            let steps = match c.opt(4) {
                Some(_) => Some(self.const_ints(c, 4, "steps")?),
                None => None,
            };
            (starts, ends, axes, steps)
        } else {
            (
                c.ints("starts").ok_or("missing starts")?,
                c.ints("ends").ok_or("missing ends")?,
                c.ints("axes"),
                None,
            )
        };
        let k = starts.len();
        let axes = axes.unwrap_or_else(|| (0..k as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; k]);
        if ends.len() != k || axes.len() != k || steps.len() != k {
            return invalid("starts, ends, axes and steps differ in length");
        }
        let axes = norm_axes(&axes, r)?;
        for i in 0..k {
            let (a, step) = (axes[i], steps[i]);
            let dim = xs[a] as i64;
            let wrap = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
            if step == 1 {
                let s = wrap(starts[i]).clamp(0, dim);
                let e = wrap(ends[i]).clamp(0, dim).max(s);
                x = self.slice(x, a, s as usize, e as usize)?;
                continue;
            }
            // Other steps: the same clamping rules, then a constant Gather.
            let idx: Vec<i64> = if step > 0 {
                let s = wrap(starts[i]).clamp(0, dim);
                let e = wrap(ends[i]).clamp(0, dim);
                (s..e).step_by(step as usize).collect()
            } else if step < 0 {
                let s = wrap(starts[i]).clamp(-1, dim - 1);
                let e = wrap(ends[i]).clamp(-1, dim - 1);
                let mut v = vec![];
                let mut j = s;
                while j > e {
                    v.push(j);
                    j += step;
                }
                v
            } else {
                return invalid(format!("step 0 on axis {a}"));
            };
            x = if idx.is_empty() {
                self.slice(x, a, 0, 0)?
            } else {
                let it = self.konst(Tensor::i64(&[idx.len()], idx));
                self.nd(Op::Gather { axis: a }, &[x, it])?
            };
        }
        Ok(x)
    }

    /// ScatterND with `reduction="add"` over rows (`[k, 1]` indices): the
    /// IR's `ScatterAdd` (what Gather's adjoint exports as). Other
    /// reductions and index depths are not supported.
    pub(super) fn scatter_nd(&mut self, c: &Ctx) -> R<NodeId> {
        let (x, idx, upd) = (c.x(0)?, c.x(1)?, c.x(2)?);
        let reduction = c.string("reduction", "none");
        if reduction != "add" {
            return invalid(format!(
                "ScatterND with reduction '{reduction}' is not supported (only 'add')"
            ));
        }
        let is = self.shape(idx);
        if is.len() != 2 || is[1] != 1 {
            return invalid(format!(
                "ScatterND indices must be [k, 1] (rows), got {is:?}"
            ));
        }
        let rows = self.reshape(idx, &[is[0]])?;
        self.nd(Op::ScatterAdd, &[x, rows, upd])
    }

    pub(super) fn gather(&mut self, c: &Ctx) -> R<NodeId> {
        let (x, idx) = (c.x(0)?, c.x(1)?);
        let xs = self.shape(x);
        let axis = norm_axis(c.int("axis", 0), xs.len())?;
        let dim = xs[axis] as i64;
        if self.dtype(idx) != DType::I64 {
            return invalid(format!(
                "indices must be int64 (or int32), got {}",
                self.ty(idx)
            ));
        }
        let idx = if let Some(t) = self.const_tensor(idx) {
            let v = t.as_i64().unwrap();
            let mut out = Vec::with_capacity(v.len());
            for &i in v {
                let j = if i < 0 { i + dim } else { i };
                if j < 0 || j >= dim {
                    return invalid(format!(
                        "index {i} is out of range for axis {axis} of size {dim}"
                    ));
                }
                out.push(j);
            }
            if out.is_empty() {
                // Nothing to gather: an empty result of the right shape.
                let mut s = xs[..axis].to_vec();
                s.extend(&t.shape);
                s.extend(&xs[axis + 1..]);
                let t = match self.dtype(x) {
                    DType::F32 => Tensor::f32(&s, vec![]),
                    DType::I64 => Tensor::i64(&s, vec![]),
                    DType::Bool => Tensor::bool(&s, vec![]),
                };
                return Ok(self.konst(t));
            }
            self.konst(Tensor::i64(&t.shape, out))
        } else {
            // Runtime indices: negatives wrapped into [0, dim) in the graph,
            // as constant indices are above, so the Gather sees
            // non-negative indices either way.
            let zero = self.scalar(DType::I64, 0.0);
            let neg = self.cmp(CompareOp::Less, idx, zero)?;
            let d = self.scalar(DType::I64, dim as f64);
            let wrapped = self.add(idx, d)?;
            self.where_(neg, wrapped, idx)?
        };
        self.nd(Op::Gather { axis }, &[x, idx])
    }
}
