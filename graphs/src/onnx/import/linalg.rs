//! Linear algebra: MatMul (numpy semantics), Gemm, Conv, ConvTranspose.

#[allow(unused_imports)]
use super::*;

/// The loaders of this family, by ONNX op type.
pub(super) const LOADERS: &[(&str, Loader)] = &[
    ("MatMul", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.matmul_np(c.x(0)?, c.x(1)?)?])
    }),
    ("Gemm", |im: &mut Importer, c: &Ctx| Ok(vec![im.gemm(c)?])),
    ("Conv", |im: &mut Importer, c: &Ctx| Ok(vec![im.conv(c)?])),
    ("ConvTranspose", |im: &mut Importer, c: &Ctx| {
        Ok(vec![im.conv_transpose(c)?])
    }),
];

impl Importer<'_> {
    /// MatMul with numpy semantics for rank-1 operands.
    pub(super) fn matmul_np(&mut self, a: NodeId, b: NodeId) -> R<NodeId> {
        let (sa, sb) = (self.shape(a), self.shape(b));
        if sa.is_empty() || sb.is_empty() {
            return invalid("MatMul operands must have rank >= 1");
        }
        let a2 = if sa.len() == 1 {
            self.reshape(a, &[1, sa[0]])?
        } else {
            a
        };
        let b2 = if sb.len() == 1 {
            self.reshape(b, &[sb[0], 1])?
        } else {
            b
        };
        let y = self.matmul(a2, b2)?;
        if sa.len() > 1 && sb.len() > 1 {
            return Ok(y);
        }
        let s = self.shape(y);
        let r = s.len();
        let mut out = s[..r - 2].to_vec();
        if sa.len() > 1 {
            out.push(s[r - 2]);
        }
        if sb.len() > 1 {
            out.push(s[r - 1]);
        }
        self.reshape(y, &out)
    }

    pub(super) fn gemm(&mut self, c: &Ctx) -> R<NodeId> {
        let (mut a, mut b) = (c.x(0)?, c.x(1)?);
        if self.rank(a) != 2 || self.rank(b) != 2 {
            return invalid(format!(
                "A and B must be rank 2, got {} and {}",
                self.ty(a),
                self.ty(b)
            ));
        }
        if c.int("transA", 0) != 0 {
            a = self.transpose(a, &[1, 0])?;
        }
        if c.int("transB", 0) != 0 {
            b = self.transpose(b, &[1, 0])?;
        }
        let mut y = self.matmul(a, b)?;
        let mn = self.shape(y);
        let alpha = c.float("alpha", 1.0);
        if alpha != 1.0 {
            y = self.mul_scalar(y, alpha as f64)?;
        }
        let beta = c.float("beta", 1.0);
        if let Some(cc) = c.opt(2) {
            if beta != 0.0 {
                let cc = if beta != 1.0 {
                    self.mul_scalar(cc, beta as f64)?
                } else {
                    cc
                };
                y = self.add(y, cc)?;
            }
        }
        if self.shape(y) != mn {
            return invalid(format!(
                "C does not broadcast to the product's shape {mn:?}"
            ));
        }
        Ok(y)
    }

    /// Spatial attributes of Conv/ConvTranspose as 2-D parameters.
    pub(super) fn conv_params(
        &self,
        c: &Ctx,
        xs: &[usize],
        ws: &[usize],
        transpose: bool,
    ) -> R<ConvParams> {
        let sp = xs.len() - 2;
        let kernel = &ws[2..];
        if let Some(k) = c.ints("kernel_shape") {
            if k.iter().map(|&v| v as usize).ne(kernel.iter().copied()) {
                return invalid(format!(
                    "kernel_shape {k:?} does not match the weight {ws:?}"
                ));
            }
        }
        let (strides, dil, pads) = self.window_attrs(c, &xs[2..], kernel, !transpose)?;
        let group = to_usize(c.int("group", 1), "group")?;
        Ok(if sp == 1 {
            ConvParams {
                stride: [1, strides[0]],
                pads: [0, pads[0], 0, pads[1]],
                dilation: [1, dil[0]],
                group,
            }
        } else {
            ConvParams {
                stride: [strides[0], strides[1]],
                pads: [pads[0], pads[1], pads[2], pads[3]],
                dilation: [dil[0], dil[1]],
                group,
            }
        })
    }

    /// The window attributes of a conv or pool over the spatial extents
    /// `spatial` with `kernel`: `strides`, `dilations` and `pads` (begins,
    /// then ends), with `auto_pad` resolved (SAME_* only where `same_ok`).
    pub(super) fn window_attrs(
        &self,
        c: &Ctx,
        spatial: &[usize],
        kernel: &[usize],
        same_ok: bool,
    ) -> R<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        let sp = spatial.len();
        let get = |name: &str, n: usize, default: usize| -> R<Vec<usize>> {
            match c.ints(name) {
                Some(v) if v.len() == n => v.iter().map(|&x| to_usize(x, name)).collect(),
                Some(v) => invalid(format!("{name} has {} values, expected {n}", v.len())),
                None => Ok(vec![default; n]),
            }
        };
        let strides = get("strides", sp, 1)?;
        let dil = get("dilations", sp, 1)?;
        let mut pads = get("pads", 2 * sp, 0)?;
        match c.string("auto_pad", "NOTSET").as_str() {
            "NOTSET" | "" => {}
            "VALID" => pads = vec![0; 2 * sp],
            mode @ ("SAME_UPPER" | "SAME_LOWER") if same_ok => {
                for i in 0..sp {
                    if strides[i] == 0 {
                        return invalid("strides must be at least 1");
                    }
                    let out = spatial[i].div_ceil(strides[i]);
                    let eff = dil[i] * (kernel[i] - 1) + 1;
                    let total = ((out - 1) * strides[i] + eff).saturating_sub(spatial[i]);
                    let small = total / 2;
                    let (b, e) = if mode == "SAME_UPPER" {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                    pads[i] = b;
                    pads[sp + i] = e;
                }
            }
            other => return invalid(format!("auto_pad='{other}' is not supported")),
        }
        Ok((strides, dil, pads))
    }

    /// Check a conv's ranks; returns the shapes of x and w and whether the
    /// conv is 1-D (lifted to 2-D with a unit height).
    pub(super) fn conv_operands(&self, x: NodeId, w: NodeId) -> R<(Vec<usize>, Vec<usize>)> {
        let (xs, ws) = (self.shape(x), self.shape(w));
        if !(3..=4).contains(&xs.len()) || ws.len() != xs.len() {
            return invalid(format!(
                "only 1-D and 2-D convolutions are supported (input {}, weight {})",
                self.ty(x),
                self.ty(w)
            ));
        }
        self.require_float(x, "input")?;
        self.require_float(w, "weight")?;
        Ok((xs, ws))
    }

    pub(super) fn lift_1d(&mut self, t: NodeId) -> R<NodeId> {
        let s = self.shape(t);
        if s.len() == 3 {
            return self.reshape(t, &[s[0], s[1], 1, s[2]]);
        }
        Ok(t)
    }

    pub(super) fn add_channel_bias(&mut self, y: NodeId, bias: Option<NodeId>) -> R<NodeId> {
        let Some(b) = bias else { return Ok(y) };
        let s = self.shape(y);
        let mut bs = vec![1; s.len()];
        bs[1] = s[1];
        if self.shape(b) != [s[1]] {
            return invalid(format!(
                "bias must have shape [{}], got {}",
                s[1],
                self.ty(b)
            ));
        }
        let b = self.reshape(b, &bs)?;
        self.add(y, b)
    }

    pub(super) fn conv(&mut self, c: &Ctx) -> R<NodeId> {
        let (x, w) = (c.x(0)?, c.x(1)?);
        let (xs, ws) = self.conv_operands(x, w)?;
        let p = self.conv_params(c, &xs, &ws, false)?;
        let (group, ch, o) = (p.group, xs[1], ws[0]);
        if group == 0 || ch % group != 0 || o % group != 0 || ws[1] * group != ch {
            return invalid(format!(
                "group={group} does not fit input channels {ch} and weight {ws:?}"
            ));
        }
        // One op whatever the groups (depthwise included).
        let (x4, w4) = (self.lift_1d(x)?, self.lift_1d(w)?);
        let mut y = self.nd(Op::Conv2d(p), &[x4, w4])?;
        if xs.len() == 3 {
            let s = self.shape(y);
            y = self.reshape(y, &[s[0], s[1], s[3]])?;
        }
        self.add_channel_bias(y, c.opt(2))
    }

    pub(super) fn conv_transpose(&mut self, c: &Ctx) -> R<NodeId> {
        let (x, w) = (c.x(0)?, c.x(1)?);
        let (xs, ws) = self.conv_operands(x, w)?;
        if c.attr("output_shape").is_some() {
            return invalid(
                "the output_shape attribute is not supported (give pads and output_padding)",
            );
        }
        let p = self.conv_params(c, &xs, &ws, true)?;
        if p.group == 0 || xs[1] != ws[0] || ws[0] % p.group != 0 {
            return invalid(format!(
                "group={} does not fit input channels {} and weight {ws:?}",
                p.group, xs[1]
            ));
        }
        let sp = xs.len() - 2;
        let op = match c.ints("output_padding") {
            Some(v) if v.len() == sp => v
                .iter()
                .map(|&x| to_usize(x, "output_padding"))
                .collect::<R<Vec<_>>>()?,
            Some(v) => {
                return invalid(format!(
                    "output_padding has {} values, expected {sp}",
                    v.len()
                ))
            }
            None => vec![0; sp],
        };
        let output_padding = if sp == 1 { [0, op[0]] } else { [op[0], op[1]] };
        let (x4, w4) = (self.lift_1d(x)?, self.lift_1d(w)?);
        let mut y = self.nd(
            Op::ConvTranspose2d {
                params: p,
                output_padding,
            },
            &[x4, w4],
        )?;
        if xs.len() == 3 {
            let s = self.shape(y);
            y = self.reshape(y, &[s[0], s[1], s[3]])?;
        }
        self.add_channel_bias(y, c.opt(2))
    }
}
