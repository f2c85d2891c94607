//! Constants and shape computations (constant by construction): Constant,
//! ConstantOfShape, Range, Shape, Size.

#[allow(unused_imports)]
use super::*;

/// The loaders of this family, by ONNX op type.
pub(super) const LOADERS: &[(&str, Loader)] = &[
    ("Constant", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.constant(c)?])
    }),
    ("Shape", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let s = im.shape(c.x(0)?);
            let r = s.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clampi(c.int("start", 0));
            let end = clampi(c.int("end", r)).max(start);
            let v: Vec<i64> = s[start..end].iter().map(|&d| d as i64).collect();
            im.konst(Tensor::i64(&[v.len()], v))
        }])
    }),
    ("Size", |im: &mut Importer, c: &Ctx| {
        Ok(vec![{
            let n = im.ty(c.x(0)?).numel() as i64;
            im.konst(Tensor::i64(&[], vec![n]))
        }])
    }),
    ("ConstantOfShape", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.constant_of_shape(c)?])
    }),
    ("Range", |im: &mut Importer, c: &Ctx| Ok(vec![im.range(c)?])),
];

impl Importer<'_> {
    pub(super) fn constant(&mut self, c: &Ctx) -> R<NodeId> {
        let attr = c
            .node
            .attribute
            .iter()
            .find(|a| a.name.starts_with("value") || a.name == "sparse_value")
            .ok_or(
                "has no value attribute (value, value_float, value_floats, value_int, value_ints)",
            )?;
        let t = match attr.name.as_str() {
            "value" => {
                let t = attr.t.as_ref().ok_or("attribute 'value' holds no tensor")?;
                decode_constant(t).map_err(|m| format!("value: {m}"))?
            }
            "value_float" => Tensor::scalar_f32(attr.f),
            "value_floats" => Tensor::f32(&[attr.floats.len()], attr.floats.clone()),
            "value_int" => Tensor::i64(&[], vec![attr.i]),
            "value_ints" => Tensor::i64(&[attr.ints.len()], attr.ints.clone()),
            other => return invalid(format!("value attribute '{other}' is not supported")),
        };
        Ok(self.konst(t))
    }

    pub(super) fn constant_of_shape(&mut self, c: &Ctx) -> R<NodeId> {
        let s = self.const_ints(c, 0, "shape")?;
        let s: Vec<usize> = s.iter().map(|&d| to_usize(d, "shape")).collect::<R<_>>()?;
        let value = match c.attr("value").and_then(|a| a.t.as_ref()) {
            Some(t) => decode_tensor(t).map_err(|m| format!("value: {m}"))?,
            None => Tensor::f32(&[1], vec![0.0]),
        };
        if value.numel() != 1 {
            return invalid(format!("value must hold one element, got {}", value.ty()));
        }
        let n = numel(&s);
        let t = match &value.data {
            TensorData::F32(v) => Tensor::f32(&s, vec![v[0]; n]),
            TensorData::I64(v) => Tensor::i64(&s, vec![v[0]; n]),
            TensorData::Bool(v) => Tensor::bool(&s, vec![v[0]; n]),
        };
        if n <= 1 << 12 {
            return Ok(self.konst(t));
        }
        let v = match &value.data {
            TensorData::F32(v) => v[0] as f64,
            TensorData::I64(v) => v[0] as f64,
            TensorData::Bool(v) => v[0] as u8 as f64,
        };
        self.nd(
            Op::Fill {
                value: v,
                ty: TensorType::new(value.dtype(), &s),
            },
            &[],
        )
    }

    pub(super) fn range(&mut self, c: &Ctx) -> R<NodeId> {
        let (s, l, d) = (
            self.const_scalar(c, 0, "start")?,
            self.const_scalar(c, 1, "limit")?,
            self.const_scalar(c, 2, "delta")?,
        );
        if s.dtype() != l.dtype() || s.dtype() != d.dtype() {
            return invalid("start, limit and delta must share an element type");
        }
        match (&s.data, &l.data, &d.data) {
            (TensorData::I64(s), TensorData::I64(l), TensorData::I64(d)) => {
                let (s, l, d) = (s[0], l[0], d[0]);
                if d == 0 {
                    return invalid("delta is 0");
                }
                let n = ((l as f64 - s as f64) / d as f64).ceil().max(0.0) as usize;
                let v: Vec<i64> = (0..n as i64).map(|i| s + i * d).collect();
                Ok(self.konst(Tensor::i64(&[n], v)))
            }
            (TensorData::F32(s), TensorData::F32(l), TensorData::F32(d)) => {
                let (s, l, d) = (s[0], l[0], d[0]);
                if d == 0.0 {
                    return invalid("delta is 0");
                }
                let n = ((l - s) / d).ceil().max(0.0) as usize;
                let v: Vec<f32> = (0..n).map(|i| s + i as f32 * d).collect();
                Ok(self.konst(Tensor::f32(&[n], v)))
            }
            _ => invalid("Range of bool"),
        }
    }
}
