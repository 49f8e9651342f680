//! What to change so that the installed rules' named part equals a file's.
use super::{Config, NamedRule, FLEET_PREFIX};
use crate::rule::Rule;

/// One step of bringing the installed rules to the file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Step {
    /// A named rule the file has and the kernel not.
    Add { rule: Rule },
    /// A named rule whose match, values or tracking differ.
    Change { from: Rule, to: Rule },
    /// A named rule the file no longer has.
    Remove { rule: Rule },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |r: &Rule| {
            format!(
                "{} idle {} count {} interval {}{}{}",
                r.describe_match(),
                r.idle,
                r.count,
                r.interval,
                r.user_timeout_ms
                    .map(|ms| format!(" user-timeout {ms}"))
                    .unwrap_or_default(),
                if r.tracked { " tracked" } else { "" }
            )
        };
        let name = |r: &Rule| r.name.clone().unwrap_or_default();
        match self {
            Step::Add { rule } => write!(f, "+ {}: {}", name(rule), show(rule)),
            Step::Change { from, to } => {
                write!(f, "~ {}: {} -> {}", name(to), show(from), show(to))
            }
            Step::Remove { rule } => write!(f, "- {}: {}", name(rule), show(rule)),
        }
    }
}

/// What to do so that the installed rules' named part equals `wanted`:
/// rules without a name (added by hand) and the fleet's (named
/// [`FLEET_PREFIX`]...) are not touched. Fails, changing nothing, when a
/// wanted rule has the match of a rule added by hand.
pub fn plan(installed: &[Rule], wanted: &Config) -> Result<Vec<Step>, String> {
    let fleet = |r: &Rule| {
        r.name
            .as_deref()
            .is_some_and(|n| n.starts_with(FLEET_PREFIX))
    };
    // The host's own rule wins: a fleet rule with the match of a wanted
    // rule goes first (its agent reports the clash).
    let (yielding, rest): (Vec<Rule>, Vec<Rule>) = installed
        .iter()
        .cloned()
        .partition(|r| fleet(r) && wanted.rules.iter().any(|w| w.matcher == r.matcher()));
    let mut steps: Vec<Step> = yielding
        .into_iter()
        .map(|rule| Step::Remove { rule })
        .collect();
    steps.extend(plan_owned(&rest, wanted, |name| {
        !name.starts_with(FLEET_PREFIX)
    })?);
    Ok(steps)
}

/// A file's rule as the kernel's table would hold it, with id `id`.
fn to_rule(w: &NamedRule, id: u32) -> Rule {
    let mut r = Rule::new(id, w.matcher, w.policy, w.tracked);
    r.new_only = w.new_only;
    r.name = Some(w.name.clone());
    r
}

/// A file's rules as `apply` would add them to an empty table (id 0).
pub fn file_rules(wanted: &Config) -> Vec<Rule> {
    wanted.rules.iter().map(|w| to_rule(w, 0)).collect()
}

/// [`plan`] for the named rules `owned` says are the caller's: only those
/// are changed or removed.
pub fn plan_owned(
    installed: &[Rule],
    wanted: &Config,
    owned: impl Fn(&str) -> bool,
) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for w in &wanted.rules {
        let current = installed
            .iter()
            .find(|r| r.name.as_deref() == Some(&w.name));
        if let Some(by_hand) = installed
            .iter()
            .find(|r| r.name.is_none() && r.matcher() == w.matcher)
        {
            return Err(format!(
                "rule {:?} has the match of rule {} ({}), added by hand: delete that one first (`tcpka rule del {}`)",
                w.name,
                by_hand.id,
                by_hand.describe_match(),
                by_hand.id
            ));
        }
        match current {
            None => steps.push(Step::Add {
                rule: to_rule(w, 0),
            }),
            Some(c) => {
                let want = to_rule(w, c.id);
                if *c != want {
                    steps.push(Step::Change {
                        from: c.clone(),
                        to: want,
                    });
                }
            }
        }
    }
    for r in installed {
        if let Some(name) = r.name.as_deref().filter(|n| owned(n)) {
            if !wanted.rules.iter().any(|w| w.name == name) {
                steps.push(Step::Remove { rule: r.clone() });
            }
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::Policy, rule::RuleMatch};

    fn installed(id: u32, name: Option<&str>, lp: u16, idle: u32) -> Rule {
        let m = RuleMatch {
            local_port: Some(lp),
            ..Default::default()
        };
        let mut r = Rule::new(id, m, Policy::new(idle, 5, 5, None).unwrap(), false);
        r.name = name.map(str::to_owned);
        r
    }

    #[test]
    fn plan_adds_changes_removes_by_name_and_keeps_hand_rules() {
        let wanted = Config::parse(
            "[[rule]]\nname = \"keep\"\nlocal_port = 1\nidle = 60\ncount = 5\ninterval = 5\n\
             [[rule]]\nname = \"change\"\nlocal_port = 2\nidle = 61\ncount = 5\ninterval = 5\n\
             [[rule]]\nname = \"new\"\nlocal_port = 3\nidle = 60\ncount = 5\ninterval = 5\n",
            "t.toml",
        )
        .unwrap();
        let have = [
            installed(1, Some("keep"), 1, 60),
            installed(2, Some("change"), 2, 60),
            installed(3, Some("gone"), 4, 60),
            installed(4, None, 5, 60),
        ];
        let steps = plan(&have, &wanted).unwrap();
        let shown: Vec<String> = steps.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "~ change: --local-port 2 idle 60 count 5 interval 5 -> --local-port 2 idle 61 count 5 interval 5",
                "+ new: --local-port 3 idle 60 count 5 interval 5",
                "- gone: --local-port 4 idle 60 count 5 interval 5",
            ]
        );
        // Applied, nothing is left to do.
        let after = [
            installed(1, Some("keep"), 1, 60),
            installed(2, Some("change"), 2, 61),
            installed(5, Some("new"), 3, 60),
            installed(4, None, 5, 60),
        ];
        assert_eq!(plan(&after, &wanted).unwrap(), []);
        // A wanted rule with the match of a hand-made one is refused.
        let clash = [installed(9, None, 3, 60)];
        let e = plan(&clash, &wanted).unwrap_err();
        assert!(e.contains("rule \"new\" has the match of rule 9"), "{e}");
    }

    #[test]
    fn a_files_rule_wins_over_a_fleet_rule_with_its_match() {
        let wanted = Config::parse(
            "[[rule]]\nname = \"mine\"\nlocal_port = 1\nidle = 60\ncount = 5\ninterval = 5\n",
            "t.toml",
        )
        .unwrap();
        let fleet = installed(3, Some("@theirs"), 1, 30);
        let other = installed(4, Some("@other"), 2, 30);
        let steps = plan(&[fleet.clone(), other], &wanted).unwrap();
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(steps[0], Step::Remove { rule: fleet });
        assert!(matches!(&steps[1], Step::Add { rule } if rule.name.as_deref() == Some("mine")));
    }
}
