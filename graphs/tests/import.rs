//! ONNX import: the PyTorch-exported fixtures in `tests/fixtures/onnx/`
//! reproduce torch's float64 loss, gradient and both HVPs (raw and optimised
//! graphs); an export/import round trip preserves evaluations; single-op
//! models check the composite lowerings; bad models give clear errors.

use std::collections::HashMap;

use metac_graphs::autodiff::{grad, hvp_forward_over_reverse, hvp_reverse_over_reverse};
use metac_graphs::eval::{eval_graph, Value};
use metac_graphs::onnx::pb::{
    self, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use metac_graphs::onnx::{export_bytes, import_bytes, import_file, ImportError, ImportedModel};
use metac_graphs::passes::optimize;
use metac_graphs::{DType, Graph, NodeId, Tensor};
use ndarray::{ArrayD, IxDyn};
use prost::Message;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/onnx/");

// ---- a small JSON reader for the reference files ------------------------------

#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn at(&self, key: &str) -> &Json {
        self.get(key).unwrap_or_else(|| panic!("missing key '{key}'"))
    }
    fn num(&self) -> f64 {
        match self {
            Json::Num(x) => *x,
            other => panic!("expected a number, got {other:?}"),
        }
    }
    fn nums(&self) -> Vec<f64> {
        match self {
            Json::Arr(v) => v.iter().map(Json::num).collect(),
            other => panic!("expected an array, got {other:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }
    fn entries(&self) -> &[(String, Json)] {
        match self {
            Json::Obj(kv) => kv,
            other => panic!("expected an object, got {other:?}"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn parse(text: &str) -> Json {
        let mut p = Parser { s: text.as_bytes(), i: 0 };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing characters in JSON");
        v
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(self.s.get(self.i), Some(&c), "JSON: expected '{}' at byte {}", c as char, self.i);
        self.i += 1;
    }
    fn peek(&mut self) -> u8 {
        self.ws();
        *self.s.get(self.i).expect("JSON: unexpected end")
    }
    fn value(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.eat(b'{');
                let mut kv = vec![];
                if self.peek() != b'}' {
                    loop {
                        let k = self.string();
                        self.eat(b':');
                        kv.push((k, self.value()));
                        if self.peek() == b',' {
                            self.eat(b',');
                        } else {
                            break;
                        }
                    }
                }
                self.eat(b'}');
                Json::Obj(kv)
            }
            b'[' => {
                self.eat(b'[');
                let mut v = vec![];
                if self.peek() != b']' {
                    loop {
                        v.push(self.value());
                        if self.peek() == b',' {
                            self.eat(b',');
                        } else {
                            break;
                        }
                    }
                }
                self.eat(b']');
                Json::Arr(v)
            }
            b'"' => Json::Str(self.string()),
            b't' | b'f' | b'n' => {
                for (word, v) in [("true", Json::Bool(true)), ("false", Json::Bool(false)), ("null", Json::Null)] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return v;
                    }
                }
                panic!("JSON: bad literal at byte {}", self.i)
            }
            _ => {
                let start = self.i;
                while self.i < self.s.len() && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                Json::Num(t.parse().unwrap_or_else(|_| panic!("JSON: bad number '{t}'")))
            }
        }
    }
    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = String::new();
        loop {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => return out,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    match e {
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'r' => out.push('\r'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'u' => {
                            let h = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                            self.i += 4;
                            out.push(char::from_u32(u32::from_str_radix(h, 16).unwrap()).unwrap_or('\u{fffd}'));
                        }
                        other => out.push(other as char),
                    }
                }
                _ => {
                    // Copy a whole UTF-8 sequence.
                    let start = self.i - 1;
                    while self.i < self.s.len() && (self.s[self.i] & 0xC0) == 0x80 {
                        self.i += 1;
                    }
                    out.push_str(std::str::from_utf8(&self.s[start..self.i]).unwrap());
                }
            }
        }
    }
}

#[test]
fn json_reader() {
    let j = Parser::parse(r#" {"a": [1, -2.5e-3, 3E2], "b": {"c": "x\"y\u0041"}, "d": [], "e": true, "f": null} "#);
    assert_eq!(j.at("a").nums(), vec![1.0, -2.5e-3, 300.0]);
    assert_eq!(j.at("b").at("c").str(), "x\"yA");
    assert!(matches!(j.at("e"), Json::Bool(true)));
    assert!(matches!(j.at("f"), Json::Null));
    assert!(matches!(j.at("d"), Json::Arr(v) if v.is_empty()));
}

// ---- helpers --------------------------------------------------------------------

fn fvalue(shape: &[usize], data: Vec<f64>) -> Value {
    Value::F(ArrayD::from_shape_vec(IxDyn(shape), data).unwrap())
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::F(a) => a.iter().copied().collect(),
        Value::I(a) => a.iter().map(|&x| x as f64).collect(),
        Value::B(a) => a.iter().map(|&x| x as u8 as f64).collect(),
    }
}

/// Max |got - want| relative to max |want| (with an absolute floor).
fn rel_err(got: &[f64], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(floor);
    got.iter().zip(want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn outputs_by_name(g: &Graph, feeds: &HashMap<String, Value>) -> HashMap<String, Value> {
    eval_graph(g, feeds).expect("evaluation").into_iter().collect()
}

/// The reference's data inputs as interpreter values (x as float32, y int64).
fn ref_inputs(r: &Json) -> HashMap<String, Value> {
    let mut m = HashMap::new();
    for (name, t) in r.at("inputs").entries() {
        let shape: Vec<usize> = t.at("shape").nums().iter().map(|&d| d as usize).collect();
        let data = t.at("data").nums();
        let v = match t.at("dtype").str() {
            "float32" => fvalue(&shape, data.iter().map(|&x| x as f32 as f64).collect()),
            "int64" => Value::I(ArrayD::from_shape_vec(IxDyn(&shape), data.iter().map(|&x| x as i64).collect()).unwrap()),
            other => panic!("dtype {other}"),
        };
        m.insert(name.clone(), v);
    }
    m
}

/// A fixture's loss, gradient and HVP graph: the imported model plus one
/// `v:<param>` input per parameter and outputs `grad:<p>`, `hvp_fr:<p>`,
/// `hvp_rr:<p>`.
fn derivative_graph(model: &ImportedModel, optimize_first: bool) -> Graph {
    let mut g = if optimize_first { optimize(&model.graph) } else { model.graph.clone() };
    let loss = g.find_output("loss").expect("loss output");
    let params: Vec<NodeId> = model
        .initializers
        .iter()
        .map(|(n, _)| g.find_input(n).expect("parameter input"))
        .collect();
    let vs: Vec<NodeId> = model
        .initializers
        .iter()
        .map(|(n, t)| g.input(&format!("v:{n}"), DType::F32, &t.shape))
        .collect();
    let gr = grad(&mut g, loss, &params);
    let fr = hvp_forward_over_reverse(&mut g, loss, &params, &vs);
    let rr = hvp_reverse_over_reverse(&mut g, loss, &params, &vs);
    for (i, (n, _)) in model.initializers.iter().enumerate() {
        g.output(&format!("grad:{n}"), gr[i]);
        g.output(&format!("hvp_fr:{n}"), fr[i]);
        g.output(&format!("hvp_rr:{n}"), rr[i]);
    }
    g
}

fn fixture_feeds(model: &ImportedModel, r: &Json) -> HashMap<String, Value> {
    let mut feeds = ref_inputs(r);
    for (n, t) in &model.initializers {
        feeds.insert(n.clone(), Value::from_tensor(t));
        let v = r.at("v").at(n).nums();
        feeds.insert(format!("v:{n}"), fvalue(&t.shape, v));
    }
    feeds
}

/// Import a fixture, check loss, gradient and HVPs against torch; returns
/// (loss rel error, max grad rel error, max HVP rel error) over both graphs.
fn check_fixture(name: &str) -> (f64, f64, f64) {
    let path = format!("{FIXTURES}{name}.onnx");
    let r = Parser::parse(&std::fs::read_to_string(format!("{FIXTURES}{name}.ref.json")).unwrap());
    let model = import_file(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.data_inputs, vec!["x".to_string(), "y".to_string()]);
    assert_eq!(model.opset, r.at("opset").num() as i64);
    // The parameters are the float initializers, with torch's values.
    let ref_params = r.at("params").entries();
    assert_eq!(model.initializers.len(), ref_params.len(), "{name}: parameter count");
    for (n, t) in &model.initializers {
        let want = r.at("params").at(n);
        let shape: Vec<usize> = want.at("shape").nums().iter().map(|&d| d as usize).collect();
        assert_eq!(t.shape, shape, "{name}: shape of {n}");
        // 9 significant digits: exact once read as float32.
        let want: Vec<f32> = want.at("data").nums().iter().map(|&x| x as f32).collect();
        assert!(t.as_f32().unwrap() == want.as_slice(), "{name}: value of {n}");
    }
    let want_loss = r.at("loss").num();
    let feeds = fixture_feeds(&model, &r);
    let (mut e_loss, mut e_grad, mut e_hvp) = (0.0f64, 0.0f64, 0.0f64);
    for optimized in [false, true] {
        let g = derivative_graph(&model, optimized);
        let g = if optimized { optimize(&g) } else { g };
        let out = outputs_by_name(&g, &feeds);
        let loss = flat(&out["loss"])[0];
        let el = ((loss - want_loss) / want_loss).abs();
        assert!(el < 1e-5, "{name} (optimized={optimized}): loss {loss} vs torch {want_loss}");
        e_loss = e_loss.max(el);
        for (n, _) in &model.initializers {
            let check = |what: &str, key: &str| -> f64 {
                let want = r.at(key).at(n).nums();
                let got = flat(&out[&format!("{what}:{n}")]);
                // Relative to the block's scale, with a floor for blocks
                // that are analytically zero (k.bias in the transformer).
                let e = rel_err(&got, &want, 1e-2);
                assert!(e < 1e-4, "{name} (optimized={optimized}): {what} of {n}: rel err {e:.3e}");
                e
            };
            e_grad = e_grad.max(check("grad", "grad"));
            e_hvp = e_hvp.max(check("hvp_fr", "hvp")).max(check("hvp_rr", "hvp"));
        }
    }
    (e_loss, e_grad, e_hvp)
}

#[test]
fn fixtures_match_torch() {
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let f = p.file_name()?.to_str()?.to_string();
            let stem = f.strip_suffix(".onnx")?.to_string();
            let has_loss = std::fs::read_to_string(format!("{FIXTURES}{stem}.ref.json"))
                .map(|s| s.contains("\"loss\""))
                .unwrap_or(false);
            (has_loss && (stem.ends_with("_opset18") || stem.ends_with("_opset20"))).then_some(stem)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "fixtures found: {names:?}");
    for n in &names {
        let (l, g, h) = check_fixture(n);
        println!("{n}: loss rel err {l:.2e}, grad {g:.2e}, hvp {h:.2e}");
    }
}

#[test]
fn logits_fixture_imports() {
    let model = import_file(std::path::Path::new(&format!("{FIXTURES}mlp_logits_opset18.onnx"))).unwrap();
    let r = Parser::parse(&std::fs::read_to_string(format!("{FIXTURES}mlp_logits_opset18.ref.json")).unwrap());
    assert_eq!(model.data_inputs, vec!["x".to_string()]);
    let out = model.graph.find_output("logits").unwrap();
    assert_eq!(model.graph.shape(out), &[8, 10]);
    if let Some(want) = r.get("logits") {
        let mut feeds = ref_inputs(&r);
        for (n, t) in &model.initializers {
            feeds.insert(n.clone(), Value::from_tensor(t));
        }
        let got = outputs_by_name(&model.graph, &feeds);
        let want = match want {
            Json::Obj(_) => want.at("data").nums(),
            _ => want.nums(),
        };
        let e = rel_err(&flat(&got["logits"]), &want, 1e-6);
        assert!(e < 1e-5, "logits rel err {e}");
    }
}

#[test]
fn scratch_op_cases() {
    let Ok(dir) = std::env::var("METAC_OP_CASES") else { return };
    let cases = Parser::parse(&std::fs::read_to_string(format!("{dir}/cases.json")).unwrap());
    let Json::Arr(cases) = cases else { panic!() };
    let mut failures = vec![];
    for c in &cases {
        let name = c.at("name").str();
        let model = match import_file(std::path::Path::new(&format!("{dir}/{name}.onnx"))) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{name}: import error: {e}"));
                continue;
            }
        };
        let mut feeds = HashMap::new();
        for (n, t) in c.at("inputs").entries() {
            let shape: Vec<usize> = t.at("shape").nums().iter().map(|&d| d as usize).collect();
            let data = t.at("data").nums();
            let v = match t.at("dtype").str() {
                "float32" => fvalue(&shape, data),
                "int64" => Value::I(ArrayD::from_shape_vec(IxDyn(&shape), data.iter().map(|&x| x as i64).collect()).unwrap()),
                "bool" => Value::B(ArrayD::from_shape_vec(IxDyn(&shape), data.iter().map(|&x| x != 0.0).collect()).unwrap()),
                d => panic!("{d}"),
            };
            feeds.insert(n.clone(), v);
        }
        for (n, t) in &model.initializers {
            feeds.insert(n.clone(), Value::from_tensor(t));
        }
        for g in [model.graph.clone(), optimize(&model.graph)] {
            let out = match eval_graph(&g, &feeds) {
                Ok(o) => o.into_iter().collect::<HashMap<_, _>>(),
                Err(e) => {
                    failures.push(format!("{name}: eval error {e}"));
                    break;
                }
            };
            for (n, want) in c.at("outputs").entries() {
                let shape: Vec<usize> = want.at("shape").nums().iter().map(|&d| d as usize).collect();
                let got = &out[n];
                if got.shape() != shape.as_slice() {
                    failures.push(format!("{name}: output {n} shape {:?} vs {:?}", got.shape(), shape));
                    continue;
                }
                let wd = want.at("dtype").str();
                let dt_ok = matches!((got, wd), (Value::F(_), "float32") | (Value::I(_), "int64") | (Value::B(_), "bool"));
                if !dt_ok {
                    failures.push(format!("{name}: output {n} dtype {wd} vs {:?}", std::mem::discriminant(got)));
                }
                let w = want.at("data").nums();
                let gv = flat(got);
                let bad = gv.iter().zip(&w).any(|(a, b)| (a - b).abs() > 1e-5 * b.abs().max(1.0));
                if bad {
                    failures.push(format!("{name}: output {n} values\n got {gv:?}\n want {w:?}"));
                }
            }
        }
    }
    println!("{} cases, {} failures", cases.len(), failures.len());
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(failures.is_empty());
}
