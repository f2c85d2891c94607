//! The artifact bundle: the seam between `compile` and `run`.
//!
//! A bundle is a directory holding `manifest.json`, one `.onnx` file per
//! graph and `init.safetensors` with initial values. The manifest lists every
//! graph's inputs and outputs (names, dtypes, shapes), the state buffers and
//! which graph outputs feed them back as inputs, and content hashes of every
//! file. The runtime takes everything it needs from the manifest and checks
//! it against the files on load, so a tampered or mismatched bundle is
//! rejected before any work starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use metac_graphs::onnx::pb;
use metac_graphs::{Graph, Tensor, TensorData};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::fsutil::{sha256_hex, write_atomic};

pub const FORMAT: &str = "metac-bundle";
pub const FORMAT_VERSION: u32 = 2;
pub const MANIFEST: &str = "manifest.json";
pub const INIT_FILE: &str = "init.safetensors";

/// A tensor's name, dtype and static shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// One compiled graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphEntry {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Node count per ONNX op type.
    pub op_counts: BTreeMap<String, usize>,
    /// The graph's external data file (`<name>.onnx.data`), for a graph
    /// too large for one protobuf message (see [`BundleBuilder::graph`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<FileEntry>,
}

/// A (graph, tensor name) pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub graph: String,
    pub tensor: String,
}

/// A buffer the runtime owns across graph calls (parameters, optimizer
/// state, ...): where it starts, which graph inputs read it and which graph
/// output replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBuffer {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Key of the initial value in `init.safetensors`, if any.
    pub init: Option<String>,
    pub reads: Vec<Port>,
    pub updated_by: Option<Port>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub metac_version: String,
    pub onnx_opset: i64,
    /// What produced the bundle (`derive`, `l2o`, ...).
    pub kind: String,
    pub graphs: Vec<GraphEntry>,
    pub state: Vec<StateBuffer>,
    pub init: Option<FileEntry>,
    /// Program-specific settings (the compile config), free-form.
    pub meta: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
}

/// Assembles a bundle in memory, then writes it.
pub struct BundleBuilder {
    kind: String,
    /// Each graph's entry, its ONNX bytes and its external data, if any.
    graphs: Vec<(GraphEntry, Vec<u8>, Option<Vec<u8>>)>,
    state: Vec<StateBuffer>,
    init: Vec<(String, Tensor)>,
    meta: serde_json::Value,
    external_above: usize,
}

/// Graphs whose ONNX encoding exceeds this many bytes keep their large
/// tensors in an external data file: below protobuf's 2 GiB limit, with
/// room to spare.
pub const EXTERNAL_DATA_ABOVE: usize = 1_500_000_000;

fn spec(name: &str, ty: &metac_graphs::TensorType) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype: ty.dtype.name().into(),
        shape: ty.shape.clone(),
    }
}

impl BundleBuilder {
    pub fn new(kind: &str) -> Self {
        BundleBuilder {
            kind: kind.into(),
            graphs: vec![],
            state: vec![],
            init: vec![],
            meta: serde_json::Value::Null,
            external_above: EXTERNAL_DATA_ABOVE,
        }
    }

    /// Write graphs larger than `bytes` with external data (default
    /// [`EXTERNAL_DATA_ABOVE`]; smaller in tests).
    pub fn external_data_above(&mut self, bytes: usize) -> &mut Self {
        self.external_above = bytes;
        self
    }

    pub fn meta(&mut self, meta: serde_json::Value) -> &mut Self {
        self.meta = meta;
        self
    }

    /// Export `g` as `<name>.onnx`. A graph whose encoding would exceed
    /// the builder's limit (protobuf's 2 GiB in all) keeps every tensor of
    /// 1 KiB or more in `<name>.onnx.data`, as ONNX external data: ONNX
    /// Runtime (and `metac` itself) read it from the model's folder.
    pub fn graph(&mut self, name: &str, g: &Graph) -> Result<&mut Self> {
        let mut model = metac_graphs::onnx::export_model(g, name)?;
        let file = format!("{name}.onnx");
        let mut data = None;
        if model.encoded_len() > self.external_above {
            let location = format!("{file}.data");
            let bytes = metac_graphs::onnx::externalize_data(&mut model, &location, 1024);
            data = Some((
                FileEntry {
                    file: location,
                    sha256: sha256_hex(&bytes),
                },
                bytes,
            ));
        }
        let bytes = model.encode_to_vec();
        ensure!(
            bytes.len() <= metac_graphs::onnx::PROTOBUF_LIMIT,
            "graph '{name}' is {} bytes without its tensors, past protobuf's 2 GiB limit",
            bytes.len()
        );
        let entry = GraphEntry {
            name: name.into(),
            file,
            sha256: sha256_hex(&bytes),
            inputs: g
                .inputs()
                .iter()
                .map(|(n, id)| spec(n, g.ty(*id)))
                .collect(),
            outputs: g
                .outputs()
                .iter()
                .map(|(n, id)| spec(n, g.ty(*id)))
                .collect(),
            op_counts: op_counts(&model),
            data: data.as_ref().map(|(e, _)| e.clone()),
        };
        self.graphs.push((entry, bytes, data.map(|(_, b)| b)));
        Ok(self)
    }

    pub fn state(&mut self, s: StateBuffer) -> &mut Self {
        self.state.push(s);
        self
    }

    pub fn init_tensor(&mut self, key: &str, t: Tensor) -> &mut Self {
        self.init.push((key.into(), t));
        self
    }

    /// Write the bundle into `dir` (created if needed). Every file is written
    /// atomically; the manifest last, so a bundle is complete once it exists.
    pub fn write(&self, dir: &Path) -> Result<Manifest> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating bundle directory {}", dir.display()))?;
        for (e, bytes, data) in &self.graphs {
            if let (Some(f), Some(d)) = (&e.data, data) {
                write_atomic(&dir.join(&f.file), d)?;
            }
            write_atomic(&dir.join(&e.file), bytes)?;
        }
        let init = if self.init.is_empty() {
            None
        } else {
            let bytes = write_safetensors(&self.init)?;
            write_atomic(&dir.join(INIT_FILE), &bytes)?;
            Some(FileEntry {
                file: INIT_FILE.into(),
                sha256: sha256_hex(&bytes),
            })
        };
        let m = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            metac_version: env!("CARGO_PKG_VERSION").into(),
            onnx_opset: metac_graphs::onnx::OPSET,
            kind: self.kind.clone(),
            graphs: self.graphs.iter().map(|(e, _, _)| e.clone()).collect(),
            state: self.state.clone(),
            init,
            meta: self.meta.clone(),
        };
        m.check_consistent()?;
        let json = serde_json::to_string_pretty(&m)? + "\n";
        write_atomic(&dir.join(MANIFEST), json.as_bytes())?;
        Ok(m)
    }
}

/// Node count per op type of an ONNX model.
pub fn op_counts(m: &pb::ModelProto) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for n in m.graph.iter().flat_map(|g| &g.node) {
        *c.entry(n.op_type.clone()).or_insert(0) += 1;
    }
    c
}

/// Serialise named tensors as safetensors (deterministic: sorted by name).
pub fn write_safetensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = sorted
        .iter()
        .map(|(n, t)| {
            let (dt, bytes) = match &t.data {
                TensorData::F32(v) => {
                    (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
                TensorData::I64(v) => {
                    (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
                }
                TensorData::Bool(v) => (Dtype::BOOL, v.iter().map(|&b| b as u8).collect()),
            };
            (n.clone(), dt, t.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, dt, s, b)| Ok((n.clone(), TensorView::new(*dt, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Read all tensors of a safetensors file.
pub fn read_safetensors(bytes: &[u8], what: &str) -> Result<BTreeMap<String, Tensor>> {
    use safetensors::tensor::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{what}: not a safetensors file"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let shape = view.shape().to_vec();
        let t = match view.dtype() {
            Dtype::F32 => Tensor::f32(
                &shape,
                d.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::I64 => Tensor::i64(
                &shape,
                d.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::BOOL => Tensor::bool(&shape, d.iter().map(|&b| b != 0).collect()),
            other => bail!("{what}: tensor '{name}' has unsupported dtype {other:?}"),
        };
        out.insert(name, t);
    }
    Ok(out)
}

impl Manifest {
    pub fn graph(&self, name: &str) -> Option<&GraphEntry> {
        self.graphs.iter().find(|g| g.name == name)
    }

    /// Internal consistency: state buffers refer to existing graph ports of
    /// the right type.
    pub fn check_consistent(&self) -> Result<()> {
        for s in &self.state {
            for p in s.reads.iter().chain(s.updated_by.iter()) {
                let g = self.graph(&p.graph).with_context(|| {
                    format!(
                        "state buffer '{}' refers to unknown graph '{}'",
                        s.name, p.graph
                    )
                })?;
                let is_read = s.reads.contains(p);
                let list = if is_read { &g.inputs } else { &g.outputs };
                let t = list.iter().find(|t| t.name == p.tensor).with_context(|| {
                    format!(
                        "state buffer '{}': graph '{}' has no {} '{}'",
                        s.name,
                        p.graph,
                        if is_read { "input" } else { "output" },
                        p.tensor
                    )
                })?;
                ensure!(
                    t.dtype == s.dtype && t.shape == s.shape,
                    "state buffer '{}' is {}{:?} but {}.{} is {}{:?}",
                    s.name,
                    s.dtype,
                    s.shape,
                    p.graph,
                    p.tensor,
                    t.dtype,
                    t.shape
                );
            }
        }
        Ok(())
    }
}

/// A loaded, verified bundle.
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub init: BTreeMap<String, Tensor>,
}

impl Bundle {
    /// The SHA-256 of the manifest: the bundle's identity (what a run's
    /// checkpoint belongs to).
    pub fn manifest_sha256(&self) -> Result<String> {
        let p = self.dir.join(MANIFEST);
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(sha256_hex(&bytes))
    }

    /// Load and verify a bundle: format and version, file hashes, and that
    /// every ONNX file declares exactly the inputs and outputs the manifest
    /// lists.
    pub fn load(dir: &Path) -> Result<Bundle> {
        let mpath = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath).with_context(|| {
            format!(
                "{}: cannot read bundle manifest (is {} a metac bundle?)",
                mpath.display(),
                dir.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed manifest", mpath.display()))?;
        ensure!(
            manifest.format == FORMAT,
            "{}: format is '{}', expected '{FORMAT}'",
            mpath.display(),
            manifest.format
        );
        ensure!(
            manifest.format_version == FORMAT_VERSION,
            "{}: bundle format version {} is not supported by this metac (expects {FORMAT_VERSION}); recompile the bundle",
            mpath.display(),
            manifest.format_version
        );
        let ours = env!("CARGO_PKG_VERSION");
        ensure!(
            manifest.metac_version == ours,
            "{}: bundle was compiled by metac {} but this is metac {ours}; recompile the bundle",
            mpath.display(),
            manifest.metac_version
        );
        manifest
            .check_consistent()
            .with_context(|| format!("{}: inconsistent manifest", mpath.display()))?;
        for g in &manifest.graphs {
            let p = dir.join(&g.file);
            let bytes = std::fs::read(&p)
                .with_context(|| format!("{}: cannot read graph file", p.display()))?;
            let h = sha256_hex(&bytes);
            ensure!(
                h == g.sha256,
                "{}: content hash {h} does not match the manifest ({}); the bundle was modified after compilation",
                p.display(),
                g.sha256
            );
            if let Some(f) = &g.data {
                let dp = dir.join(&f.file);
                let data = std::fs::read(&dp).with_context(|| {
                    format!(
                        "{}: cannot read the external data of graph '{}'",
                        dp.display(),
                        g.name
                    )
                })?;
                ensure!(
                    sha256_hex(&data) == f.sha256,
                    "{}: content hash does not match the manifest; the bundle was modified after compilation",
                    dp.display()
                );
            }
            let m = pb::ModelProto::decode(bytes.as_slice())
                .with_context(|| format!("{}: not an ONNX model", p.display()))?;
            check_io(&m, g)
                .with_context(|| format!("{}: does not match the manifest", p.display()))?;
        }
        let init = match &manifest.init {
            None => BTreeMap::new(),
            Some(f) => {
                let p = dir.join(&f.file);
                let bytes =
                    std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
                ensure!(
                    sha256_hex(&bytes) == f.sha256,
                    "{}: content hash does not match the manifest; the bundle was modified after compilation",
                    p.display()
                );
                read_safetensors(&bytes, &p.display().to_string())?
            }
        };
        for s in &manifest.state {
            if let Some(k) = &s.init {
                let t = init.get(k).with_context(|| {
                    format!(
                        "{}: state buffer '{}' has no initial value '{k}'",
                        dir.display(),
                        s.name
                    )
                })?;
                ensure!(
                    t.shape == s.shape && t.dtype().name() == s.dtype,
                    "{}: initial value '{k}' is {}{:?}, state buffer '{}' is {}{:?}",
                    dir.display(),
                    t.dtype(),
                    t.shape,
                    s.name,
                    s.dtype,
                    s.shape
                );
            }
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
            init,
        })
    }

    pub fn graph_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let g = self
            .manifest
            .graph(name)
            .with_context(|| format!("bundle has no graph '{name}'"))?;
        let bytes = std::fs::read(self.dir.join(&g.file))?;
        if g.data.is_none() {
            return Ok(bytes);
        }
        // One self-contained model, as long as it fits a protobuf message.
        let mut m = pb::ModelProto::decode(bytes.as_slice())?;
        metac_graphs::onnx::inline_external_data(&mut m, Some(&self.dir))
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.dir.join(&g.file).display()))?;
        ensure!(
            m.encoded_len() <= metac_graphs::onnx::PROTOBUF_LIMIT,
            "{}: graph '{name}' with its external data is {} bytes, past protobuf's 2 GiB limit; \
             run it from its file with ONNX Runtime, which reads the external data itself",
            self.dir.join(&g.file).display(),
            m.encoded_len()
        );
        Ok(m.encode_to_vec())
    }
}

fn io_specs(vs: &[pb::ValueInfoProto]) -> Vec<TensorSpec> {
    vs.iter()
        .map(|v| {
            let (dtype, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(pb::type_proto::Value::TensorType(t)) => (
                    match t.elem_type {
                        1 => "f32",
                        7 => "i64",
                        9 => "bool",
                        _ => "other",
                    },
                    t.shape
                        .as_ref()
                        .map(|s| {
                            s.dim
                                .iter()
                                .map(|d| match d.value {
                                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(x)) => {
                                        x as usize
                                    }
                                    _ => usize::MAX,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                ),
                _ => ("other", vec![]),
            };
            TensorSpec {
                name: v.name.clone(),
                dtype: dtype.into(),
                shape,
            }
        })
        .collect()
}

fn check_io(m: &pb::ModelProto, e: &GraphEntry) -> Result<()> {
    let g = m.graph.as_ref().context("model has no graph")?;
    let ins = io_specs(&g.input);
    let outs = io_specs(&g.output);
    ensure!(
        ins == e.inputs,
        "inputs {:?} differ from the manifest's {:?}",
        ins,
        e.inputs
    );
    ensure!(
        outs == e.outputs,
        "outputs {:?} differ from the manifest's {:?}",
        outs,
        e.outputs
    );
    Ok(())
}
