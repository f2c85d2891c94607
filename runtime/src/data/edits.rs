//! Loaders for the public model-editing benchmarks' JSON formats, for users
//! who have the files (they cannot be downloaded here; the fact world of
//! [`super::facts`] stands in for them in the project's own runs):
//!
//! * **zsRE** as MEND and MALMEN ship it (`zsre_mend_train.json`,
//!   `zsre_mend_eval.json`): a JSON array of records with `src` (the edit
//!   prompt), `alt` (the new answer), `answers` (the true answers),
//!   `rephrase` (an equivalent prompt), `loc` and `loc_ans` (an unrelated
//!   question and its answer) and `subject`;
//! * **CounterFact** as ROME ships it (`counterfact.json`): a JSON array of
//!   records with `requested_rewrite` (`prompt` with `{}` for the subject,
//!   `subject`, `target_new.str`, `target_true.str`), `paraphrase_prompts`
//!   and `neighborhood_prompts` (whose answer is the true target).
//!
//! * **JSON lines**, metac's own format (what `metac edit --facts` reads and
//!   `metac facts` writes): one edit per line,
//!   `{"prompt": "...", "target": "...", "equivalent": ["..."],
//!   "unrelated": [{"prompt": "...", "answer": "..."}]}`, with optional
//!   `subject` and `target_true`; blank lines are skipped.
//!
//! All become [`TextEdit`]s. A malformed record is an error naming the file,
//! the record's index (JSON lines: its line number) and the key.
//! [`TextEdit::encode`] turns one into an [`EditRequest`] for a word-level
//! vocabulary.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::facts::{EditRequest, Prompt, Vocab};

/// One edit request in text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextEdit {
    pub subject: String,
    /// The prompt whose answer is edited.
    pub prompt: String,
    pub target_new: String,
    /// The answer before the edit, where the format gives one.
    pub target_true: Option<String>,
    /// Prompts that should give `target_new` after the edit.
    pub equivalent: Vec<String>,
    /// Prompts and answers the edit should not change.
    pub unrelated: Vec<(String, String)>,
}

/// Which benchmark format a file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditFormat {
    Zsre,
    CounterFact,
    Jsonl,
}

/// Read the edits of `path` in `format`.
pub fn load_edits(path: &Path, format: EditFormat) -> Result<Vec<TextEdit>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    parse_edits(&text, format).with_context(|| format!("{}", path.display()))
}

/// [`load_edits`] of a file's text.
pub fn parse_edits(text: &str, format: EditFormat) -> Result<Vec<TextEdit>> {
    if format == EditFormat::Jsonl {
        return parse_jsonl(text);
    }
    let v: Value = serde_json::from_str(text).context("not JSON")?;
    let records = v.as_array().context("expected a JSON array of records")?;
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            match format {
                EditFormat::Zsre => zsre(r),
                EditFormat::CounterFact => counterfact(r),
                EditFormat::Jsonl => unreachable!("parsed by lines"),
            }
            .with_context(|| format!("record {i}"))
        })
        .collect()
}

fn field<'a>(r: &'a Value, key: &str) -> Result<&'a Value> {
    r.get(key).with_context(|| format!("missing key '{key}'"))
}

fn string(r: &Value, key: &str) -> Result<String> {
    let v = field(r, key)?;
    let s = v
        .as_str()
        .with_context(|| format!("key '{key}' must be a string, got {v}"))?;
    ensure!(!s.trim().is_empty(), "key '{key}' is empty");
    Ok(s.to_string())
}

fn strings(r: &Value, key: &str) -> Result<Vec<String>> {
    let v = field(r, key)?;
    let a = v
        .as_array()
        .with_context(|| format!("key '{key}' must be an array of strings"))?;
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_str()
                .map(String::from)
                .with_context(|| format!("key '{key}'[{i}] must be a string, got {x}"))
        })
        .collect()
}

/// JSON lines: errors name the line (from 1).
fn parse_jsonl(text: &str) -> Result<Vec<TextEdit>> {
    let mut v = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e = serde_json::from_str::<Value>(line)
            .context("not a JSON object")
            .and_then(|r| jsonl(&r))
            .with_context(|| format!("line {}", i + 1))?;
        v.push(e);
    }
    ensure!(!v.is_empty(), "no edits (one JSON object per line)");
    Ok(v)
}

fn jsonl(r: &Value) -> Result<TextEdit> {
    let obj = r.as_object().context("expected a JSON object")?;
    const KEYS: [&str; 6] = [
        "prompt",
        "target",
        "equivalent",
        "unrelated",
        "subject",
        "target_true",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        bail!("unknown key '{k}' (known: {})", KEYS.join(", "));
    }
    let optional =
        |key: &str| -> Result<Option<String>> { r.get(key).map(|_| string(r, key)).transpose() };
    let unrelated = match r.get("unrelated") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, u)| {
                (|| -> Result<(String, String)> {
                    Ok((string(u, "prompt")?, string(u, "answer")?))
                })()
                .with_context(|| format!("in 'unrelated'[{i}]"))
            })
            .collect::<Result<_>>()?,
        Some(x) => {
            bail!("key 'unrelated' must be an array of {{\"prompt\", \"answer\"}} objects, got {x}")
        }
    };
    Ok(TextEdit {
        prompt: string(r, "prompt")?,
        target_new: string(r, "target")?,
        subject: optional("subject")?.unwrap_or_default(),
        target_true: optional("target_true")?,
        equivalent: match r.get("equivalent") {
            None => vec![],
            Some(_) => strings(r, "equivalent")?,
        },
        unrelated,
    })
}

impl TextEdit {
    /// This edit as one line of metac's JSON-lines format.
    pub fn to_jsonl(&self) -> String {
        let mut v = json!({
            "prompt": self.prompt,
            "target": self.target_new,
            "equivalent": self.equivalent,
            "unrelated": self.unrelated.iter()
                .map(|(p, a)| json!({"prompt": p, "answer": a}))
                .collect::<Vec<_>>(),
        });
        if !self.subject.is_empty() {
            v["subject"] = json!(self.subject);
        }
        if let Some(t) = &self.target_true {
            v["target_true"] = json!(t);
        }
        v.to_string()
    }

    /// The request of a word-level LM with `vocab` whose graphs read
    /// prompts of at most `max_len` words: every prompt a known word
    /// sequence that fits, every answer one known word.
    pub fn encode(&self, vocab: &Vocab, max_len: usize) -> Result<EditRequest> {
        let prompt = |text: &str, answer: &str, what: &str| -> Result<Prompt> {
            let tokens = vocab
                .encode(text)
                .with_context(|| format!("{what} {text:?}"))?;
            ensure!(!tokens.is_empty(), "{what} is empty");
            ensure!(
                tokens.len() <= max_len,
                "{what} {text:?} has {} words; the model reads at most {max_len}",
                tokens.len()
            );
            let words: Vec<&str> = answer.split_whitespace().collect();
            ensure!(
                words.len() == 1,
                "the answer {answer:?} to {what} {text:?} is {} words; the model answers with one",
                words.len()
            );
            let answer = vocab.id(words[0]).with_context(|| {
                format!("the answer to {what} {text:?}: unknown word '{}'", words[0])
            })?;
            Ok(Prompt { tokens, answer })
        };
        Ok(EditRequest {
            fact: None,
            edit: prompt(&self.prompt, &self.target_new, "prompt")?,
            equivalent: self
                .equivalent
                .iter()
                .map(|p| prompt(p, &self.target_new, "equivalent prompt"))
                .collect::<Result<_>>()?,
            unrelated: self
                .unrelated
                .iter()
                .map(|(p, a)| prompt(p, a, "unrelated prompt"))
                .collect::<Result<_>>()?,
        })
    }

    /// An [`EditRequest`] in words (the inverse of [`TextEdit::encode`]).
    pub fn decode(r: &EditRequest, vocab: &Vocab) -> TextEdit {
        let word = |t: u32| vocab.decode(&[t]);
        TextEdit {
            subject: String::new(),
            prompt: vocab.decode(&r.edit.tokens),
            target_new: word(r.edit.answer),
            target_true: None,
            equivalent: r
                .equivalent
                .iter()
                .map(|p| vocab.decode(&p.tokens))
                .collect(),
            unrelated: r
                .unrelated
                .iter()
                .map(|p| (vocab.decode(&p.tokens), word(p.answer)))
                .collect(),
        }
    }
}

/// The edits of `path`, encoded for `vocab` and prompts of at most
/// `max_len` words; errors name the file and the record (JSON lines: the
/// line).
pub fn load_requests(
    path: &Path,
    format: EditFormat,
    vocab: &Vocab,
    max_len: usize,
) -> Result<Vec<EditRequest>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let edits = parse_edits(&text, format).with_context(|| format!("{}", path.display()))?;
    // Line numbers of the records, for JSON lines.
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, _)| i + 1)
        .collect();
    edits
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.encode(vocab, max_len).with_context(|| match format {
                EditFormat::Jsonl => format!("{}: line {}", path.display(), lines[i]),
                _ => format!("{}: record {i}", path.display()),
            })
        })
        .collect()
}

fn zsre(r: &Value) -> Result<TextEdit> {
    let answers = strings(r, "answers")?;
    Ok(TextEdit {
        subject: string(r, "subject")?,
        prompt: string(r, "src")?,
        target_new: string(r, "alt")?,
        target_true: answers.into_iter().next(),
        equivalent: vec![string(r, "rephrase")?],
        unrelated: vec![(string(r, "loc")?, string(r, "loc_ans")?)],
    })
}

fn counterfact(r: &Value) -> Result<TextEdit> {
    let rw = field(r, "requested_rewrite")?;
    let inner = |key: &str| -> Result<String> {
        string(field(rw, key)?, "str").with_context(|| format!("in 'requested_rewrite.{key}'"))
    };
    let subject = string(rw, "subject").context("in 'requested_rewrite'")?;
    let template = string(rw, "prompt").context("in 'requested_rewrite'")?;
    if !template.contains("{}") {
        bail!("'requested_rewrite.prompt' has no '{{}}' for the subject: {template:?}");
    }
    let target_true = inner("target_true")?;
    Ok(TextEdit {
        prompt: template.replacen("{}", &subject, 1),
        subject,
        target_new: inner("target_new")?,
        equivalent: strings(r, "paraphrase_prompts")?,
        unrelated: strings(r, "neighborhood_prompts")?
            .into_iter()
            .map(|p| (p, target_true.clone()))
            .collect(),
        target_true: Some(target_true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZSRE: &str = r#"[
      {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
       "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
       "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
       "loc": "nq question: who played desmond doss father in hacksaw ridge",
       "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || x"}
    ]"#;

    const COUNTERFACT: &str = r#"[
      {"case_id": 0, "pararel_idx": 2796,
       "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
         "target_new": {"str": "English", "id": "Q1860"},
         "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
       "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
       "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is", "Raymond Barre is a native speaker of"],
       "attribute_prompts": [], "generation_prompts": []}
    ]"#;

    #[test]
    fn zsre_records_become_edits() {
        let e = parse_edits(ZSRE, EditFormat::Zsre).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].prompt, "What university did Watts Humphrey attend?");
        assert_eq!(e[0].target_new, "University of Michigan");
        assert_eq!(
            e[0].target_true.as_deref(),
            Some("Illinois Institute of Technology")
        );
        assert_eq!(e[0].equivalent.len(), 1);
        assert_eq!(e[0].unrelated[0].1, "Hugo Weaving");
    }

    #[test]
    fn counterfact_records_become_edits() {
        let e = parse_edits(COUNTERFACT, EditFormat::CounterFact).unwrap();
        assert_eq!(e[0].prompt, "The mother tongue of Danielle Darrieux is");
        assert_eq!(e[0].target_new, "English");
        assert_eq!(e[0].target_true.as_deref(), Some("French"));
        assert_eq!(e[0].equivalent.len(), 1);
        assert_eq!(e[0].unrelated.len(), 2);
        assert!(e[0].unrelated.iter().all(|(_, a)| a == "French"));
        assert!(e[0].unrelated[0].0.contains("L\u{e9}on Blum"));
    }

    #[test]
    fn malformed_records_name_the_record_and_key() {
        let err = |text: &str, f| format!("{:#}", parse_edits(text, f).unwrap_err());
        let e = err(
            &ZSRE.replace("\"alt\"", "\"alternative\""),
            EditFormat::Zsre,
        );
        assert!(e.contains("record 0") && e.contains("'alt'"), "{e}");
        let e = err(&COUNTERFACT.replace("{} is", "is"), EditFormat::CounterFact);
        assert!(e.contains("record 0") && e.contains("prompt"), "{e}");
        let e = err(
            &COUNTERFACT.replace("\"str\": \"English\"", "\"str\": 3"),
            EditFormat::CounterFact,
        );
        assert!(e.contains("target_new") && e.contains("'str'"), "{e}");
        let e = err("{\"a\": 1}", EditFormat::Zsre);
        assert!(e.contains("array"), "{e}");
        let e = err("[1,", EditFormat::Zsre);
        assert!(e.contains("not JSON"), "{e}");
        // A file: the error names it.
        let dir = std::env::temp_dir().join(format!("metac-edits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("zsre_eval.json");
        std::fs::write(&path, ZSRE.replace("\"src\"", "\"source\"")).unwrap();
        let e = format!("{:#}", load_edits(&path, EditFormat::Zsre).unwrap_err());
        assert!(e.contains("zsre_eval.json") && e.contains("'src'"), "{e}");
        std::fs::write(&path, ZSRE).unwrap();
        assert_eq!(load_edits(&path, EditFormat::Zsre).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn json_lines_round_trip_world_requests() {
        use crate::data::facts::{FactWorld, Split};
        use metac_contract::lm::WorldConfig;
        let w = FactWorld::generate(&WorldConfig {
            subjects: 40,
            ..WorldConfig::default()
        })
        .unwrap();
        let reqs = w.edit_requests(Split::Eval, 5, 2, 3).unwrap();
        let text: String = reqs
            .iter()
            .map(|r| TextEdit::decode(r, &w.vocab).to_jsonl() + "\n")
            .collect();
        // Blank lines are skipped.
        let text = format!("\n{text}\n");
        let back = parse_edits(&text, EditFormat::Jsonl).unwrap();
        assert_eq!(back.len(), 5);
        for (r, e) in reqs.iter().zip(&back) {
            let mut want = r.clone();
            want.fact = None;
            assert_eq!(e.encode(&w.vocab, w.longest_prompt()).unwrap(), want);
        }
    }

    #[test]
    fn bad_json_lines_name_the_line_and_the_word() {
        let vocab = Vocab::from_words("the sky is blue green of".split(' '));
        let good = r#"{"prompt": "the sky is", "target": "green", "equivalent": ["sky of the"], "unrelated": [{"prompt": "the sky", "answer": "is"}]}"#;
        let dir = std::env::temp_dir().join(format!("metac-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("facts.jsonl");
        let err = |lines: &[&str]| -> String {
            std::fs::write(&path, lines.join("\n")).unwrap();
            format!(
                "{:#}",
                load_requests(&path, EditFormat::Jsonl, &vocab, 4).unwrap_err()
            )
        };
        std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
        let ok = load_requests(&path, EditFormat::Jsonl, &vocab, 4).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].edit.answer, vocab.id("green").unwrap());
        assert_eq!(ok[0].unrelated[0].answer, vocab.id("is").unwrap());

        let e = err(&[good, "", "{\"prompt\": \"the sky is\""]);
        assert!(
            e.contains("facts.jsonl") && e.contains("line 3") && e.contains("JSON"),
            "{e}"
        );
        let e = err(&[good, &good.replace("\"target\"", "\"answer\"")]);
        assert!(e.contains("line 2") && e.contains("'answer'"), "{e}");
        let e = err(&[&good.replace("the sky is\"", "the sea is\"")]);
        assert!(
            e.contains("line 1") && e.contains("unknown word 'sea'"),
            "{e}"
        );
        let e = err(&[&good.replace("\"green\"", "\"purple\"")]);
        assert!(
            e.contains("line 1") && e.contains("unknown word 'purple'"),
            "{e}"
        );
        let e = err(&[&good.replace("\"green\"", "\"blue green\"")]);
        assert!(e.contains("2 words") && e.contains("one"), "{e}");
        let e = err(&[
            good,
            good,
            &good.replace("the sky is\"", "the sky is the blue\""),
        ]);
        assert!(
            e.contains("line 3") && e.contains("5 words") && e.contains("at most 4"),
            "{e}"
        );
        let e = err(&[&good.replace("\"answer\": \"is\"", "\"answer\": 3")]);
        assert!(
            e.contains("'unrelated'[0]") && e.contains("'answer'"),
            "{e}"
        );
        let e = err(&["", " "]);
        assert!(e.contains("no edits"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
