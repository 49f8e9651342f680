//! `cargo xtask deny`: the licence and duplicate-version rules of
//! `deny.toml` (cargo-deny's format), checked offline from `cargo metadata`
//! with nothing to install.
//!
//! Only the packages of the workspace's resolved graph count (metadata's
//! `resolve`, every kind of dependency, for the platforms of
//! `[graph] targets`). A licence expression must be satisfiable from
//! `[licenses] allow` (plus a crate's `[[licenses.exceptions]]`); a crate
//! with only a licence file needs a `[[licenses.clarify]]` expression; a
//! crate in more than one version needs a `[bans] skip` entry for all but
//! one, and a skip entry that matches no duplicate is stale.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

/// Runs the check; every problem is one line on stderr.
pub fn run(root: &Path) -> Result<()> {
    let path = root.join("deny.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config = Config::parse(&text).with_context(|| format!("in {}", path.display()))?;
    let metadata = metadata(root, &config.targets)?;
    let packages = resolved_packages(&metadata)?;
    let mut problems = licence_problems(&config, &packages);
    problems.extend(duplicate_problems(&config, &packages));
    for p in &problems {
        eprintln!("deny: {p}");
    }
    if !problems.is_empty() {
        bail!(
            "{} problem(s) with licences or duplicate crates",
            problems.len()
        );
    }
    eprintln!(
        "xtask: deny: {} packages: licences allowed, no unexpected duplicates",
        packages.len()
    );
    Ok(())
}

/// What `deny.toml` says that this check uses.
#[derive(Debug, Default)]
struct Config {
    targets: Vec<String>,
    allow: BTreeSet<String>,
    /// Crate name to the licences allowed for it alone.
    exceptions: BTreeMap<String, BTreeSet<String>>,
    /// Crate name to the expression to use instead of its own.
    clarify: BTreeMap<String, String>,
    /// Whether duplicates fail (`multiple-versions = "deny"`) or only warn.
    deny_duplicates: bool,
    check_duplicates: bool,
    skip: Vec<Skip>,
}

#[derive(Debug)]
struct Skip {
    name: String,
    /// Without a leading `=`; `None` matches every version.
    version: Option<String>,
}

impl Skip {
    fn matches(&self, version: &str) -> bool {
        match &self.version {
            None => true,
            Some(v) => version == v || version.starts_with(&format!("{v}.")),
        }
    }

    fn describe(&self) -> String {
        match &self.version {
            Some(v) => format!("{}@{v}", self.name),
            None => self.name.clone(),
        }
    }
}

impl Config {
    fn parse(text: &str) -> Result<Self> {
        let doc: toml::Table = text.parse().context("parsing TOML")?;
        let table = |name: &str| doc.get(name).and_then(toml::Value::as_table);
        let mut config = Config::default();
        if let Some(graph) = table("graph") {
            for t in array(graph, "targets") {
                let triple = t
                    .as_str()
                    .or_else(|| t.get("triple").and_then(toml::Value::as_str))
                    .context("a [graph] target is neither a string nor { triple }")?;
                config.targets.push(triple.to_owned());
            }
        }
        if let Some(licenses) = table("licenses") {
            for a in array(licenses, "allow") {
                let id = a.as_str().context("[licenses] allow holds a non-string")?;
                config.allow.insert(id.to_owned());
            }
            for e in array(licenses, "exceptions") {
                let name = crate_name(e).context("a licence exception names no crate")?;
                let allowed = e
                    .get("allow")
                    .and_then(toml::Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(toml::Value::as_str)
                    .map(str::to_owned);
                config.exceptions.entry(name.0).or_default().extend(allowed);
            }
            for c in array(licenses, "clarify") {
                let name = crate_name(c).context("a licence clarification names no crate")?;
                let expr = c
                    .get("expression")
                    .and_then(toml::Value::as_str)
                    .with_context(|| {
                        format!("the clarification of {} has no expression", name.0)
                    })?;
                config.clarify.insert(name.0, expr.to_owned());
            }
        }
        if let Some(bans) = table("bans") {
            let level = bans
                .get("multiple-versions")
                .and_then(toml::Value::as_str)
                .unwrap_or("warn");
            config.check_duplicates = level != "allow";
            config.deny_duplicates = level == "deny";
            for s in array(bans, "skip") {
                let (name, version) =
                    crate_name(s).context("a [bans] skip entry names no crate")?;
                let reason = s.get("reason").and_then(toml::Value::as_str).unwrap_or("");
                if reason.trim().is_empty() {
                    bail!("the [bans] skip entry for {name} gives no reason");
                }
                let version = version.map(|v| v.trim_start_matches('=').trim().to_owned());
                config.skip.push(Skip { name, version });
            }
        }
        Ok(config)
    }
}

fn array<'a>(table: &'a toml::Table, key: &str) -> impl Iterator<Item = &'a toml::Value> {
    table
        .get(key)
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
}

/// A package spec of cargo-deny: `{ name, version }`, `{ crate = "n@v" }`
/// or a string `"n@v"`.
fn crate_name(v: &toml::Value) -> Option<(String, Option<String>)> {
    let spec = match v {
        toml::Value::String(s) => s.as_str(),
        toml::Value::Table(t) => {
            if let Some(name) = t.get("name").and_then(toml::Value::as_str) {
                let version = t.get("version").and_then(toml::Value::as_str);
                return Some((name.to_owned(), version.map(str::to_owned)));
            }
            t.get("crate").and_then(toml::Value::as_str)?
        }
        _ => return None,
    };
    Some(match spec.split_once('@') {
        Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
        None => (spec.to_owned(), None),
    })
}

/// `cargo metadata` from the lock file, offline. The resolve names a few
/// packages a build never fetches (optional dependencies that only a weak
/// feature such as reqwest's `quinn?/ring` names): on a machine whose
/// registry cache lacks one, cargo fetches it (manifests only matter here),
/// still held to Cargo.lock.
fn metadata(root: &Path, targets: &[String]) -> Result<Value> {
    let run = |offline: bool| -> Result<std::process::Output> {
        let mut cmd = Command::new(crate::cargo_bin());
        cmd.current_dir(root)
            .args(["metadata", "--format-version", "1", "--locked"]);
        if offline {
            cmd.arg("--offline");
        }
        for t in targets {
            cmd.args(["--filter-platform", t]);
        }
        cmd.output().context("starting cargo metadata")
    };
    let mut out = run(true)?;
    if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--offline") {
        eprintln!("xtask: deny: packages missing from the registry cache; fetching them");
        out = run(false)?;
    }
    if !out.status.success() {
        bail!(
            "cargo metadata failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")
}

/// One package of the resolved graph.
#[derive(Debug)]
struct Package {
    name: String,
    version: String,
    license: Option<String>,
    license_file: Option<String>,
}

fn resolved_packages(metadata: &Value) -> Result<Vec<Package>> {
    let ids: BTreeSet<&str> = metadata["resolve"]["nodes"]
        .as_array()
        .context("cargo metadata gave no resolve graph")?
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    let text = |p: &Value, key: &str| p[key].as_str().map(str::to_owned);
    Ok(metadata["packages"]
        .as_array()
        .context("cargo metadata gave no packages")?
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| ids.contains(id)))
        .map(|p| Package {
            name: text(p, "name").unwrap_or_default(),
            version: text(p, "version").unwrap_or_default(),
            license: text(p, "license"),
            license_file: text(p, "license_file"),
        })
        .collect())
}

fn licence_problems(config: &Config, packages: &[Package]) -> Vec<String> {
    let mut problems = Vec::new();
    for p in packages {
        let who = format!("{} {}", p.name, p.version);
        let clarified = config.clarify.get(&p.name);
        let Some(expr) = clarified.or(p.license.as_ref()) else {
            problems.push(match &p.license_file {
                Some(f) => format!(
                    "{who}: only a licence file ({f}); give its expression in a \
                     [[licenses.clarify]] entry, with a comment saying why"
                ),
                None => format!("{who}: no licence"),
            });
            continue;
        };
        let parsed = match parse(expr) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{who}: licence {expr:?} does not parse: {e}"));
                continue;
            }
        };
        let extra = config.exceptions.get(&p.name);
        let allowed = |id: &str| config.allow.contains(id) || extra.is_some_and(|e| e.contains(id));
        if !parsed.satisfied(&allowed) {
            problems.push(format!(
                "{who}: licence {expr:?} is not allowed by deny.toml"
            ));
        }
    }
    problems
}

fn duplicate_problems(config: &Config, packages: &[Package]) -> Vec<String> {
    if !config.check_duplicates {
        return Vec::new();
    }
    let mut versions: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in packages {
        versions.entry(&p.name).or_default().insert(&p.version);
    }
    let mut problems = Vec::new();
    for skip in &config.skip {
        let stale = match versions.get(skip.name.as_str()) {
            Some(vs) if vs.len() > 1 => !vs.iter().any(|v| skip.matches(v)),
            _ => true,
        };
        if stale {
            problems.push(format!(
                "[bans] skip {}: matches no duplicate version in the tree (remove or correct the entry)",
                skip.describe()
            ));
        }
    }
    for (name, vs) in &versions {
        let left: Vec<&str> = vs
            .iter()
            .copied()
            .filter(|v| !config.skip.iter().any(|s| s.name == *name && s.matches(v)))
            .collect();
        if vs.len() > 1 && left.len() > 1 {
            let line = format!(
                "{name}: {} versions ({}); skip all but one in deny.toml's [bans] with a reason",
                vs.len(),
                vs.iter().copied().collect::<Vec<_>>().join(", ")
            );
            if config.deny_duplicates {
                problems.push(line);
            } else {
                eprintln!("deny: warning: {line}");
            }
        }
    }
    problems
}

/// An SPDX licence expression.
#[derive(Debug, PartialEq, Eq)]
enum Expr {
    /// A licence id (possibly with `+`, "or any later version").
    Id(String),
    /// `licence WITH exception`.
    With(String, String),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    /// Whether the terms allowed by `allowed` satisfy the expression.
    fn satisfied(&self, allowed: &impl Fn(&str) -> bool) -> bool {
        match self {
            // `X+` is satisfied by X itself.
            Expr::Id(id) => allowed(id) || id.strip_suffix('+').is_some_and(allowed),
            // A licence with an exception is a licence of its own.
            Expr::With(id, exception) => allowed(&format!("{id} WITH {exception}")),
            Expr::And(a, b) => a.satisfied(allowed) && b.satisfied(allowed),
            Expr::Or(a, b) => a.satisfied(allowed) || b.satisfied(allowed),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    And,
    Or,
    With,
    Word(String),
}

fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<Token>| {
        if word.is_empty() {
            return;
        }
        out.push(match word.as_str() {
            "AND" | "and" => Token::And,
            "OR" | "or" => Token::Or,
            "WITH" | "with" => Token::With,
            _ => Token::Word(word.clone()),
        });
        word.clear();
    };
    for c in text.chars() {
        match c {
            '(' | ')' | '/' => {
                flush(&mut word, &mut out);
                out.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    // The legacy `MIT/Apache-2.0` separator means OR.
                    _ => Token::Or,
                });
            }
            c if c.is_whitespace() => flush(&mut word, &mut out),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Parses an expression: OR binds loosest, then AND, then WITH.
fn parse(text: &str) -> Result<Expr, String> {
    let tokens = tokens(text);
    let mut pos = 0;
    let expr = parse_or(&tokens, &mut pos)?;
    match tokens.get(pos) {
        None => Ok(expr),
        Some(t) => Err(format!("unexpected {t:?}")),
    }
}

fn parse_or(tokens: &[Token], pos: &mut usize) -> Result<Expr, String> {
    let mut left = parse_and(tokens, pos)?;
    while tokens.get(*pos) == Some(&Token::Or) {
        *pos += 1;
        left = Expr::Or(Box::new(left), Box::new(parse_and(tokens, pos)?));
    }
    Ok(left)
}

fn parse_and(tokens: &[Token], pos: &mut usize) -> Result<Expr, String> {
    let mut left = parse_with(tokens, pos)?;
    while tokens.get(*pos) == Some(&Token::And) {
        *pos += 1;
        left = Expr::And(Box::new(left), Box::new(parse_with(tokens, pos)?));
    }
    Ok(left)
}

fn parse_with(tokens: &[Token], pos: &mut usize) -> Result<Expr, String> {
    let term = match tokens.get(*pos) {
        Some(Token::Open) => {
            *pos += 1;
            let inner = parse_or(tokens, pos)?;
            if tokens.get(*pos) != Some(&Token::Close) {
                return Err("unclosed parenthesis".to_owned());
            }
            *pos += 1;
            return Ok(inner);
        }
        Some(Token::Word(w)) => {
            *pos += 1;
            w.clone()
        }
        Some(t) => return Err(format!("unexpected {t:?}")),
        None => return Err("unexpected end".to_owned()),
    };
    if tokens.get(*pos) != Some(&Token::With) {
        return Ok(Expr::Id(term));
    }
    *pos += 1;
    match tokens.get(*pos) {
        Some(Token::Word(exception)) => {
            *pos += 1;
            Ok(Expr::With(term, exception.clone()))
        }
        _ => Err(format!("{term} WITH names no exception")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(expr: &str, allow: &[&str]) -> bool {
        parse(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .satisfied(&|id: &str| allow.contains(&id))
    }

    #[test]
    fn or_needs_one_and_needs_both() {
        assert!(ok("MIT OR Apache-2.0", &["Apache-2.0"]));
        assert!(!ok("MIT OR Apache-2.0", &["ISC"]));
        assert!(ok("MIT AND BSD-3-Clause", &["MIT", "BSD-3-Clause"]));
        assert!(!ok("MIT AND BSD-3-Clause", &["MIT"]));
        assert!(ok("Apache-2.0 OR ISC OR MIT", &["ISC"]));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        // (MIT AND ISC) OR Zlib
        assert!(ok("MIT AND ISC OR Zlib", &["Zlib"]));
        assert!(!ok("MIT AND ISC OR Zlib", &["MIT"]));
        // MIT AND (ISC OR Zlib)
        assert!(ok("MIT AND (ISC OR Zlib)", &["MIT", "Zlib"]));
        assert!(!ok("MIT AND (ISC OR Zlib)", &["ISC", "Zlib"]));
        assert!(ok(
            "(MIT OR Apache-2.0) AND Unicode-3.0",
            &["MIT", "Unicode-3.0"]
        ));
        assert!(!ok("(MIT OR Apache-2.0) AND Unicode-3.0", &["MIT"]));
    }

    #[test]
    fn legacy_slash_means_or() {
        assert!(ok("MIT/Apache-2.0", &["Apache-2.0"]));
        assert!(ok("Apache-2.0 / MIT", &["MIT"]));
        assert!(!ok("MIT/Apache-2.0", &["ISC"]));
    }

    #[test]
    fn with_needs_the_exception_allowed() {
        let e = "Apache-2.0 WITH LLVM-exception";
        assert!(!ok(e, &["Apache-2.0"]));
        assert!(ok(e, &["Apache-2.0 WITH LLVM-exception"]));
        assert!(ok(
            "Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT",
            &["MIT"]
        ));
        assert_eq!(
            parse(e),
            Ok(Expr::With("Apache-2.0".into(), "LLVM-exception".into()))
        );
    }

    #[test]
    fn or_later_is_satisfied_by_the_version() {
        assert!(ok("GPL-2.0+", &["GPL-2.0"]));
        assert!(!ok("GPL-2.0+", &["MIT"]));
    }

    #[test]
    fn malformed_expressions_are_errors() {
        for bad in [
            "",
            "MIT OR",
            "(MIT",
            "MIT)",
            "MIT AND AND ISC",
            "MIT WITH",
            "OR MIT",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn config_reads_cargo_deny_format() {
        let config = Config::parse(
            r#"
            [graph]
            targets = ["x86_64-unknown-linux-gnu", { triple = "bpfel-unknown-none" }]
            [licenses]
            allow = ["MIT"]
            exceptions = [{ name = "ring", allow = ["OpenSSL"] }]
            [[licenses.clarify]]
            crate = "ring"
            expression = "MIT AND OpenSSL"
            [bans]
            multiple-versions = "deny"
            skip = [
                { name = "syn", version = "=1.0.109", reason = "old macros" },
                { crate = "base64@0.21", reason = "x" },
            ]
            "#,
        )
        .unwrap();
        assert_eq!(config.targets.len(), 2);
        assert!(config.deny_duplicates);
        assert_eq!(config.clarify["ring"], "MIT AND OpenSSL");
        let packages = [
            pkg("ring", None),
            pkg("syn", Some("MIT")),
            pkg("foo", Some("GPL-3.0")),
        ];
        let problems = licence_problems(&config, &packages);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("foo "));
        assert!(config.skip[0].matches("1.0.109"));
        assert!(config.skip[1].matches("0.21.7"));
        assert!(!config.skip[1].matches("0.22.1"));
    }

    #[test]
    fn skips_must_have_reasons() {
        let e = Config::parse("[bans]\nskip = [{ name = \"syn\", version = \"=1\" }]");
        assert!(e.is_err());
    }

    #[test]
    fn duplicates_and_stale_skips_fail() {
        let config = Config::parse(
            r#"
            [bans]
            multiple-versions = "deny"
            skip = [
                { name = "syn", version = "=1.0.109", reason = "a" },
                { name = "gone", version = "=1.0.0", reason = "b" },
            ]
            "#,
        )
        .unwrap();
        let mut packages = vec![
            versioned("syn", "1.0.109"),
            versioned("syn", "2.0.1"),
            versioned("hashbrown", "0.14.0"),
            versioned("hashbrown", "0.15.0"),
            versioned("gone", "1.0.0"),
        ];
        let problems = duplicate_problems(&config, &packages);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("gone@1.0.0"));
        assert!(problems[1].starts_with("hashbrown: 2 versions"));
        packages.retain(|p| p.name != "hashbrown");
        packages.push(versioned("gone", "2.0.0"));
        assert!(duplicate_problems(&config, &packages).is_empty());
    }

    fn pkg(name: &str, license: Option<&str>) -> Package {
        Package {
            name: name.into(),
            version: "1.0.0".into(),
            license: license.map(Into::into),
            license_file: license.is_none().then(|| "LICENSE".into()),
        }
    }

    fn versioned(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            license: Some("MIT".into()),
            license_file: None,
        }
    }
}
