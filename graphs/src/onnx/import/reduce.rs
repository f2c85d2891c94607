//! Reductions: the Reduce* family (ReduceProd of positive inputs included) and the global pools.

#[allow(unused_imports)]
use super::*;

/// The loaders of this family, by ONNX op type.
pub(super) const LOADERS: &[(&str, Loader)] = &[
    ("ReduceSum", reduce_family),
    ("ReduceMean", reduce_family),
    ("ReduceMax", reduce_family),
    ("ReduceMin", reduce_family),
    ("ReduceSumSquare", reduce_family),
    ("ReduceL1", reduce_family),
    ("ReduceL2", reduce_family),
    ("ReduceLogSumExp", reduce_family),
    ("GlobalAveragePool", global_pool),
    ("GlobalMaxPool", global_pool),
    ("ReduceProd", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.reduce_prod(c)?])
    }),
];

/// ReduceSum, ReduceMean, ReduceMax, ReduceMin, ReduceSumSquare, ReduceL1, ReduceL2, ReduceLogSumExp.
fn reduce_family(im: &mut Importer, c: &Ctx) -> R<Vec<NodeId>> {
    Ok(vec![im.reduce_op(c)?])
}

/// GlobalAveragePool, GlobalMaxPool.
fn global_pool(im: &mut Importer, c: &Ctx) -> R<Vec<NodeId>> {
    let op = c.node.op_type.as_str();
    Ok(vec![{
        let x = c.x(0)?;
        if im.rank(x) < 3 {
            return invalid(format!("expects an input of rank >= 3, got {}", im.ty(x)));
        }
        let axes: Vec<usize> = (2..im.rank(x)).collect();
        let r = if op == "GlobalAveragePool" {
            ReduceOp::Mean
        } else {
            ReduceOp::Max
        };
        im.reduce(r, x, &axes, true)?
    }])
}

impl Importer<'_> {
    /// ReduceProd, for constant inputs only (shape arithmetic such as the
    /// element count of a shape); the IR has no product reduction.
    pub(super) fn reduce_prod(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let Some(v) = self.const_value(x) else {
            return invalid("ReduceProd is only supported on constant inputs (shape computations)");
        };
        let r = self.rank(x);
        let keep = c.int("keepdims", 1) != 0;
        let mut axes = match self.axes_operand(c, 1)? {
            Some(a) if !a.is_empty() => norm_axes(&a, r)?,
            _ if c.int("noop_with_empty_axes", 0) != 0 => return Ok(x),
            _ => (0..r).collect(),
        };
        axes.sort_unstable();
        fn prod<T: Copy + std::ops::Mul<Output = T>>(
            a: &ndarray::ArrayD<T>,
            axes: &[usize],
            one: T,
            keep: bool,
        ) -> ndarray::ArrayD<T> {
            let mut a = a.clone();
            for &ax in axes.iter().rev() {
                a = a.fold_axis(ndarray::Axis(ax), one, |&p, &x| p * x);
                if keep {
                    a = a.insert_axis(ndarray::Axis(ax));
                }
            }
            a
        }
        let out = match &v {
            Value::F(a) => Value::F(prod(a, &axes, 1.0, keep)),
            Value::I(a) => Value::I(prod(a, &axes, 1, keep)),
            Value::B(_) => return invalid("ReduceProd of bool"),
        };
        Ok(self.konst(out.to_tensor()))
    }

    pub(super) fn reduce_op(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let r = self.rank(x);
        let keep = c.int("keepdims", 1) != 0;
        let axes = match self.axes_operand(c, 1)? {
            Some(a) if !a.is_empty() => norm_axes(&a, r)?,
            _ if c.int("noop_with_empty_axes", 0) != 0 => return Ok(x),
            _ => (0..r).collect(),
        };
        let op = c.node.op_type.as_str();
        match op {
            "ReduceSum" => self.reduce(ReduceOp::Sum, x, &axes, keep),
            "ReduceMean" => self.reduce(ReduceOp::Mean, x, &axes, keep),
            "ReduceMax" => self.reduce(ReduceOp::Max, x, &axes, keep),
            "ReduceMin" => {
                let n = self.un(UnaryOp::Neg, x)?;
                let m = self.reduce(ReduceOp::Max, n, &axes, keep)?;
                self.un(UnaryOp::Neg, m)
            }
            "ReduceSumSquare" | "ReduceL2" => {
                let sq = self.mul(x, x)?;
                let s = self.reduce(ReduceOp::Sum, sq, &axes, keep)?;
                if op == "ReduceL2" {
                    self.sqrt(s)
                } else {
                    Ok(s)
                }
            }
            "ReduceL1" => {
                let a = self.un(UnaryOp::Abs, x)?;
                self.reduce(ReduceOp::Sum, a, &axes, keep)
            }
            _ => {
                // log(sum(exp(x - m))) + m with m = max(x) held constant: exact
                // for any m, so its derivatives are those of logsumexp.
                self.require_float(x, "input")?;
                let m = self.reduce(ReduceOp::Max, x, &axes, true)?;
                let m = self.nd(Op::StopGradient, &[m])?;
                let d = self.sub(x, m)?;
                let e = self.un(UnaryOp::Exp, d)?;
                let s = self.reduce(ReduceOp::Sum, e, &axes, keep)?;
                let l = self.un(UnaryOp::Log, s)?;
                let out = self.shape(l);
                let m = self.reshape(m, &out)?;
                self.add(l, m)
            }
        }
    }
}
