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
//! Both become [`TextEdit`]s. A malformed record is an error naming the file,
//! the record's index and the key.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

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
}

/// Read the edits of `path` in `format`.
pub fn load_edits(path: &Path, format: EditFormat) -> Result<Vec<TextEdit>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    parse_edits(&text, format).with_context(|| format!("{}", path.display()))
}

/// [`load_edits`] of a file's text.
pub fn parse_edits(text: &str, format: EditFormat) -> Result<Vec<TextEdit>> {
    let v: Value = serde_json::from_str(text).context("not JSON")?;
    let records = v.as_array().context("expected a JSON array of records")?;
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            match format {
                EditFormat::Zsre => zsre(r),
                EditFormat::CounterFact => counterfact(r),
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
}
