use clap::Parser;

fn main() {
    distil::util::threads::init_runtime();
    let cli = distil::cli::Cli::parse();
    if let Err(e) = distil::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
