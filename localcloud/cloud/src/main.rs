//! `localcloud`: starts, checks and stops the local cloud's servers. Run it through
//! `localcloud/localcloud`, which installs them and hands over their versions and paths.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use localcloud::settings::Settings;
use localcloud::{Cloud, commands, services};

#[derive(Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start everything, wait until healthy, write the env file ($QDB_RUN/env).
    Up,
    /// Stop what `up` (and the main job) started, by PID, and nothing else.
    Down,
    /// One line per component; exits 1 when any is down.
    Status,
    /// `down`, then delete all data (journal, topics, clusters).
    Reset,
    /// Stop and start one server, keeping its data: kafka, postgres or <cluster>-apiserver.
    Restart { component: Option<String> },
    /// Print the env file's path.
    Env,
    /// The main job's control plane: an operator per cluster and the provisioner.
    #[command(hide = true)]
    StartServices,
    /// Print one port, for the script (its messages, the tests' emulator endpoint).
    #[command(hide = true)]
    Port { of: Port },
}

#[derive(Clone, Copy, ValueEnum)]
enum Port {
    Moto,
    Provisioner,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("[localcloud] error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> anyhow::Result<ExitCode> {
    let cloud = Cloud::new(Settings::from_env()?);
    let s = &cloud.settings;
    match command {
        Cmd::Up => commands::up(&cloud)?,
        Cmd::Down => commands::down(&cloud)?,
        Cmd::Status => {
            if !commands::status(&cloud) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Reset => commands::reset(&cloud)?,
        Cmd::Restart { component } => commands::restart(&cloud, component.as_deref())?,
        Cmd::Env => println!("{}", s.env_file().display()),
        Cmd::StartServices => services::start(&cloud)?,
        Cmd::Port { of } => println!(
            "{}",
            match of {
                Port::Moto => s.ports.moto(),
                Port::Provisioner => s.ports.provisioner(),
            }
        ),
    }
    Ok(ExitCode::SUCCESS)
}
