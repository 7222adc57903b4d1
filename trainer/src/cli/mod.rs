//! One module per subcommand: its arguments (clap) and the function that runs it.

pub mod bench;
pub mod distill;
pub mod eval;
pub mod export;
pub mod fit;
pub mod plot;
pub mod progress;
pub mod sweep;
