//! Fleet node names and labels, and etcd endpoint lists, as given on the
//! command line and in `[serve]` (input, checked before anything runs).
/// A node name: 1 to 64 of A-Z a-z 0-9 . _ - (a host name fits).
pub fn valid_node(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A label `KEY=VALUE`: keys and values 1 to 63 of A-Z a-z 0-9 . _ - /.
pub fn check_label(k: &str, v: &str) -> Result<(), String> {
    let ok = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    if ok(k) && ok(v) {
        Ok(())
    } else {
        Err(format!(
            "label {k:?}={v:?}: keys and values are 1 to 63 of A-Z a-z 0-9 . _ - /"
        ))
    }
}

/// Parses `KEY=VALUE`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?}: KEY=VALUE"))?;
    check_label(k, v)?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Endpoints from `URL[,URL...]`: each `http://HOST:PORT` or
/// `https://HOST:PORT`.
pub fn parse_etcd_endpoints(s: &str) -> Result<Vec<String>, String> {
    let eps: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if eps.is_empty() {
        return Err("no etcd endpoint".into());
    }
    for e in &eps {
        let bad = || format!("{e:?}: an etcd endpoint is http://HOST:PORT or https://HOST:PORT");
        let rest = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .ok_or_else(bad)?;
        if rest.is_empty() || rest.contains('/') || rest.chars().any(char::is_whitespace) {
            return Err(bad());
        }
    }
    Ok(eps)
}
