//! The model card `trainer export --card` writes beside a model: data, network, training, the file, and the
//! metrics of the run's `trainer eval`.

use std::path::Path;

use runtime::metadata::{Dtype, Prediction, Recommended, Weights};

use crate::report::EvalReport;
use crate::train::checkpoint::State;
use crate::train::config::TimestepSampling;

/// The augmentations that are on, as `name = value` (or "none").
fn augmentation(a: &crate::data::augment::AugmentConfig) -> String {
    let on: Vec<String> = serde_json::to_value(a)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| v.as_bool() != Some(false) && v.as_f64() != Some(0.0))
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    if on.is_empty() {
        "none".into()
    } else {
        on.join(", ")
    }
}

/// The file row's tail: "7.1 MB, sha256 <hex>".
fn size_and_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:.1} MB, sha256 {:x}", bytes.len() as f64 / 1e6, sha2::Sha256::digest(bytes))
}

/// The card's sentence on how to sample the file, ending in a blank line.
fn recommendation(r: Option<&Recommended>, conditional: bool) -> String {
    match r {
        Some(r) => {
            let at = r.guidance_interval.map(|g| format!(" at timesteps {}..={} only", g.lo, g.hi)).unwrap_or_default();
            let g = if conditional { format!(", guidance {}{at}", r.guidance) } else { String::new() };
            format!(
                "The file recommends {} with {} steps{g} (its metadata; `generate` uses it unless told otherwise).\n\n",
                r.sampler, r.steps
            )
        }
        None if conditional => "Try `--sampler dpm++ --steps 20 --guidance 2`.\n\n".to_string(),
        None => String::new(),
    }
}

/// A card written by [`model_card`] (and perhaps extended by hand) brought in step with a re-recommended file:
/// the size and hash in its file row and its recommendation sentence are replaced, every other line is kept.
pub fn restamp(card: &str, bytes: &[u8], r: &Recommended, conditional: bool, path: &Path) -> anyhow::Result<String> {
    let (mut file_row, mut sentence) = (false, false);
    let how = recommendation(Some(r), conditional);
    let lines: Vec<String> = card
        .lines()
        .map(|l| {
            if let (Some(rest), false) = (l.strip_prefix("| file | "), file_row) {
                if let Some(i) = rest.find(" MB, sha256 ") {
                    // "<dtype>, <weights> weights, opset N, " is kept; the size and hash after it are new
                    let head = rest[..i].rfind(", ").map_or("", |j| &rest[..j + 2]);
                    file_row = true;
                    return format!("| file | {head}{} |", size_and_hash(bytes));
                }
            }
            if !sentence && (l.starts_with("The file recommends ") || l.starts_with("Try `--sampler")) {
                sentence = true;
                return how.trim_end().to_string();
            }
            l.to_string()
        })
        .collect();
    if !(file_row && sentence) {
        anyhow::bail!(
            "{} is not a card `trainer export --card` wrote (it lacks its {}); write one with `trainer export --run RUN --card`",
            path.display(),
            if file_row { "recommendation sentence" } else { "file row with a sha256" }
        );
    }
    Ok(lines.join("\n") + "\n")
}

/// The exported file as the model card describes it.
pub struct CardFile<'a> {
    pub out: &'a Path,
    pub dtype: Dtype,
    pub weights: Weights,
    /// What the weights are when not a checkpoint's own ([`crate::train::post_hoc`]).
    pub rebuilt: Option<&'a str>,
    pub opset: i64,
    pub recommended: Option<&'a Recommended>,
    /// The file's bytes (its size and SHA-256).
    pub bytes: &'a [u8],
}

/// A model card in Markdown: what the model was trained on and how, the file, and the metrics of `trainer eval`
/// when the run has them.
pub fn model_card(state: &State, file: &CardFile, eval: Option<&EvalReport>) -> String {
    let (m, d) = (&state.config.model, &state.config.diffusion);
    let name = file.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let what = match d.prediction {
        Prediction::Epsilon => "noise-prediction U-Net (eps = f(x_t, t[, y]))",
        Prediction::V => "v-prediction U-Net (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 = f(x_t, t[, y]))",
    };
    let mut s = format!("# {name}\n\nDDPM {what}, exported by diffusion-rs trainer {}.\n\n", env!("CARGO_PKG_VERSION"));
    s += "| | |\n|---|---|\n";
    for (k, v) in training_rows(state, file) {
        s += &format!("| {k} | {v} |\n");
    }
    if let Some(d) = &state.config.distill {
        let k = d.steps_at(state.step, state.config.train.steps);
        let method = if d.consistency() {
            format!(
                "a consistency student ({k} steps recommended, any number possible): consistency distillation (Song et \
                 al. 2023) of {} on its {}-step DDIM grid, the student's x0 made to agree (pseudo-Huber) with its own \
                 stop-gradient x0 one teacher step later",
                d.teacher, d.teacher_steps
            )
        } else {
            format!(
                "a {k}-step student: progressive distillation (Salimans & Ho 2022) of {}, {} DDIM teacher steps halved \
                 {} time(s), each step learning the x whose one DDIM step lands where two teacher steps do (weight \
                 max(SNR, 1))",
                d.teacher,
                d.teacher_steps,
                d.stages()
            )
        };
        let guidance = if m.guidance_embed {
            format!(
                "; the guidance weight w is an input (Meng et al. 2023), drawn from U[0, {}] in training: one model call \
                 per step whatever w{}",
                d.guidance_max,
                d.guidance_interval.map(|[lo, hi]| format!(", the teacher guided at t {lo}..={hi}")).unwrap_or_default()
            )
        } else {
            String::new()
        };
        s += &format!(
            "| distillation | {method}; teacher file sha256 {}; {} steps, the learning rate falling from {} to 0 in each \
             stage{guidance}; predicts v |\n",
            &d.teacher_sha256[..d.teacher_sha256.len().min(16)],
            state.config.train.steps,
            state.config.train.lr,
        );
    }
    if let Some(e) = eval {
        s += &metrics(e);
    }
    let mut class = if m.num_classes > 0 { " --class 0".to_string() } else { String::new() };
    for a in &m.attributes {
        class += &format!(" --attr {}={}", a.name, a.values[0]);
    }
    let how = recommendation(file.recommended, m.num_classes > 0);
    s += &format!("\n## Use\n\n{how}```\ngenerate --model {} --n 64{class}\n```\n", file.out.display());
    s
}

/// The card's first table: data, network, diffusion, training and the file.
fn training_rows(state: &State, file: &CardFile) -> [(&'static str, String); 9] {
    let (c, m, d, t) = (&state.config, &state.config.model, &state.config.diffusion, &state.config.train);
    let classes = if m.num_classes > 0 {
        format!(
            "{} ({}); null class {} for classifier-free guidance, label dropout p = {}",
            m.num_classes,
            state.class_names.join(", "),
            m.null_class().map(|n| n.to_string()).unwrap_or_default(),
            t.p_uncond
        )
    } else {
        "unconditional".into()
    };
    let classes = m.attributes.iter().fold(classes, |acc, a| {
        format!("{acc}; attribute {} ({}), its own null entry and dropout", a.name, a.values.join(", "))
    });
    [
        ("data", format!("{} (fingerprint {})", state.data_description, state.data_fingerprint)),
        ("image", format!("{}x{}, {} channel(s), pixels in [-1, 1]", m.image_size, m.image_size, m.channels)),
        ("classes", classes),
        (
            "U-Net",
            format!(
                "ch {}, ch_mult {:?}, {} res blocks per level, attention at {:?} ({} heads), dropout {}; {:.2}M parameters",
                m.ch,
                m.ch_mult,
                m.num_res_blocks,
                m.attention_resolutions,
                m.num_heads,
                m.dropout,
                state.num_params as f64 / 1e6
            ),
        ),
        ("diffusion", format!("{} schedule, T = {}, variance {}, {} prediction", d.schedule, d.timesteps, d.variance, d.prediction)),
        (
            "training",
            if c.distill.is_some() {
                format!(
                    "{} steps, batch {}, lr {} falling linearly to 0 in each stage, AdamW, the objective in the distillation row, EMA {} \
                     (restarted in each stage), seed {}",
                    state.step, t.batch_size, t.lr, t.ema_decay, t.seed
                )
            } else {
                format!(
                "{} steps, batch {}, lr {} ({} warm-up, then {}), AdamW, {} loss{}{}, EMA {}, seed {}; augmentation: {}",
                state.step,
                t.batch_size,
                t.lr,
                t.warmup_steps,
                t.lr_schedule,
                t.loss,
                if t.min_snr_gamma > 0.0 { format!(" with Min-SNR-{} weighting", t.min_snr_gamma) } else { String::new() },
                match t.timestep_sampling {
                    TimestepSampling::Uniform => String::new(),
                    TimestepSampling::Importance => ", timesteps by importance".to_string(),
                    TimestepSampling::LogNormal => format!(", timesteps with ln sigma ~ N({}, {}^2)", t.p_mean, t.p_std),
                },
                t.ema_decay,
                t.seed,
                augmentation(&c.data.augment)
            )
            },
        ),
        ("device, wall time", format!("{}, {:.2} h ({:.0} s)", state.device, state.elapsed_s / 3600.0, state.elapsed_s)),
        ("final loss", format!("{:.4} (mean of the last logged window)", state.recent_loss)),
        (
            "file",
            format!(
                "{}, {} weights{}, opset {}, {}",
                file.dtype,
                file.weights,
                file.rebuilt.map(|r| format!(" ({r})")).unwrap_or_default(),
                file.opset,
                size_and_hash(file.bytes)
            ),
        ),
    ]
}

/// The metrics section from the run's eval.json.
fn metrics(e: &EvalReport) -> String {
    let mut s = String::new();
    s += &format!(
        "\n## Metrics (`trainer eval`, {} samples, {}, guidance {}{}{})\n\n",
        e.samples,
        e.sampler,
        e.guidance,
        e.guidance_interval.as_ref().map(|g| format!(" at t {g}")).unwrap_or_default(),
        if e.class_mix.as_deref() == Some("data") { ", classes in the data's proportions" } else { "" }
    );
    if let Some(w) = &e.weights {
        s += &format!("Scored weights: {w}.\n\n");
    }
    s += "| metric | value | real-vs-real floor |\n|---|---|---|\n";
    if let Some(a) = e.classifier_test_accuracy {
        s += &format!("| evaluation classifier's test accuracy | {:.2}% | |\n", 100.0 * a);
    }
    if let Some(v) = e.classifier_score {
        s += &format!("| classifier score (samples classified as their class) | {:.2}% | |\n", 100.0 * v);
    }
    let fids = [
        ("FID, classifier features (128-d)", e.fid_classifier_features, e.fid_floor_train_vs_test),
        ("FID, Inception-v3 pool3 (2048-d)", e.fid_inception, e.fid_inception_floor),
    ];
    for (label, v, floor) in fids {
        if let Some(v) = v {
            let fl = floor.map(|x| format!("{x:.3}")).unwrap_or_default();
            s += &format!("| {label} | {v:.3} | {fl} |\n");
        }
    }
    if let Some(c) = &e.c2st {
        s += &format!(
            "| classifier two-sample test, {} images per set (50% = indistinguishable from real) | {:.1}% | {:.1}% |\n",
            c.images,
            100.0 * c.accuracy,
            100.0 * c.real_vs_real
        );
    }
    if let Some(n) = &e.nll {
        s += &format!(
            "| NLL bound, {} test images ({}, {} variance), bits/dim | {:.3} ± {:.3} | |\n",
            n.images, n.conditioning, n.variance, n.bits_per_dim, n.stderr
        );
    }
    s += &per_class_table(e);
    if let Some(r) = &e.composition {
        s += &composition_table(r);
    }
    s
}

/// Each class's classifier score and FID beside its floor, one row a class (empty for an unconditional model).
fn per_class_table(e: &EvalReport) -> String {
    let mut classes: Vec<(&str, usize)> = e.classifier_score_per_class.iter().map(|c| (&*c.class, c.n)).collect();
    for f in &e.fid_per_class {
        if !classes.iter().any(|c| c.0 == f.class) {
            classes.push((&f.class, f.samples));
        }
    }
    let mut spaces: Vec<&str> = vec![];
    for f in &e.fid_per_class {
        if !spaces.contains(&f.space.as_str()) {
            spaces.push(&f.space);
        }
    }
    let scores = !e.classifier_score_per_class.is_empty();
    if classes.is_empty() || (!scores && spaces.is_empty()) {
        return String::new();
    }
    let mut head = "| class | samples |".to_string();
    if scores {
        head += " classifier score |";
    }
    for sp in &spaces {
        head += &format!(" FID, {sp} | its floor | real images |");
    }
    let cols = head.matches('|').count() - 1;
    let mut s = format!(
        "\n### Per class\n\nEach class's samples against the real images of that class; the floor is the class's \
         training images against the same images. Few images make both larger: compare a class's FID with its own \
         floor.\n\n{head}\n|{}\n",
        "---|".repeat(cols)
    );
    for (class, n) in classes {
        s += &format!("| {class} | {n} |");
        if scores {
            match e.classifier_score_per_class.iter().find(|c| c.class == class) {
                Some(c) => s += &format!(" {:.1}% |", 100.0 * c.score),
                None => s += " |",
            }
        }
        for sp in &spaces {
            match e.fid_per_class.iter().find(|f| f.class == class && f.space == *sp) {
                Some(f) => s += &format!(" {:.1} | {:.1} | {} |", f.fid, f.floor, f.real),
                None => s += " | | |",
            }
        }
        s += "\n";
    }
    s
}

/// The compositional-generalisation report as a class x position table of the samples that show both labels
/// (held-out pairs starred), with the three group means.
fn composition_table(r: &crate::report::CompositionReport) -> String {
    let mut classes: Vec<&str> = vec![];
    let mut positions: Vec<&str> = vec![];
    for c in &r.cells {
        if !classes.contains(&c.class.as_str()) {
            classes.push(&c.class);
        }
        if !positions.contains(&c.position.as_str()) {
            positions.push(&c.position);
        }
    }
    let weights = if r.label_guidance.iter().all(|w| w.guidance == r.guidance) {
        format!("guidance {} on each label", r.guidance)
    } else {
        let w: Vec<String> = r.label_guidance.iter().map(|w| format!("{} {}", w.label, w.guidance)).collect();
        format!("guidance {}", w.join(", "))
    };
    let mut s = format!(
        "\n## Composition (`trainer eval --composition {}`, {weights})\n\n\
         Samples of every (class, position) pair that show both: the class asked for (the plain set's classifier on \
         the quadrant) where it was asked for (the centre of mass of the ink). Pairs never seen in training are \
         starred.\n\n| class | {} |\n|---|{}\n",
        r.per_pair,
        positions.join(" | "),
        "---|".repeat(positions.len())
    );
    for class in &classes {
        s += &format!("| {class} |");
        for pos in &positions {
            match r.cells.iter().find(|c| c.class == *class && c.position == *pos) {
                Some(c) => s += &format!(" {:.0}%{} |", 100.0 * c.both, if c.held_out { "*" } else { "" }),
                None => s += " |",
            }
        }
        s += "\n";
    }
    s += &format!(
        "\nHeld-out pairs ({} at the positions it never took in training): {:.1}%; {} at its trained positions: \
         {:.1}%; every other pair: {:.1}%.\n",
        r.held_out_class,
        100.0 * r.held_out_pairs,
        r.held_out_class,
        100.0 * r.held_out_class_seen_pairs,
        100.0 * r.other_pairs
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composition_table_has_a_row_per_class_and_stars_the_held_out_pairs() {
        use crate::report::{Cell, CompositionReport, LabelWeight};
        let cell = |class: &str, position: &str, held_out: bool, both: f64| Cell {
            class: class.into(),
            position: position.into(),
            held_out,
            n: 4,
            at_position: both,
            class_ok: both,
            both,
        };
        let r = CompositionReport {
            per_pair: 4,
            guidance: 2.0,
            label_guidance: vec![
                LabelWeight { label: "class".into(), guidance: 2.0 },
                LabelWeight { label: "position".into(), guidance: 4.0 },
            ],
            held_out_class: "7".into(),
            held_out_pairs: 0.25,
            held_out_class_seen_pairs: 1.0,
            other_pairs: 0.75,
            cells: vec![
                cell("1", "left", false, 0.75),
                cell("1", "right", false, 0.75),
                cell("7", "left", false, 1.0),
                cell("7", "right", true, 0.25),
            ],
        };
        let t = composition_table(&r);
        assert!(t.contains("(`trainer eval --composition 4`, guidance class 2, position 4)"), "{t}");
        assert!(t.contains("| class | left | right |\n|---|---|---|\n"), "{t}");
        assert!(t.contains("| 1 | 75% | 75% |\n| 7 | 100% | 25%* |\n"), "{t}");
        assert!(t.contains("Held-out pairs (7 at the positions it never took in training): 25.0%"), "{t}");
        assert!(t.contains("every other pair: 75.0%"), "{t}");
    }

    #[test]
    fn per_class_table_has_a_row_per_class_with_its_own_floor() {
        use crate::report::{ClassFid, ClassScore};
        let e: EvalReport = serde_json::from_value(serde_json::json!({
            "run": "r", "model": null, "step": 10, "samples": 4, "sampler": "ddim 5 steps, trailing", "guidance": 2.0,
            "classifier_score": 0.5, "classifier_score_per_class": [], "fid_images": 4
        }))
        .unwrap();
        assert_eq!(per_class_table(&e), "", "an unconditional report has no per-class table");
        let fid = |class: &str, fid: f64| ClassFid {
            class: class.into(),
            space: "inception".into(),
            samples: 2,
            real: 3,
            fid,
            floor: 7.5,
        };
        let mut e = e;
        e.classifier_score_per_class = vec![
            ClassScore { class: "flags".into(), n: 2, score: 1.0 },
            ClassScore { class: "objects".into(), n: 2, score: 0.0 },
        ];
        e.fid_per_class = vec![fid("flags", 12.5)];
        let t = per_class_table(&e);
        assert!(t.contains("| class | samples | classifier score | FID, inception | its floor | real images |\n|---|---|---|---|---|---|\n"), "{t}");
        assert!(t.contains("| flags | 2 | 100.0% | 12.5 | 7.5 | 3 |\n| objects | 2 | 0.0% | | | |\n"), "{t}");
    }

    #[test]
    fn model_card_lists_only_the_augmentations_that_are_on() {
        let mut a = crate::data::augment::AugmentConfig::default();
        assert_eq!(augmentation(&a), "none");
        a.hflip = true;
        a.rotate_degrees = 10.0;
        assert_eq!(augmentation(&a), "hflip = true, rotate_degrees = 10.0");
    }
}
