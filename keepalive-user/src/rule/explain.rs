//! `tcpka rule explain`: which rule a new connection gets, and why, by the
//! precedence sock_ops applies.
use super::Rule;

/// What one rule does with a connection, for `rule explain`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    pub id: u32,
    /// The match, in `rule add` terms.
    #[serde(rename = "match")]
    pub matcher: String,
    pub matches: bool,
    /// Why not, when it does not match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

/// Which rule the kernel applies to a new connection between `local` and
/// `remote`, and why, by the same precedence as sock_ops (more fields set,
/// then the longer `--remote` prefix, then the older rule).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    pub local: std::net::SocketAddr,
    pub remote: std::net::SocketAddr,
    pub rules: Vec<Verdict>,
    /// The rule that applies, if any.
    pub winner: Option<Rule>,
    /// Why it wins over the next best match.
    pub reason: String,
}

/// The kernel's order of matching rules: the highest rank first; among
/// equal ranks the lower id.
fn precedence(a: &Rule, b: &Rule) -> std::cmp::Ordering {
    b.rank().cmp(&a.rank()).then(a.id.cmp(&b.id))
}

/// The rule of `rules` that decides a connection from local port
/// `local_port` to `remote`, as sock_ops picks it.
pub fn best(rules: &[Rule], local_port: u16, remote: std::net::SocketAddr) -> Option<&Rule> {
    rules
        .iter()
        .filter(|r| r.mismatch(local_port, remote).is_none())
        .min_by(|a, b| precedence(a, b))
}

/// Explains which of `rules` a new connection `local` -> `remote` gets.
pub fn explain(
    rules: &[Rule],
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> Explanation {
    let verdicts = rules
        .iter()
        .map(|r| {
            let why_not = r.mismatch(local.port(), remote);
            Verdict {
                id: r.id,
                matcher: r.describe_match(),
                matches: why_not.is_none(),
                why_not,
            }
        })
        .collect();
    let mut matching: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.mismatch(local.port(), remote).is_none())
        .collect();
    matching.sort_by(|a, b| precedence(a, b));
    let reason = match matching.as_slice() {
        [] => "no rule matches: the connection keeps its own settings".to_owned(),
        [only] => format!("rule {} is the only one that matches", only.id),
        [first, second, ..] => {
            let (f, s) = (first.matcher(), second.matcher());
            let (nf, ns) = (f.fields().count_ones(), s.fields().count_ones());
            let why = if nf != ns {
                format!("more fields set ({nf} against {ns})")
            } else if first.rank() != second.rank() {
                format!(
                    "as many fields set, and a longer --remote prefix ({} against {})",
                    f.remote.map_or("none".into(), |c| c.to_string()),
                    s.remote.map_or("none".into(), |c| c.to_string())
                )
            } else {
                "as specific, and older".to_owned()
            };
            format!("rule {} wins over rule {}: {why}", first.id, second.id)
        }
    };
    Explanation {
        local,
        remote,
        rules: verdicts,
        winner: matching.first().map(|r| (*r).clone()),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::Policy, rule::RuleMatch};

    fn rule(id: u32, lp: Option<u16>, rp: Option<u16>, remote: Option<&str>) -> Rule {
        Rule::new(
            id,
            RuleMatch {
                local_port: lp,
                remote_port: rp,
                remote: remote.map(|c| c.parse().unwrap()),
            },
            Policy::new(id, 3, 5, None).unwrap(),
            true,
        )
    }

    #[test]
    fn explain_follows_the_kernel_precedence() {
        let local = "10.0.0.1:5060".parse().unwrap();
        let remote = "10.1.2.3:40000".parse().unwrap();
        let rules = [
            rule(1, None, None, None),
            rule(2, Some(5060), None, None),
            rule(3, None, None, Some("10.0.0.0/8")),
            rule(4, None, None, Some("10.1.0.0/16")),
            rule(5, Some(5061), None, None),
            rule(6, None, Some(40000), Some("192.168.0.0/16")),
        ];
        let e = explain(&rules, local, remote);
        // Port and address rules both have one field: the /16 prefix wins.
        assert_eq!(e.winner.as_ref().map(|r| r.id), Some(4));
        assert_eq!(best(&rules, 5060, remote).map(|r| r.id), Some(4));
        assert_eq!(best(&rules[..2], 5060, remote).map(|r| r.id), Some(2));
        assert_eq!(best(&rules[4..5], 5060, remote).map(|r| r.id), None);
        assert_eq!(e.reason, "rule 4 wins over rule 3: as many fields set, and a longer --remote prefix (10.1.0.0/16 against 10.0.0.0/8)");
        let why: Vec<_> = e.rules.iter().map(|v| (v.id, v.matches)).collect();
        assert_eq!(
            why,
            [
                (1, true),
                (2, true),
                (3, true),
                (4, true),
                (5, false),
                (6, false)
            ]
        );
        assert_eq!(
            e.rules[4].why_not.as_deref(),
            Some("local port 5060 is not 5061")
        );
        assert_eq!(
            e.rules[5].why_not.as_deref(),
            Some("remote address 10.1.2.3 is not in 192.168.0.0/16")
        );
        // Two fields beat one.
        let more = [rules[3].clone(), rule(7, Some(5060), Some(40000), None)];
        let e = explain(&more, local, remote);
        assert_eq!(e.winner.map(|r| r.id), Some(7));
        assert_eq!(
            e.reason,
            "rule 7 wins over rule 4: more fields set (2 against 1)"
        );
        // Equal: the older one.
        let same = [
            rule(9, Some(5060), None, None),
            rule(8, None, Some(40000), None),
        ];
        assert_eq!(explain(&same, local, remote).winner.map(|r| r.id), Some(8));
        // An IPv4 rule matches an IPv4-mapped IPv6 peer.
        let mapped = "[::ffff:10.1.2.3]:40000".parse().unwrap();
        assert_eq!(
            explain(&rules[2..3], local, mapped).winner.map(|r| r.id),
            Some(3)
        );
        assert_eq!(
            explain(&[], local, remote).reason,
            "no rule matches: the connection keeps its own settings"
        );
    }
}
