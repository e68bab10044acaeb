//! Builds images into a data directory and prints progress lines, as the
//! CLI's `bhatti image build` will.
//!
//! `cargo run -p bhatti-image --example build_image -- DATA_DIR LOHAR_BIN [tiny|minimal|all] [--force]`

use image::builder::{BuildOptions, ImageBuilder, ImageProgress, ProgressEvent, Selection};
use image::{Layout, Tier};

struct Lines;
impl ImageProgress for Lines {
    fn on_event(&self, event: &ProgressEvent) {
        match event {
            ProgressEvent::Started(step) => println!("{step}: starting"),
            ProgressEvent::Detail(step, msg) => println!("{step}: {msg}"),
            ProgressEvent::Finished(r) => println!(
                "{}: {:?} in {:.2}s — {}",
                r.step,
                r.outcome,
                r.elapsed.as_secs_f64(),
                r.summary
            ),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(data), Some(lohar)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: build_image DATA_DIR LOHAR_BIN [tiny|minimal|all] [--force]");
    };
    let selection = match args.get(2).map(String::as_str) {
        None | Some("all") => Selection::All,
        Some(name) => Selection::Tier(
            Tier::from_name(name).ok_or_else(|| anyhow::anyhow!("unknown tier '{name}'"))?,
        ),
    };
    let opts = BuildOptions {
        lohar: lohar.into(),
        force: args.iter().any(|a| a == "--force"),
    };
    let builder = ImageBuilder::new(Layout::new(data)).with_progress(Lines);
    builder.build(selection, &opts)?;
    Ok(())
}
