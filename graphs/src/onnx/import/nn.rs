//! Normalisation and losses: Softmax, LogSoftmax, LayerNormalization,
//! BatchNormalization (inference), SoftmaxCrossEntropyLoss, NegativeLogLikelihoodLoss.

#[allow(unused_imports)]
use super::*;

/// The loaders of this family, by ONNX op type.
pub(super) const LOADERS: &[(&str, Loader)] = &[
    ("Softmax", softmax_op),
    ("LogSoftmax", softmax_op),
    ("LayerNormalization", |im: &mut Importer, c: &Ctx| {
        im.layer_norm(c)
    }),
    ("BatchNormalization", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.batch_norm(c)?])
    }),
    ("SoftmaxCrossEntropyLoss", |im: &mut Importer, c: &Ctx| {
        im.cross_entropy(c, true)
    }),
    ("NegativeLogLikelihoodLoss", |im: &mut Importer, c: &Ctx| {
        im.cross_entropy(c, false)
    }),
];

/// Softmax, LogSoftmax.
fn softmax_op(im: &mut Importer, c: &Ctx) -> R<Vec<NodeId>> {
    Ok(vec![im.softmax(c)?])
}

impl Importer<'_> {
    pub(super) fn softmax(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let s = self.shape(x);
        let log = c.node.op_type == "LogSoftmax";
        let mk = |axis| {
            if log {
                Op::LogSoftmax { axis }
            } else {
                Op::Softmax { axis }
            }
        };
        if self.opset >= 13 {
            let axis = norm_axis(c.int("axis", -1), s.len())?;
            return self.nd(mk(axis), &[x]);
        }
        // Before opset 13 the input is coerced to 2-D at `axis` and the
        // softmax runs over the flattened trailing axes.
        let axis = norm_axis(c.int("axis", 1), s.len())?;
        if axis == s.len() - 1 {
            return self.nd(mk(axis), &[x]);
        }
        let flat = self.reshape(x, &[numel(&s[..axis]), numel(&s[axis..])])?;
        let y = self.nd(mk(1), &[flat])?;
        self.reshape(y, &s)
    }

    pub(super) fn layer_norm(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        let x = c.x(0)?;
        self.require_float(x, "input")?;
        let r = self.rank(x);
        let axis = norm_axis(c.int("axis", -1), r)?;
        let eps = c.float("epsilon", 1e-5) as f64;
        let axes: Vec<usize> = (axis..r).collect();
        let mean = self.reduce(ReduceOp::Mean, x, &axes, true)?;
        let d = self.sub(x, mean)?;
        let d2 = self.mul(d, d)?;
        let var = self.reduce(ReduceOp::Mean, d2, &axes, true)?;
        let eps = self.scalar(DType::F32, eps);
        let ve = self.add(var, eps)?;
        let std = self.sqrt(ve)?;
        let mut y = self.div(d, std)?;
        y = self.mul(y, c.x(1)?)?;
        if let Some(b) = c.opt(2) {
            y = self.add(y, b)?;
        }
        let s = self.shape(x);
        if self.shape(y) != s {
            return invalid(format!(
                "scale/bias do not broadcast to the input's shape {s:?}"
            ));
        }
        let inv = if c.wants(2) {
            self.reciprocal(std)?
        } else {
            std
        };
        Ok(vec![y, mean, inv])
    }

    pub(super) fn batch_norm(&mut self, c: &Ctx) -> R<NodeId> {
        if c.int("training_mode", 0) != 0
            || c.n_outputs() > 1 && (1..c.n_outputs()).any(|i| c.wants(i))
        {
            return invalid("only inference mode is supported (training_mode=0, one output)");
        }
        let x = c.x(0)?;
        self.require_float(x, "input")?;
        let s = self.shape(x);
        if s.len() < 2 {
            return invalid(format!("input must have rank >= 2, got {}", self.ty(x)));
        }
        let mut bs = vec![1; s.len() - 1];
        bs[0] = s[1];
        let mut p = vec![];
        for (i, role) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
            let t = c.x(i)?;
            if self.shape(t) != [s[1]] {
                return invalid(format!(
                    "{role} must have shape [{}], got {}",
                    s[1],
                    self.ty(t)
                ));
            }
            p.push(self.reshape(t, &bs)?);
        }
        let eps = self.scalar(DType::F32, c.float("epsilon", 1e-5) as f64);
        let d = self.sub(x, p[2])?;
        let ve = self.add(p[3], eps)?;
        let std = self.sqrt(ve)?;
        let y = self.div(d, std)?;
        let y = self.mul(y, p[0])?;
        self.add(y, p[1])
    }

    /// SoftmaxCrossEntropyLoss (from logits) and NegativeLogLikelihoodLoss
    /// (from log-probabilities): classes on axis 1, int64 labels, optional
    /// class weights, optional ignore_index, reduction none/sum/mean.
    pub(super) fn cross_entropy(&mut self, c: &Ctx, from_logits: bool) -> R<Vec<NodeId>> {
        let (scores, labels) = (c.x(0)?, c.x(1)?);
        self.require_float(scores, "scores")?;
        let ss = self.shape(scores);
        if ss.len() < 2 {
            return invalid(format!(
                "scores must have rank >= 2 ([N, C, ...]), got {}",
                self.ty(scores)
            ));
        }
        let mut want_labels = ss.clone();
        want_labels.remove(1);
        if self.dtype(labels) != DType::I64 || self.shape(labels) != want_labels {
            return invalid(format!(
                "labels must be int64 {want_labels:?} for scores {}, got {}",
                self.ty(scores),
                self.ty(labels)
            ));
        }
        let reduction = c.string("reduction", "mean");
        if !matches!(reduction.as_str(), "none" | "sum" | "mean") {
            return invalid(format!(
                "reduction='{reduction}' is not supported (none, sum, mean)"
            ));
        }
        let r = ss.len();
        let classes = ss[1];
        let lp = if from_logits {
            self.nd(Op::LogSoftmax { axis: 1 }, &[scores])?
        } else {
            scores
        };

        // hit[n, c, ...] = labels[n, ...] == c
        let mut ls = want_labels.clone();
        ls.insert(1, 1);
        let lab = self.reshape(labels, &ls)?;
        let mut rs = vec![1; r];
        rs[1] = classes;
        let range = self.konst(Tensor::i64(&rs, (0..classes as i64).collect()));
        let hit = self.cmp(CompareOp::Equal, lab, range)?;
        let zero = self.scalar(DType::F32, 0.0);
        let picked = self.where_(hit, lp, zero)?;
        let picked = self.reduce(ReduceOp::Sum, picked, &[1], false)?;
        let mut li = self.un(UnaryOp::Neg, picked)?;

        // Per-element weights: weight[label] and/or the ignore mask.
        let mut w = None;
        if let Some(wt) = c.opt(2) {
            if self.shape(wt) != [classes] || self.dtype(wt) != DType::F32 {
                return invalid(format!(
                    "weights must be float [{classes}], got {}",
                    self.ty(wt)
                ));
            }
            let wb = self.reshape(wt, &rs)?;
            let sel = self.where_(hit, wb, zero)?;
            w = Some(self.reduce(ReduceOp::Sum, sel, &[1], false)?);
        }
        if let Some(ii) = c.attr("ignore_index").map(|a| a.i) {
            let iic = self.konst(Tensor::i64(&[], vec![ii]));
            let eq = self.cmp(CompareOp::Equal, labels, iic)?;
            let keep = self.not(eq)?;
            let m = self.cast(keep, DType::F32)?;
            w = Some(match w {
                Some(w) => self.mul(w, m)?,
                None => m,
            });
        }
        if let Some(w) = w {
            li = self.mul(li, w)?;
        }
        let loss = match reduction.as_str() {
            "none" => li,
            "sum" => self.reduce_all(ReduceOp::Sum, li)?,
            _ => {
                let total = self.reduce_all(ReduceOp::Sum, li)?;
                let count = match w {
                    Some(w) => self.reduce_all(ReduceOp::Sum, w)?,
                    None => self.scalar(DType::F32, numel(&want_labels) as f64),
                };
                self.div(total, count)?
            }
        };
        Ok(if from_logits {
            vec![loss, lp]
        } else {
            vec![loss]
        })
    }
}
