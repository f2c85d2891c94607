//! A seeded world of invented facts for model editing (the MALMEN workload),
//! standing in for zsRE and CounterFact, which cannot be downloaded here.
//!
//! * 3,000 invented subjects (half one word, half two words), 10 relations,
//!   each with its own vocabulary of 20-80 invented object words; every
//!   subject has one object per relation (30,000 facts).
//! * Each relation has 6 templates, prompts around the subject after which
//!   the object is the next word: 4 for training and 2 paraphrases. A
//!   language model learns every fact under the training templates and the
//!   paraphrases of three quarters of the subjects; the paraphrases of the
//!   validation and evaluation subjects are held out
//!   ([`FactWorld::pretraining_prompts`], [`FactWorld::heldout_prompts`]).
//! * A word-level tokenizer ([`Vocab`]); every prompt and its answer fit the
//!   context of 16 tokens.
//! * Subject splits: meta-training edits, validation, evaluation edits, and
//!   subjects reserved for unrelated prompts.
//! * An edit request ([`EditRequest`]) is a fact with a new object, its
//!   equivalent prompts (the held-out paraphrases) and unrelated prompts
//!   with their answers.
//!
//! Everything is drawn from ChaCha8 streams of the seed
//! (`metac_contract::init::SeededRng`), so a seed gives the same world on
//! every platform.

use std::collections::{HashMap, HashSet};

use anyhow::{ensure, Context, Result};
use metac_contract::init::SeededRng;

pub use metac_contract::lm::WorldConfig;

/// A prompt form: words before the subject and after it; the object is the
/// word that follows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Template {
    pub before: Vec<String>,
    pub after: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub name: String,
    pub objects: Vec<String>,
    /// The first `train_templates` are for training, the rest held out.
    pub templates: Vec<Template>,
}

/// Which subjects a split holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// Edits for meta-training the editor.
    Train,
    Validation,
    /// Edits for evaluating the editor.
    Eval,
    /// Subjects whose facts are the unrelated prompts of locality.
    Unrelated,
}

/// A tokenized prompt and the token that should follow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub answer: u32,
}

/// Which fact of a [`FactWorld`] an edit request changes, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorldFact {
    pub subject: usize,
    pub relation: usize,
    pub old_object: usize,
    pub new_object: usize,
}

/// An edit: a prompt to be given a new answer, with the prompts that should
/// follow it and those that should not change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditRequest {
    /// The world's fact it edits (requests the world drew; `None` for a
    /// user's).
    pub fact: Option<WorldFact>,
    /// A training template with the new object as the answer.
    pub edit: Prompt,
    /// The held-out paraphrases with the new object.
    pub equivalent: Vec<Prompt>,
    /// Facts of unrelated subjects with their (unchanged) answers.
    pub unrelated: Vec<Prompt>,
}

/// A word-level tokenizer: id 0 is padding, then every word in the order the
/// world introduced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vocab {
    pub words: Vec<String>,
    ids: HashMap<String, u32>,
}

/// The padding token.
pub const PAD: &str = "<pad>";

impl Vocab {
    fn new() -> Self {
        let mut v = Vocab {
            words: vec![],
            ids: HashMap::new(),
        };
        v.add(PAD);
        v
    }

    fn add(&mut self, w: &str) -> u32 {
        if let Some(&id) = self.ids.get(w) {
            return id;
        }
        let id = self.words.len() as u32;
        self.words.push(w.to_string());
        self.ids.insert(w.to_string(), id);
        id
    }

    /// The vocabulary of `<pad>` and `words` (repeats count once).
    pub fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Self {
        let mut v = Vocab::new();
        for w in words {
            v.add(w);
        }
        v
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The id of `word`, if it is in the vocabulary.
    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    /// Tokenize whitespace-separated words; an unknown word is an error
    /// naming it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.split_whitespace()
            .map(|w| self.id(w).with_context(|| format!("unknown word '{w}'")))
            .collect()
    }

    pub fn decode(&self, tokens: &[u32]) -> String {
        tokens
            .iter()
            .map(|&t| self.words.get(t as usize).map_or("<?>", String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The world; see the module docs.
#[derive(Clone, Debug)]
pub struct FactWorld {
    pub config: WorldConfig,
    /// Each subject's words (one or two).
    pub subjects: Vec<Vec<String>>,
    pub relations: Vec<Relation>,
    /// `objects[s][r]`: the object of subject `s` under relation `r`, an
    /// index into `relations[r].objects`.
    pub objects: Vec<Vec<usize>>,
    /// Each subject's split.
    pub splits: Vec<Split>,
    pub vocab: Vocab,
}

/// Invented words: two or three consonant-vowel syllables, unique.
struct Words {
    rng: SeededRng,
    seen: HashSet<String>,
}

impl Words {
    fn next(&mut self) -> String {
        const C: &[u8] = b"bdfgklmnprstvz";
        const V: &[u8] = b"aeiou";
        loop {
            let n = 2 + self.rng.below(2) as usize;
            let w: String = (0..n)
                .flat_map(|_| {
                    let c = C[self.rng.below(C.len() as u64) as usize] as char;
                    let v = V[self.rng.below(V.len() as u64) as usize] as char;
                    [c, v]
                })
                .collect();
            if self.seen.insert(w.clone()) {
                return w;
            }
        }
    }
}

impl FactWorld {
    /// The world of `config` (deterministic in its seed).
    pub fn generate(config: &WorldConfig) -> Result<Self> {
        let c = config;
        ensure!(
            c.subjects >= 4 && c.relations >= 1,
            "a fact world needs at least 4 subjects and 1 relation"
        );
        ensure!(
            c.objects.0 >= 2 && c.objects.0 <= c.objects.1,
            "object vocabulary sizes ({}, {}) must be at least 2 and ordered",
            c.objects.0,
            c.objects.1
        );
        ensure!(
            c.train_templates >= 1 && c.heldout_templates >= 1,
            "a relation needs training templates and held-out paraphrases"
        );
        let mut words = Words {
            rng: SeededRng::new(c.seed, 0),
            seen: HashSet::new(),
        };
        let mut rng = SeededRng::new(c.seed, 1);
        let mut vocab = Vocab::new();
        // Subjects: the first half one word, the rest two.
        let subjects: Vec<Vec<String>> = (0..c.subjects)
            .map(|i| {
                let n = if i < c.subjects / 2 { 1 } else { 2 };
                (0..n).map(|_| words.next()).collect()
            })
            .collect();
        // Function words the templates are made of.
        let function: Vec<String> = (0..60).map(|_| words.next()).collect();
        let mut relations = vec![];
        // Templates are distinct across relations too: a prompt names its
        // relation.
        let mut used: HashSet<Template> = HashSet::new();
        for r in 0..c.relations {
            let n_obj = c.objects.0 + rng.below((c.objects.1 - c.objects.0 + 1) as u64) as usize;
            let objects: Vec<String> = (0..n_obj).map(|_| words.next()).collect();
            let mut templates: Vec<Template> = vec![];
            while templates.len() < c.train_templates + c.heldout_templates {
                let pick = |rng: &mut SeededRng, n: usize| -> Vec<String> {
                    (0..n)
                        .map(|_| function[rng.below(function.len() as u64) as usize].clone())
                        .collect()
                };
                let n_before = rng.below(3) as usize;
                let before = pick(&mut rng, n_before);
                let n_after = 1 + rng.below(3) as usize;
                let after = pick(&mut rng, n_after);
                let t = Template { before, after };
                if used.insert(t.clone()) {
                    templates.push(t);
                }
            }
            relations.push(Relation {
                name: format!("r{r}"),
                objects,
                templates,
            });
        }
        for s in &subjects {
            for w in s {
                vocab.add(w);
            }
        }
        for w in &function {
            vocab.add(w);
        }
        for r in &relations {
            for o in &r.objects {
                vocab.add(o);
            }
        }
        let objects: Vec<Vec<usize>> = (0..c.subjects)
            .map(|_| {
                relations
                    .iter()
                    .map(|r| rng.below(r.objects.len() as u64) as usize)
                    .collect()
            })
            .collect();
        // Splits: a shuffled permutation of subjects, 2/3 meta-training
        // edits, then 1/12 validation, 1/6 evaluation, the rest unrelated.
        let mut order: Vec<usize> = (0..c.subjects).collect();
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let n = c.subjects;
        let (a, b, d) = (n * 2 / 3, n * 2 / 3 + n / 12, n * 2 / 3 + n / 12 + n / 6);
        let mut splits = vec![Split::Train; n];
        for (k, &s) in order.iter().enumerate() {
            splits[s] = if k < a {
                Split::Train
            } else if k < b {
                Split::Validation
            } else if k < d {
                Split::Eval
            } else {
                Split::Unrelated
            };
        }
        let world = FactWorld {
            config: c.clone(),
            subjects,
            relations,
            objects,
            splits,
            vocab,
        };
        let longest = world
            .relations
            .iter()
            .flat_map(|r| &r.templates)
            .map(|t| t.before.len() + t.after.len() + 2 + 1)
            .max()
            .unwrap_or(0);
        ensure!(
            longest <= c.context,
            "prompts of {longest} tokens exceed the context of {}",
            c.context
        );
        Ok(world)
    }

    /// Number of facts (subjects x relations).
    pub fn num_facts(&self) -> usize {
        self.subjects.len() * self.relations.len()
    }

    /// The prompt of subject `s` under template `t` of relation `r`, with
    /// object `o` as the answer.
    pub fn prompt(&self, s: usize, r: usize, t: usize, o: usize) -> Prompt {
        let rel = &self.relations[r];
        let tpl = &rel.templates[t];
        let id = |w: &String| self.vocab.id(w).expect("world words are in the vocabulary");
        let tokens = tpl
            .before
            .iter()
            .chain(&self.subjects[s])
            .chain(&tpl.after)
            .map(id)
            .collect();
        Prompt {
            tokens,
            answer: id(&rel.objects[o]),
        }
    }

    /// Every fact under every training template, in subject, relation,
    /// template order.
    pub fn training_prompts(&self) -> Vec<Prompt> {
        let first = 0..self.config.train_templates;
        self.prompts_of(&(0..self.subjects.len()).collect::<Vec<_>>(), first)
    }

    /// Every fact of `subjects` under every training template.
    pub fn training_prompts_of(&self, subjects: &[usize]) -> Vec<Prompt> {
        self.prompts_of(subjects, 0..self.config.train_templates)
    }

    /// The held-out paraphrases of the facts of `subjects`.
    pub fn paraphrase_prompts(&self, subjects: &[usize]) -> Vec<Prompt> {
        let n = self.config.train_templates + self.config.heldout_templates;
        self.prompts_of(subjects, self.config.train_templates..n)
    }

    /// What a language model learns the world from: every fact under every
    /// training template, and the paraphrases of the facts of the
    /// meta-training and unrelated subjects. The model learns from these
    /// which relation a paraphrase asks for (the templates' words are
    /// invented, so nothing else could tell it) and must answer the
    /// paraphrases of the other subjects, [`FactWorld::heldout_prompts`],
    /// from the facts alone.
    pub fn pretraining_prompts(&self) -> Vec<Prompt> {
        let mut v = self.training_prompts();
        let mut seen: Vec<usize> = self.subjects_of(Split::Train);
        seen.extend(self.subjects_of(Split::Unrelated));
        seen.sort_unstable();
        v.extend(self.paraphrase_prompts(&seen));
        v
    }

    /// The paraphrases no pretraining prompt shows: those of the facts of
    /// the validation and evaluation subjects.
    pub fn heldout_prompts(&self) -> Vec<Prompt> {
        let mut held: Vec<usize> = self.subjects_of(Split::Validation);
        held.extend(self.subjects_of(Split::Eval));
        held.sort_unstable();
        self.paraphrase_prompts(&held)
    }

    /// The facts of `subjects` under templates `templates`, in subject,
    /// relation, template order.
    fn prompts_of(&self, subjects: &[usize], templates: std::ops::Range<usize>) -> Vec<Prompt> {
        let mut v = vec![];
        for &s in subjects {
            for r in 0..self.relations.len() {
                for t in templates.clone() {
                    v.push(self.prompt(s, r, t, self.objects[s][r]));
                }
            }
        }
        v
    }

    /// The longest prompt a model of this world reads, in tokens (the
    /// sequence length to compile for).
    pub fn longest_prompt(&self) -> usize {
        let subject = self.subjects.iter().map(Vec::len).max().unwrap_or(0);
        let template = self
            .relations
            .iter()
            .flat_map(|r| &r.templates)
            .map(|t| t.before.len() + t.after.len())
            .max()
            .unwrap_or(0);
        subject + template
    }

    /// The subjects of `split`, in index order.
    pub fn subjects_of(&self, split: Split) -> Vec<usize> {
        (0..self.subjects.len())
            .filter(|&s| self.splits[s] == split)
            .collect()
    }

    /// `n` edit requests on facts of `split`'s subjects, drawn from `seed`:
    /// distinct facts, each with a new object different from its own,
    /// `unrelated` prompts of the reserved subjects.
    pub fn edit_requests(
        &self,
        split: Split,
        n: usize,
        unrelated: usize,
        seed: u64,
    ) -> Result<Vec<EditRequest>> {
        let subjects = self.subjects_of(split);
        let reserved = self.subjects_of(Split::Unrelated);
        let facts = subjects.len() * self.relations.len();
        ensure!(
            n <= facts,
            "{n} edits requested of a split with {facts} facts"
        );
        ensure!(
            !reserved.is_empty(),
            "no subjects reserved for unrelated prompts"
        );
        let mut rng = SeededRng::new(self.config.seed ^ seed, 2);
        let mut chosen = HashSet::new();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let s = subjects[rng.below(subjects.len() as u64) as usize];
            let r = rng.below(self.relations.len() as u64) as usize;
            if !chosen.insert((s, r)) {
                continue;
            }
            let old = self.objects[s][r];
            let k = self.relations[r].objects.len();
            let new = (old + 1 + rng.below(k as u64 - 1) as usize) % k;
            let t = rng.below(self.config.train_templates as u64) as usize;
            let first = self.config.train_templates;
            let equivalent = (first..self.relations[r].templates.len())
                .map(|t| self.prompt(s, r, t, new))
                .collect();
            let unrelated = (0..unrelated)
                .map(|_| {
                    let u = reserved[rng.below(reserved.len() as u64) as usize];
                    let ur = rng.below(self.relations.len() as u64) as usize;
                    let ut = rng.below(self.config.train_templates as u64) as usize;
                    self.prompt(u, ur, ut, self.objects[u][ur])
                })
                .collect();
            out.push(EditRequest {
                fact: Some(WorldFact {
                    subject: s,
                    relation: r,
                    old_object: old,
                    new_object: new,
                }),
                edit: self.prompt(s, r, t, new),
                equivalent,
                unrelated,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> FactWorld {
        FactWorld::generate(&WorldConfig::default()).unwrap()
    }

    #[test]
    fn the_world_has_the_asked_shape() {
        let w = world();
        assert_eq!(w.num_facts(), 30_000);
        let one = w.subjects.iter().filter(|s| s.len() == 1).count();
        assert_eq!((one, w.subjects.len() - one), (1500, 1500));
        assert_eq!(w.relations.len(), 10);
        for r in &w.relations {
            assert!((20..=80).contains(&r.objects.len()), "{}", r.objects.len());
            assert_eq!(r.templates.len(), 6);
        }
        // No two relations share a template: every prompt has one answer.
        let distinct: HashSet<&Template> = w.relations.iter().flat_map(|r| &r.templates).collect();
        assert_eq!(distinct.len(), 60);
        let mut answer_of: HashMap<Vec<u32>, u32> = HashMap::new();
        for p in w.pretraining_prompts().iter().chain(&w.heldout_prompts()) {
            assert_eq!(
                *answer_of.entry(p.tokens.clone()).or_insert(p.answer),
                p.answer
            );
        }
        // Every word is one token; subjects are unique.
        let names: HashSet<String> = w.subjects.iter().map(|s| s.join(" ")).collect();
        assert_eq!(names.len(), 3000);
        for p in w.training_prompts().iter().chain(&w.heldout_prompts()) {
            assert!(p.tokens.len() < w.config.context, "{}", p.tokens.len());
            assert!(p.tokens.iter().all(|&t| t != 0));
        }
        assert_eq!(w.training_prompts().len(), 120_000);
        let longest = w
            .training_prompts()
            .iter()
            .chain(&w.heldout_prompts())
            .chain(&w.pretraining_prompts())
            .map(|p| p.tokens.len())
            .max();
        assert_eq!(Some(w.longest_prompt()), longest);
        // Paraphrases of 750 validation and evaluation subjects are held
        // out; those of the other 2,250 are pretraining prompts.
        assert_eq!(w.heldout_prompts().len(), 15_000);
        assert_eq!(w.pretraining_prompts().len(), 120_000 + 45_000);
        let pre: HashSet<Vec<u32>> = w
            .pretraining_prompts()
            .into_iter()
            .map(|p| p.tokens)
            .collect();
        assert!(w.heldout_prompts().iter().all(|p| !pre.contains(&p.tokens)));
        // The tokenizer round-trips and names unknown words.
        let p = w.prompt(1600, 3, 0, 5);
        let text = w.vocab.decode(&p.tokens);
        assert_eq!(w.vocab.encode(&text).unwrap(), p.tokens);
        let e = format!("{:#}", w.vocab.encode("zzzzq").unwrap_err());
        assert!(e.contains("zzzzq"), "{e}");
    }

    #[test]
    fn splits_are_disjoint_and_sized() {
        let w = world();
        let sizes: Vec<usize> = [
            Split::Train,
            Split::Validation,
            Split::Eval,
            Split::Unrelated,
        ]
        .iter()
        .map(|&s| w.subjects_of(s).len())
        .collect();
        assert_eq!(sizes, [2000, 250, 500, 250]);
        assert_eq!(sizes.iter().sum::<usize>(), 3000);
    }

    #[test]
    fn the_world_is_deterministic_in_its_seed() {
        let (a, b) = (world(), world());
        assert_eq!(a.subjects, b.subjects);
        assert_eq!(a.objects, b.objects);
        assert_eq!(a.splits, b.splits);
        assert_eq!(a.vocab, b.vocab);
        let c = FactWorld::generate(&WorldConfig {
            seed: 1,
            ..WorldConfig::default()
        })
        .unwrap();
        assert_ne!(a.subjects, c.subjects);
    }

    #[test]
    fn edit_requests_change_facts_of_their_split() {
        let w = world();
        let reqs = w.edit_requests(Split::Eval, 300, 2, 7).unwrap();
        assert_eq!(reqs, w.edit_requests(Split::Eval, 300, 2, 7).unwrap());
        let facts: Vec<WorldFact> = reqs.iter().map(|r| r.fact.unwrap()).collect();
        let distinct: HashSet<(usize, usize)> =
            facts.iter().map(|f| (f.subject, f.relation)).collect();
        assert_eq!(distinct.len(), 300);
        for (r, f) in reqs.iter().zip(&facts) {
            assert_eq!(w.splits[f.subject], Split::Eval);
            assert_ne!(f.old_object, f.new_object);
            let new = w
                .vocab
                .id(&w.relations[f.relation].objects[f.new_object])
                .unwrap();
            assert_eq!(r.edit.answer, new);
            assert_eq!(r.equivalent.len(), 2);
            assert!(r
                .equivalent
                .iter()
                .all(|p| p.answer == new && p.tokens != r.edit.tokens));
            assert_eq!(r.unrelated.len(), 2);
        }
        assert!(w.edit_requests(Split::Eval, 5001, 1, 0).is_err());
    }
}
