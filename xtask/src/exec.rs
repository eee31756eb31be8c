//! Running external commands: printed before they run, checked after.

use std::{
    fmt,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// What the user should do about an error: `main` prints it as the last line.
///
/// Attach it with [`anyhow::Context::context`]; it is found again anywhere in
/// the chain with `downcast_ref`.
#[derive(Debug)]
pub struct Fix(pub String);

impl fmt::Display for Fix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fix {}

/// `err`'s causes joined with `: ` (without the [`Fix`]), and its [`Fix`] if any.
pub fn describe(err: &anyhow::Error) -> (String, Option<String>) {
    let fix = err.downcast_ref::<Fix>().map(ToString::to_string);
    let causes: Vec<String> = err
        .chain()
        .map(ToString::to_string)
        .filter(|cause| Some(cause) != fix.as_ref())
        .collect();
    (causes.join(": "), fix)
}

/// `cmd` as a shell-like line, with the environment variables it sets
/// explicitly (except `PATH`) in front.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value
            && key != "PATH"
        {
            words.push(format!(
                "{}={}",
                key.display(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    words.push(quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Prints `==> cmd`, runs it with inherited stdio, and fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("==> {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a quiet probe and returns its stdout, or an error with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}
