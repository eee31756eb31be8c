//! `pagefp`: thin entry point; the logic lives in the library.

use std::{io::IsTerminal as _, process::ExitCode};

use agent::{
    api::{
        client,
        views::{CatalogView, VmView},
    },
    cli::{Cli, Command, TlsCommand},
    daemon,
};
use clap::Parser as _;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => args.config().and_then(daemon::run),
        Command::Status(args) => status(&args),
        Command::Templates(mut args) => match args.action.take() {
            Some(action) => agent::migrate::cli::run_catalog(action, &args.client.socket),
            None => templates(&args),
        },
        Command::QemuProxy(command) => agent::qemu_proxy::run(command),
        Command::Migrate(command) => {
            agent::migrate::cli::run_migrate(command, std::io::stderr().is_terminal())
        }
        Command::Tls(TlsCommand::MakeTestPki(options)) => {
            agent::net::pki::make(&options).map(|written| {
                for path in written {
                    println!("{}", path.display());
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pagefp: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn status(args: &agent::cli::ClientArgs) -> anyhow::Result<()> {
    let body = client::get_blocking(&args.socket, "/v1/vms")?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let vms: Vec<VmView> = serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("the agent's VM list is not what this pagefp reads ({e}): are the agent and this command the same version?"))?;
    println!(
        "{:>8} {:<16} {:>10} {:>8} {:>9} {:>10} {:>10} {:<10} {:<10}",
        "PID", "NAME", "PAGES", "HASHED%", "DIRTY/S", "TEMPLATE%", "ZERO", "TRACKING", "MODE"
    );
    for view in &vms {
        println!(
            "{:>8} {:<16} {:>10} {:>8.1} {:>9.0} {:>10.1} {:>10} {:<10} {:<10}",
            view.pid,
            view.comm,
            view.pages,
            view.hashed_pct,
            view.stats.dirty_per_sec,
            view.template_coverage_pct,
            view.zero_pages,
            view.tracking.name(),
            view.dirty_mode.name(),
        );
        if let Some(note) = &view.note {
            println!("{:>8} note: {note}", "");
        }
    }
    if vms.is_empty() {
        println!("(no VMs yet: the agent sees a VM when its VMM creates it or registers memory)");
    }
    Ok(())
}

fn templates(args: &agent::cli::TemplatesArgs) -> anyhow::Result<()> {
    let body = client::get_blocking(
        &args.client.socket,
        &format!("/v1/templates?limit={}", args.top),
    )?;
    if args.client.json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let catalog: CatalogView = serde_json::from_slice(&body)
        .map_err(|e| anyhow::anyhow!("the agent's template list is not what this pagefp reads ({e}): are the agent and this command the same version?"))?;
    println!(
        "{} templates ({} MiB) selected of {} contents held by at least {} VMs; they cover {} guest pages. Top {}:",
        catalog.selected,
        (catalog.selected as u64 * agent::page::PAGE_SIZE as u64) >> 20,
        catalog.eligible,
        catalog.min_vms,
        catalog.pages_covered,
        catalog.templates.len(),
    );
    println!("{:>6} {:>8} {:>5}  HASH", "INDEX", "PAGES", "VMS");
    for t in &catalog.templates {
        println!(
            "{:>6} {:>8} {:>5}  {}",
            t.index,
            t.pages,
            t.vms,
            agent::page::hex(&t.hash)
        );
    }
    Ok(())
}
