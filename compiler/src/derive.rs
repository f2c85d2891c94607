//! `metac derive`: gradient and Hessian-vector-product graphs of any ONNX
//! model with a scalar loss output.

use metac_graphs::autodiff::{grad, hvp_forward_over_reverse, hvp_reverse_over_reverse};
use metac_graphs::onnx::ImportedModel;
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph, NodeId};

/// How the HVP graph is built. Both give the same numbers; forward-over-
/// reverse is usually the smaller graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HvpMode {
    ForwardOverReverse,
    ReverseOverReverse,
}

impl std::str::FromStr for HvpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fwd-rev" | "forward-over-reverse" => Ok(HvpMode::ForwardOverReverse),
            "rev-rev" | "reverse-over-reverse" => Ok(HvpMode::ReverseOverReverse),
            _ => Err(format!(
                "unknown HVP mode '{s}' (expected fwd-rev or rev-rev)"
            )),
        }
    }
}

/// The derived graphs, optimised and ready to export.
pub struct Derived {
    /// Inputs: the model's inputs + each wrt initializer; outputs: the loss
    /// and `grad_<NAME>` per wrt name.
    pub grad: Graph,
    /// Inputs: as `grad` plus `v_<NAME>`; outputs: `hvp_<NAME>`.
    pub hvp: Graph,
}

#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error("--loss '{name}' is not an output of the model (outputs: {available})")]
    UnknownLoss { name: String, available: String },
    #[error("--loss '{name}' must be a scalar f32, but has type {ty}")]
    LossNotScalar { name: String, ty: String },
    #[error("--wrt '{name}' is neither a float graph input nor a float initializer of the model (float inputs and initializers: {available})")]
    UnknownWrt { name: String, available: String },
    #[error("--wrt is empty: name at least one input or initializer")]
    EmptyWrt,
    #[error("--wrt '{0}' is given twice")]
    DuplicateWrt(String),
}

/// Build the gradient and HVP graphs of `loss` with respect to `wrt`.
/// Initializers not in `wrt` become constants of the derived graphs.
pub fn derive(
    model: &ImportedModel,
    loss: &str,
    wrt: &[String],
    mode: HvpMode,
) -> Result<Derived, DeriveError> {
    let g0 = &model.graph;
    let loss_id = g0
        .find_output(loss)
        .ok_or_else(|| DeriveError::UnknownLoss {
            name: loss.into(),
            available: g0
                .outputs()
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let lt = g0.ty(loss_id);
    if !lt.shape.is_empty() || lt.dtype != DType::F32 {
        return Err(DeriveError::LossNotScalar {
            name: loss.into(),
            ty: lt.to_string(),
        });
    }
    if wrt.is_empty() {
        return Err(DeriveError::EmptyWrt);
    }
    let float_names: Vec<String> = g0
        .inputs()
        .into_iter()
        .filter(|(_, id)| g0.dtype(*id) == DType::F32)
        .map(|(n, _)| n)
        .collect();
    for (i, w) in wrt.iter().enumerate() {
        if !float_names.contains(w) {
            return Err(DeriveError::UnknownWrt {
                name: w.clone(),
                available: float_names.join(", "),
            });
        }
        if wrt[..i].contains(w) {
            return Err(DeriveError::DuplicateWrt(w.clone()));
        }
    }
    // Parameters that are not differentiated are baked in as constants.
    let mut base = g0.clone();
    for (name, value) in &model.initializers {
        if !wrt.contains(name) {
            let id = base.find_input(name).expect("initializer is an input");
            base.freeze_input(id, value.clone())
                .expect("initializer type matches");
        }
    }
    base.set_outputs(vec![(loss.to_string(), loss_id)]);
    let wrt_ids: Vec<NodeId> = wrt
        .iter()
        .map(|w| base.find_input(w).expect("checked"))
        .collect();

    let mut gg = base.clone();
    let grads = grad(&mut gg, loss_id, &wrt_ids);
    for (w, gid) in wrt.iter().zip(grads) {
        gg.output(&format!("grad_{w}"), gid);
    }

    let mut hg = base;
    hg.set_outputs(vec![]);
    let vs: Vec<NodeId> = wrt
        .iter()
        .zip(&wrt_ids)
        .map(|(w, &id)| {
            let s = hg.shape(id).to_vec();
            hg.input(&format!("v_{w}"), DType::F32, &s)
        })
        .collect();
    let hvps = match mode {
        HvpMode::ForwardOverReverse => hvp_forward_over_reverse(&mut hg, loss_id, &wrt_ids, &vs),
        HvpMode::ReverseOverReverse => hvp_reverse_over_reverse(&mut hg, loss_id, &wrt_ids, &vs),
    };
    for (w, h) in wrt.iter().zip(hvps) {
        hg.output(&format!("hvp_{w}"), h);
    }
    Ok(Derived {
        grad: optimize(&gg),
        hvp: optimize(&hg),
    })
}
