//! Elementwise ops: plumbing (Identity, Dropout, Cast, CastLike), arithmetic,
//! unary functions and activations, comparisons and logic, Where.

#[allow(unused_imports)]
use super::*;

/// The loaders of this family, by ONNX op type.
pub(super) const LOADERS: &[(&str, Loader)] = &[
    ("Identity", |_im: &mut Importer, c: &Ctx| Ok(vec![c.x(0)?])),
    ("Dropout", |im: &mut Importer, c: &Ctx| im.dropout(c)),
    ("Cast", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let to = c.attr("to").ok_or("missing attribute 'to'")?.i as i32;
            let to = ir_dtype(to).map_err(|m| format!("cast target: {m}"))?;
            im.cast(c.x(0)?, to)?
        }])
    }),
    ("CastLike", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let to = im.dtype(c.x(1)?);
            im.cast(c.x(0)?, to)?
        }])
    }),
    ("Add", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.add(c.x(0)?, c.x(1)?)?])
    }),
    ("Sub", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.sub(c.x(0)?, c.x(1)?)?])
    }),
    ("Mul", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.mul(c.x(0)?, c.x(1)?)?])
    }),
    ("Div", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.div(c.x(0)?, c.x(1)?)?])
    }),
    ("Pow", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.pow(c.x(0)?, c.x(1)?)?])
    }),
    ("Sum", variadic),
    ("Min", variadic),
    ("Max", variadic),
    ("Mean", variadic),
    ("Neg", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Neg, c.x(0)?)?])
    }),
    ("Abs", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Abs, c.x(0)?)?])
    }),
    ("Sign", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Sign, c.x(0)?)?])
    }),
    ("Exp", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Exp, c.x(0)?)?])
    }),
    ("Log", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Log, c.x(0)?)?])
    }),
    ("Sqrt", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Sqrt, c.x(0)?)?])
    }),
    ("Sigmoid", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Sigmoid, c.x(0)?)?])
    }),
    ("Tanh", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Tanh, c.x(0)?)?])
    }),
    ("Relu", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Relu, c.x(0)?)?])
    }),
    ("Erf", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Erf, c.x(0)?)?])
    }),
    ("Asinh", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.un(UnaryOp::Asinh, c.x(0)?)?])
    }),
    ("Reciprocal", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.reciprocal(c.x(0)?)?])
    }),
    ("LeakyRelu", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            let alpha = im.scalar(DType::F32, c.float("alpha", 0.01) as f64);
            im.negative_slope(x, alpha)?
        }])
    }),
    ("PRelu", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            im.negative_slope(x, c.x(1)?)?
        }])
    }),
    ("Gelu", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.gelu(c.x(0)?, &c.string("approximate", "none"))?])
    }),
    ("Clip", |im: &mut Importer, c: &Ctx| Ok(vec![im.clip(c)?])),
    ("HardSigmoid", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let (alpha, beta) = (c.float("alpha", 0.2), c.float("beta", 0.5));
            im.hard_sigmoid(c.x(0)?, alpha as f64, beta as f64)?
        }])
    }),
    ("HardSwish", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let x = c.x(0)?;
            let h = im.hard_sigmoid(x, 1.0 / 6.0, 0.5)?;
            im.mul(x, h)?
        }])
    }),
    ("Mod", |im: &mut Importer, c: &Ctx| Ok(vec![im.modulo(c)?])),
    ("Equal", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.cmp(CompareOp::Equal, c.x(0)?, c.x(1)?)?])
    }),
    ("Less", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.cmp(CompareOp::Less, c.x(0)?, c.x(1)?)?])
    }),
    ("Greater", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.cmp(CompareOp::Greater, c.x(0)?, c.x(1)?)?])
    }),
    ("LessOrEqual", compare_or_equal),
    ("GreaterOrEqual", compare_or_equal),
    ("Not", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.not(c.x(0)?)?])
    }),
    ("And", logic_op),
    ("Or", logic_op),
    ("Xor", logic_op),
    ("Where", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let cond = c.x(0)?;
            if im.dtype(cond) != DType::Bool {
                return invalid(format!("condition must be bool, got {}", im.ty(cond)));
            }
            im.where_(cond, c.x(1)?, c.x(2)?)?
        }])
    }),
];

/// Sum, Min, Max, Mean.
fn variadic(im: &mut Importer, c: &Ctx) -> R<Vec<NodeId>> {
    let op = c.node.op_type.as_str();
    Ok(vec![{
        let bop = match op {
            "Sum" | "Mean" => BinaryOp::Add,
            "Min" => BinaryOp::Min,
            _ => BinaryOp::Max,
        };
        let xs: Vec<NodeId> = (0..c.ins.len()).map(|i| c.x(i)).collect::<R<_>>()?;
        let mut acc = *xs.first().ok_or("needs at least one input")?;
        for &x in &xs[1..] {
            acc = im.bin(bop, acc, x)?;
        }
        if op == "Mean" && xs.len() > 1 {
            let n = im.scalar(im.dtype(acc), xs.len() as f64);
            acc = im.div(acc, n)?;
        }
        // A single input still broadcasts nowhere: identity.
        acc
    }])
}

/// LessOrEqual, GreaterOrEqual.
fn compare_or_equal(im: &mut Importer, c: &Ctx) -> R<Vec<NodeId>> {
    let op = c.node.op_type.as_str();
    Ok(vec![{
        let (a, b) = (c.x(0)?, c.x(1)?);
        let strict = if op == "LessOrEqual" {
            CompareOp::Less
        } else {
            CompareOp::Greater
        };
        let s = im.cmp(strict, a, b)?;
        let e = im.cmp(CompareOp::Equal, a, b)?;
        im.logic("Or", s, e)?
    }])
}

/// And, Or, Xor.
fn logic_op(im: &mut Importer, c: &Ctx) -> R<Vec<NodeId>> {
    let op = c.node.op_type.as_str();
    Ok(vec![im.logic(op, c.x(0)?, c.x(1)?)?])
}

impl Importer<'_> {
    pub(super) fn pow(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        let b = self.cast(b, self.dtype(a))?;
        if self.dtype(a) == DType::F32 && self.g.shape(b).iter().product::<usize>() == 1 {
            if let Some(e) = self.const_tensor(b).and_then(|t| t.as_f32().map(|v| v[0])) {
                // Keep the common exponents in simpler ops (cheaper and
                // better-behaved derivatives); the result keeps Pow's shape.
                let out = broadcast_shapes(&self.shape(a), &self.shape(b))?;
                let y = match e {
                    1.0 => Some(a),
                    2.0 => Some(self.mul(a, a)?),
                    0.5 => Some(self.sqrt(a)?),
                    -1.0 => Some(self.reciprocal(a)?),
                    _ => None,
                };
                if let Some(y) = y {
                    return self.expand(y, &out);
                }
            }
        }
        self.bin(BinaryOp::Pow, a, b)
    }

    /// `x` where `x >= 0`, `slope * x` elsewhere (LeakyRelu, PRelu).
    pub(super) fn negative_slope(&mut self, x: NodeId, slope: NodeId) -> R<NodeId> {
        self.require_float(x, "input")?;
        let zero = self.scalar(DType::F32, 0.0);
        let neg = self.cmp(CompareOp::Less, x, zero)?;
        let sx = self.mul(x, slope)?;
        self.where_(neg, sx, x)
    }

    pub(super) fn gelu(&mut self, x: NodeId, approximate: &str) -> R<NodeId> {
        self.require_float(x, "input")?;
        let inner = match approximate {
            "none" => {
                // 0.5 x (1 + erf(x / sqrt 2))
                let r2 = self.scalar(DType::F32, std::f64::consts::SQRT_2);
                let t = self.div(x, r2)?;
                self.un(UnaryOp::Erf, t)?
            }
            "tanh" => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let x2 = self.mul(x, x)?;
                let x3 = self.mul(x2, x)?;
                let t = self.mul_scalar(x3, 0.044715)?;
                let t = self.add(x, t)?;
                let t = self.mul_scalar(t, (2.0 / std::f64::consts::PI).sqrt())?;
                self.un(UnaryOp::Tanh, t)?
            }
            other => {
                return invalid(format!(
                    "approximate='{other}' is not supported (none, tanh)"
                ))
            }
        };
        let one = self.scalar(DType::F32, 1.0);
        let t = self.add(inner, one)?;
        let t = self.mul(x, t)?;
        self.mul_scalar(t, 0.5)
    }

    pub(super) fn clip(&mut self, c: &Ctx) -> R<NodeId> {
        let x = c.x(0)?;
        let dt = self.dtype(x);
        let (lo, hi) = if c.ins.len() > 1 || self.opset >= 11 {
            (c.opt(1), c.opt(2))
        } else {
            let lo = c.attr("min").map(|a| a.f as f64);
            let hi = c.attr("max").map(|a| a.f as f64);
            (
                lo.map(|v| self.scalar(dt, v)),
                hi.map(|v| self.scalar(dt, v)),
            )
        };
        let mut y = x;
        if let Some(lo) = lo {
            y = self.bin(BinaryOp::Max, y, lo)?;
        }
        if let Some(hi) = hi {
            y = self.bin(BinaryOp::Min, y, hi)?;
        }
        let s = self.shape(x);
        self.expand(y, &s)
    }

    pub(super) fn logic(&mut self, op: &str, a: NodeId, b: NodeId) -> R<NodeId> {
        for x in [a, b] {
            if self.dtype(x) != DType::Bool {
                return invalid(format!("operands must be bool, got {}", self.ty(x)));
            }
        }
        match op {
            "And" => {
                let f = self.scalar(DType::Bool, 0.0);
                self.where_(a, b, f)
            }
            "Or" => {
                let t = self.scalar(DType::Bool, 1.0);
                self.where_(a, t, b)
            }
            _ => {
                let nb = self.not(b)?;
                self.where_(a, nb, b)
            }
        }
    }
}

impl Importer<'_> {
    /// `max(0, min(1, alpha x + beta))`.
    pub(super) fn hard_sigmoid(&mut self, x: NodeId, alpha: f64, beta: f64) -> R<NodeId> {
        self.require_float(x, "input")?;
        let t = self.mul_scalar(x, alpha)?;
        let b = self.scalar(DType::F32, beta);
        let t = self.add(t, b)?;
        let one = self.scalar(DType::F32, 1.0);
        let t = self.bin(BinaryOp::Min, t, one)?;
        let zero = self.scalar(DType::F32, 0.0);
        self.bin(BinaryOp::Max, t, zero)
    }

    /// Dropout as inference: the identity (and an all-true mask). In
    /// training mode it would draw a random mask, which a static
    /// derivative graph cannot reproduce, so a model that asks for it is
    /// rejected rather than silently changed.
    pub(super) fn dropout(&mut self, c: &Ctx) -> R<Vec<NodeId>> {
        let x = c.x(0)?;
        let training = if self.opset < 7 {
            c.int("is_test", 0) == 0
        } else if let Some(t) = c.opt(2) {
            match self.const_tensor(t).map(|t| t.data) {
                Some(TensorData::Bool(v)) => v.first().copied().unwrap_or(false),
                Some(_) => return invalid("training_mode must be a bool"),
                None => {
                    return invalid(format!(
                    "training_mode ('{}') is not a constant; only inference (training_mode=false) \
                         is supported",
                    c.input_name(2)
                ))
                }
            }
        } else {
            false
        };
        // The ratio, where it is a constant (an initializer is a parameter).
        let ratio = if self.opset >= 12 {
            match c.opt(1) {
                Some(r) => self
                    .const_tensor(r)
                    .and_then(|t| t.as_f32().map(|v| v.first().copied().unwrap_or(0.5))),
                None => Some(0.5),
            }
        } else {
            Some(c.float("ratio", 0.5))
        };
        if training && ratio != Some(0.0) {
            let shown = ratio.map_or("not a constant".to_string(), |r| r.to_string());
            return invalid(format!(
                "training mode (ratio {shown}) is not supported: it draws a random mask; \
                 export the model in eval mode (model.eval()) to derive it without dropout"
            ));
        }
        if c.wants(1) {
            let s = self.shape(x);
            let mask = self.nd(
                Op::Fill {
                    value: 1.0,
                    ty: TensorType::new(DType::Bool, &s),
                },
                &[],
            )?;
            return Ok(vec![x, mask]);
        }
        Ok(vec![x])
    }

    /// Mod of constants (integer shape arithmetic that exporters emit),
    /// folded at import: `fmod = 0` takes the divisor's sign (Python's
    /// `%`), `fmod = 1` the dividend's (C's `fmod`, required for floats).
    pub(super) fn modulo(&mut self, c: &Ctx) -> R<NodeId> {
        let fmod = c.int("fmod", 0) != 0;
        let mut vals = vec![];
        for i in 0..2 {
            let id = c.x(i)?;
            let Some(t) = self.const_tensor(id) else {
                return invalid(format!(
                    "input {i} ('{}') depends on a graph input or a parameter; Mod is supported only on \
                     constants (folded at import)",
                    c.input_name(i)
                ));
            };
            vals.push(t);
        }
        let shape = broadcast_shapes(&vals[0].shape, &vals[1].shape)?;
        let (a, b) = (Value::from_tensor(&vals[0]), Value::from_tensor(&vals[1]));
        let (a, b) = (a.broadcast_to(&shape), b.broadcast_to(&shape));
        let t = match (&a, &b) {
            (Value::I(a), Value::I(b)) => {
                let mut out = Vec::with_capacity(a.len());
                for (&x, &y) in a.iter().zip(b.iter()) {
                    if y == 0 {
                        return invalid("integer Mod by zero");
                    }
                    let r = x.wrapping_rem(y);
                    out.push(if !fmod && r != 0 && ((r < 0) != (y < 0)) {
                        r + y
                    } else {
                        r
                    });
                }
                Tensor::i64(&shape, out)
            }
            (Value::F(a), Value::F(b)) => {
                if !fmod {
                    return invalid("fmod must be 1 for floating-point inputs");
                }
                let out: Vec<f32> = a
                    .iter()
                    .zip(b.iter())
                    .map(|(&x, &y)| (x % y) as f32)
                    .collect();
                Tensor::f32(&shape, out)
            }
            _ => return invalid("Mod needs two integer or two float inputs of one type"),
        };
        Ok(self.konst(t))
    }
}
