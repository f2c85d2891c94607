//! The table of optimizer summaries that `metac eval` and `metac compare` print.

use metac_runtime::metatest::{OptimizerSummary, Stat};

fn fmt_stat(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!("{:.4} ± {:.4}", s.mean, s.std),
        None => "n/a".into(),
    }
}

fn fmt_acc(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!("{:.2}% ± {:.2}", 100.0 * s.mean, 100.0 * s.std),
        None => "n/a".into(),
    }
}

/// The table printed at the end; `split` names the split of the evaluation
/// (None for data-free problems). The accuracy column is left out when no
/// optimizer has one (problems that are not classifiers).
pub fn table(summary: &[OptimizerSummary], split: Option<&str>) -> String {
    let eval = |what: &str| match split {
        Some(s) => format!("{s} {what}"),
        None => format!("{what} at end"),
    };
    let with_acc = summary.iter().any(|o| o.eval_accuracy.is_some());
    let mut head = vec![
        "optimizer".to_string(),
        "final loss".into(),
        "loss@1000".into(),
        eval("loss"),
    ];
    if with_acc {
        head.push(eval("accuracy"));
    }
    head.push("diverged".into());
    let rows: Vec<Vec<String>> = summary
        .iter()
        .map(|o| {
            let mut r = vec![
                o.optimizer.clone(),
                fmt_stat(&o.final_loss),
                fmt_stat(&o.loss_at_1000),
                fmt_stat(&o.eval_loss),
            ];
            if with_acc {
                r.push(fmt_acc(&o.eval_accuracy));
            }
            r.push(if o.diverged_at.is_empty() {
                format!("{}/{}", o.diverged, o.seeds.len())
            } else {
                let steps: Vec<String> = o.diverged_at.iter().map(|t| t.to_string()).collect();
                format!(
                    "{}/{} (step {})",
                    o.diverged,
                    o.seeds.len(),
                    steps.join(", ")
                )
            });
            r
        })
        .collect();
    let mut w = vec![0usize; head.len()];
    for r in rows.iter().chain(std::iter::once(&head)) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| -> String {
        let mut s = String::new();
        for (i, c) in r.iter().enumerate() {
            let pad = " ".repeat(w[i] - c.chars().count());
            if i == 0 {
                s.push_str(c);
                s.push_str(&pad);
            } else {
                s.push_str("  ");
                s.push_str(&pad);
                s.push_str(c);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(&head);
    for r in &rows {
        s.push_str(&line(r));
    }
    s
}
