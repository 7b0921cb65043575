//! `kiln check`: validate a recipe without building it.

use std::path::PathBuf;

use anyhow::Context;
use kiln::platform::Arch;
use kiln::recipe::{self, Base, FileContent, FileKind, KeySource, Recipe, RecipeError};

/// Validate a recipe without building anything.
///
/// Reads the recipe and every recipe it extends, checks every key and value, checks that the
/// files it names exist, and prints a summary. Every problem is reported in one run (a
/// misspelt key does not hide a wrong type or a bad value after it), each with the recipe
/// file, line and column, what is accepted, and the nearest valid key. Exits with status 1
/// when the recipe is invalid, so it fits in CI before a build.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
kiln check recipes/debian-12-minimal.toml\n  \
kiln check recipes/web-server.toml --arch arm64     # as `kiln build --arch arm64` would build it\n  \
kiln check recipes/debian-12-ec2.toml --json        # machine-readable summary or errors")]
pub struct Args {
    /// The recipe (TOML) to check.
    pub recipe: PathBuf,
    /// Check for this architecture instead of the recipe's (`x86_64` or `arm64`), as
    /// `kiln build --arch` would.
    #[arg(long)]
    pub arch: Option<Arch>,
    /// Print the summary (or the errors) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let result = recipe::load(&args.recipe).and_then(|r| match args.arch {
        Some(a) => r.with_arch(a),
        None => Ok(r),
    });
    let recipe = match result {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&error_json(&args, &e))?);
            }
            return Err(e).with_context(|| format!("{} is not a valid recipe", args.recipe.display()));
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary_json(&recipe))?);
    } else {
        print!("{}", summary_text(&recipe));
    }
    for w in &recipe.warnings {
        eprintln!("kiln: warning: {w}");
    }
    Ok(())
}

fn base_text(r: &Recipe) -> String {
    match &r.base {
        Base::Debian { suite, mirror, snapshot, components, apt_mirror, .. } => {
            let mirror = mirror.as_deref().unwrap_or("the build host's apt sources");
            let snap = snapshot.as_deref().map(|s| format!(", snapshot {s}")).unwrap_or_default();
            let apt = apt_mirror.as_deref().map(|m| format!("; the image's apt: {m}")).unwrap_or_default();
            format!(
                "{} ({suite}, {}; mirror: {mirror}{snap}{apt})",
                r.os.map(|o| o.as_str()).unwrap_or("?"),
                components.join(" ")
            )
        }
        Base::Tarball(p) => format!("root tarball {}", p.display()),
    }
}

fn summary_text(r: &Recipe) -> String {
    let (mut inline, mut source, mut dirs, mut links) = (0, 0, 0, 0);
    for f in &r.files {
        match &f.kind {
            FileKind::File { content: FileContent::Inline(_) } => inline += 1,
            FileKind::File { content: FileContent::Source(_) } => source += 1,
            FileKind::Dir => dirs += 1,
            FileKind::Symlink { .. } => links += 1,
        }
    }
    let mut s = format!("{}: ok\n", r.path.display());
    let mut row = |k: &str, v: String| s.push_str(&format!("  {k:<9} {v}\n"));
    row("name", format!("{} (outputs {}.*)", r.name, r.output_name()));
    row("base", base_text(r));
    row("arch", r.arch.to_string());
    row("boot", format!("{} (EC2 boot mode {})", r.boot, r.boot.ec2_boot_mode()));
    row("size", r.size.to_string());
    row("packages", format!("{} from the recipe, {} excluded", r.packages.len(), r.exclude_packages.len()));
    let svc = &r.service;
    if !svc.is_empty() {
        let names: Vec<&str> = svc.repositories.iter().map(|x| x.name.as_str()).collect();
        row(
            "service",
            format!(
                "{} repositories{}, {} local packages, {} users, {} steps (staged on the Debian base)",
                names.len(),
                if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) },
                svc.local.len(),
                svc.users.len(),
                svc.steps.len()
            ),
        );
    }
    row(
        "files",
        format!(
            "{} ({inline} inline, {source} from source files, {dirs} directories, {links} symlinks)",
            r.files.len()
        ),
    );
    row(
        "ami",
        match &r.ami {
            Some(a) => {
                let regions =
                    if a.regions.is_empty() { "the AWS config's region".into() } else { a.regions.join(", ") };
                let access = if a.launch_permissions.public { "public" } else { "private" };
                format!("{} in {regions} ({}, {access})", a.name, a.boot_mode)
            }
            None => "no [ami] section".into(),
        },
    );
    if let Some(a) = &r.ami {
        let mut release = Vec::new();
        if let Some(k) = a.keep {
            release.push(format!("keeps {k}"));
        }
        if let Some(p) = a.protect {
            release.push(if p.with_cooldown() { "protected (24h cooldown)".into() } else { "protected".into() });
        }
        if let Some(d) = a.keep_if_launched_within_days {
            release.push(format!("kept while launched within {d}d"));
        }
        if let Some(d) = a.disable_before_delete_days {
            release.push(format!("disabled {d}d before deletion"));
        }
        if let Some(m) = a.copy_within_minutes {
            release.push(format!("copies within {m} min"));
        }
        if !a.ssm_promote.is_empty() {
            release.push(format!("`kiln promote` moves {}", a.ssm_promote.join(", ")));
        }
        if !release.is_empty() {
            row("release", release.join("; "));
        }
    }
    row("bundle", if r.bundle.is_some() { "yes".into() } else { "no [bundle] section".into() });
    row(
        "secure boot",
        match &r.secure_boot {
            Some(sb) => {
                let dbx = if sb.dbx.is_some() { ", dbx" } else { "" };
                match &sb.keys {
                    KeySource::Files { kek, db, key, signer, .. } => format!(
                        "PK, {} KEK, {} db{dbx}; the boot chain signed by db[{signer}] ({})",
                        kek.len(),
                        db.len(),
                        key.display()
                    ),
                    KeySource::Generate { db } => format!(
                        "PK, KEK and a db key generated by the build (kept in {}.keys/), {} more db{dbx}",
                        r.output_name(),
                        db.len()
                    ),
                }
            }
            None => "no [secure_boot] section".into(),
        },
    );
    if r.recipe_files().len() > 1 {
        let chain: Vec<String> = r.recipe_files().iter().map(|p| p.display().to_string()).collect();
        row("extends", chain[1..].join(" → "));
    }
    row("sha256", r.sha256.clone());
    s
}

fn summary_json(r: &Recipe) -> serde_json::Value {
    serde_json::json!({
        "valid": true,
        "recipe": r.path,
        "recipe_files": r.recipe_files(),
        "sha256": r.sha256,
        "name": r.name,
        "output_name": r.output_name(),
        "os": r.os,
        "base": r.base,
        "arch": r.arch,
        "boot": r.boot,
        "ec2_boot_mode": r.boot.ec2_boot_mode(),
        "size": r.size,
        "packages": r.packages,
        "exclude_packages": r.exclude_packages,
        "files": r.files.len(),
        "service": r.service,
        "system": r.system,
        "source_date_epoch": r.source_date_epoch,
        "ami": r.ami,
        "bundle": r.bundle,
        "secure_boot": r.secure_boot.as_ref().map(|sb| match &sb.keys {
            KeySource::Files { kek, db, key, signer, .. } => serde_json::json!({
                "generate": false, "kek": kek.len(), "db": db.len(), "dbx": sb.dbx.is_some(), "signer": signer, "key": key,
            }),
            KeySource::Generate { db } => serde_json::json!({
                "generate": true, "keys_dir": format!("{}.keys", r.output_name()), "db": db.len() + 1, "dbx": sb.dbx.is_some(),
            }),
        }),
        "warnings": r.warnings,
    })
}

fn error_json(args: &Args, e: &RecipeError) -> serde_json::Value {
    let errors: Vec<serde_json::Value> = match e {
        RecipeError::Read { .. } => vec![serde_json::json!({ "message": kiln::message::render_error(e) })],
        RecipeError::Invalid { diagnostics } => diagnostics
            .iter()
            .map(|d| {
                serde_json::json!({
                    "file": d.position.as_ref().map(|p| p.file.clone()),
                    "line": d.position.as_ref().map(|p| p.line),
                    "column": d.position.as_ref().map(|p| p.column),
                    "key": d.key,
                    "message": d.message,
                    "help": d.help,
                    "extended_by": d.extended_by,
                    "rendered": d.to_string(),
                })
            })
            .collect(),
    };
    serde_json::json!({ "valid": false, "recipe": args.recipe, "errors": errors })
}
