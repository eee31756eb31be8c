//! `pagefp`: thin entry point; the logic lives in the library.

use std::{io::IsTerminal as _, process::ExitCode};

use agent::{
    cli::{Cli, Command},
    client, daemon,
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
    let vms: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
    println!(
        "{:>8} {:<16} {:>10} {:>8} {:>9} {:>10} {:>10} {:<10} {:<10}",
        "PID", "NAME", "PAGES", "HASHED%", "DIRTY/S", "TEMPLATE%", "ZERO", "TRACKING", "MODE"
    );
    for vm in &vms {
        let view: VmViewLite = serde_json::from_value(vm.clone())?;
        println!(
            "{:>8} {:<16} {:>10} {:>8.1} {:>9.0} {:>10.1} {:>10} {:<10} {:<10}",
            view.pid,
            view.comm,
            view.pages,
            view.hashed_pct,
            view.stats.dirty_per_sec,
            view.template_coverage_pct,
            view.zero_pages,
            view.tracking,
            match &view.dirty_mode {
                serde_json::Value::String(mode) => mode.clone(),
                serde_json::Value::Object(map) if map.contains_key("bitmap") => {
                    if map["bitmap"]["manual_protect"] == true {
                        "bitmap-mp".into()
                    } else {
                        "bitmap".into()
                    }
                }
                other => other.to_string(),
            },
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

/// The fields of `agent::api::views::VmView` the table shows.
#[derive(serde::Deserialize)]
struct VmViewLite {
    pid: u32,
    comm: String,
    pages: u64,
    hashed_pct: f64,
    template_coverage_pct: f64,
    zero_pages: u64,
    tracking: String,
    dirty_mode: serde_json::Value,
    note: Option<String>,
    stats: StatsLite,
}

#[derive(serde::Deserialize)]
struct StatsLite {
    dirty_per_sec: f64,
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
    let catalog: serde_json::Value = serde_json::from_slice(&body)?;
    println!(
        "{} templates ({} MiB) selected of {} contents held by at least {} VMs; they cover {} guest pages. Top {}:",
        catalog["selected"],
        (catalog["selected"].as_u64().unwrap_or(0) * 4096) >> 20,
        catalog["eligible"],
        catalog["min_vms"],
        catalog["pages_covered"],
        catalog["templates"].as_array().map_or(0, Vec::len),
    );
    println!("{:>6} {:>8} {:>5}  HASH", "INDEX", "PAGES", "VMS");
    for t in catalog["templates"].as_array().into_iter().flatten() {
        let number = |key: &str| t[key].as_u64().unwrap_or(0);
        println!(
            "{:>6} {:>8} {:>5}  {}",
            number("index"),
            number("pages"),
            number("vms"),
            t["hash"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
