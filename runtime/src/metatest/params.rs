//! The final parameters of a run as a safetensors file, one tensor per
//! parameter under the problem's parameter name.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use crate::tensor::HostTensor;
use metac_contract::bundle::write_safetensors;
use metac_contract::fsutil::write_atomic;

/// `DIR/params/<optimizer>-seed<seed>.safetensors`.
pub fn params_path(dir: &Path, optimizer: &str, seed: u64) -> PathBuf {
    dir.join("params")
        .join(format!("{optimizer}-seed{seed}.safetensors"))
}

/// Writes `params` (f32, in the order of `names`) to `path` atomically.
pub fn write_params(path: &Path, names: &[String], params: &[HostTensor]) -> Result<()> {
    ensure!(
        names.len() == params.len(),
        "{} parameter names for {} tensors",
        names.len(),
        params.len()
    );
    let tensors = names
        .iter()
        .zip(params)
        .map(|(n, t)| Ok((n.clone(), t.to_graph())))
        .collect::<Result<Vec<_>>>()?;
    let bytes = write_safetensors(&tensors)?;
    write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metac_contract::bundle::read_safetensors;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn params_round_trip() {
        let dir = std::env::temp_dir().join(format!("metac-params-{}", std::process::id()));
        let path = params_path(&dir, "adam-1e-3", 7);
        assert!(path.ends_with("params/adam-1e-3-seed7.safetensors"));
        let w = HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0; 6]).unwrap());
        let b = HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.5; 3]).unwrap());
        write_params(&path, &["w0".into(), "b0".into()], &[w, b]).unwrap();
        let back = read_safetensors(&std::fs::read(&path).unwrap(), "t").unwrap();
        assert_eq!(back["w0"].shape, vec![2, 3]);
        assert_eq!(back["b0"].shape, vec![3]);
        assert!(write_params(&path, &["w0".into()], &[]).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
