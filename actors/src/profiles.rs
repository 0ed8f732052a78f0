//! Which keys sign a job: its signing profile, refined per tenant and per plan, and the
//! assignments operators make at runtime (`keys rotate`) on top of the configuration.
//!
//! For a job of tenant `t` on plan `p` asking for profile `P`, the first of these that
//! names keys wins: `P` for tenant `t`, then `P` for plan `p`, then `P` itself. At each of
//! the three scopes a runtime assignment replaces what the configuration says, so rotating
//! the shared key of `P` leaves a tenant with keys of its own alone.
//!
//! A profile is also an entitlement: it may name the tenants (`allow_tenants`) and the plans
//! (`allow_plans`) that may use it. [`ProfileTable::permit`] decides that once the plan is
//! known (from the verified licence), before anything is claimed or charged.

use std::collections::{BTreeSet, HashMap};

use crate::policy::SigningPolicy;
use serde::{Deserialize, Serialize};

/// Where an assignment of keys applies within a profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Scope {
    /// One tenant's jobs.
    Tenant(String),
    /// The jobs of every tenant on one plan (the plan of its Proof-of-Entitlement).
    Plan(String),
    /// Every other job of the profile.
    Profile,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Tenant(t) => write!(f, "tenant {t}"),
            Scope::Plan(p) => write!(f, "plan {p}"),
            Scope::Profile => f.write_str("profile"),
        }
    }
}

/// Runtime key assignments (rotations), shared by every replica.
pub trait KeyAssignments: Send + Sync {
    /// The keys assigned to `profile` at `scope`, if an operator assigned any.
    fn assigned(&self, profile: &str, scope: &Scope) -> Option<Vec<String>>;
}

/// No runtime assignments: the configuration alone decides.
pub struct NoAssignments;

impl KeyAssignments for NoAssignments {
    fn assigned(&self, _: &str, _: &Scope) -> Option<Vec<String>> {
        None
    }
}

/// One profile as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileKeys {
    /// The keys of the profile (one signature each, in order).
    pub keys: Vec<String>,
    /// Tenant -> its own keys for this profile.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub tenants: HashMap<String, Vec<String>>,
    /// Plan -> the keys for this profile's jobs on that plan.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub plans: HashMap<String, Vec<String>>,
    /// The tenants that may use the profile; `None`: every tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_tenants: Option<BTreeSet<String>>,
    /// The plans whose tenants may use the profile; `None`: every plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plans: Option<BTreeSet<String>>,
    /// What the profile signs: predicate types, the policy of report predicates.
    #[serde(default, skip_serializing_if = "SigningPolicy::is_open")]
    pub signs: SigningPolicy,
}

/// Why a job may not use the profile it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileRefusal {
    /// No such profile (the request is wrong, not the caller's entitlement).
    #[error("unknown signing profile {0:?}")]
    Unknown(String),
    /// The profile names the tenants that may use it, and this one is not among them.
    #[error("signing profile {profile:?} is not available to tenant {tenant:?}")]
    Tenant { profile: String, tenant: String },
    /// The profile names the plans that may use it, and the job's plan is not among them.
    #[error("signing profile {profile:?} is not available on plan {plan:?}")]
    Plan { profile: String, plan: String },
}

impl ProfileKeys {
    /// Whether a job of `tenant` on `plan` may use the profile: each allow list that is set
    /// must name it (both set: the tenant must be listed *and* its plan must be).
    fn admits(&self, profile: &str, tenant: &str, plan: &str) -> Result<(), ProfileRefusal> {
        if let Some(tenants) = &self.allow_tenants
            && !tenants.contains(tenant)
        {
            return Err(ProfileRefusal::Tenant {
                profile: profile.to_owned(),
                tenant: tenant.to_owned(),
            });
        }
        if let Some(plans) = &self.allow_plans
            && !plans.contains(plan)
        {
            return Err(ProfileRefusal::Plan {
                profile: profile.to_owned(),
                plan: plan.to_owned(),
            });
        }
        Ok(())
    }

    fn at(&self, scope: &Scope) -> Option<&Vec<String>> {
        match scope {
            Scope::Tenant(t) => self.tenants.get(t),
            Scope::Plan(p) => self.plans.get(p),
            Scope::Profile => Some(&self.keys),
        }
    }

    /// Every key name the profile mentions.
    pub fn key_names(&self) -> impl Iterator<Item = &String> {
        self.keys
            .iter()
            .chain(self.tenants.values().flatten())
            .chain(self.plans.values().flatten())
    }
}

/// The configured profiles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProfileTable {
    profiles: HashMap<String, ProfileKeys>,
}

/// The keys chosen for a job, and the scope that chose them (for logs and audit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub keys: Vec<String>,
    pub scope: Scope,
    /// Whether a runtime assignment (not the configuration) chose them.
    pub assigned: bool,
}

impl ProfileTable {
    pub fn new(profiles: HashMap<String, ProfileKeys>) -> Self {
        ProfileTable { profiles }
    }

    pub fn contains(&self, profile: &str) -> bool {
        self.profiles.contains_key(profile)
    }

    /// What `profile` signs; `None` for a profile that does not exist.
    pub fn signing_policy(&self, profile: &str) -> Option<&SigningPolicy> {
        self.profiles.get(profile).map(|p| &p.signs)
    }

    pub fn get(&self, profile: &str) -> Option<&ProfileKeys> {
        self.profiles.get(profile)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &ProfileKeys)> {
        self.profiles.iter()
    }

    /// What the configuration alone says at exactly `scope` of `profile`.
    pub fn configured_at(&self, profile: &str, scope: &Scope) -> Option<Vec<String>> {
        self.profiles.get(profile)?.at(scope).cloned()
    }

    /// Every key name some job can be signed with: the configuration with `assignments`
    /// (profile, scope, keys) replacing it scope by scope.
    pub fn effective_key_names<'a>(
        &'a self,
        assignments: &'a [(String, Scope, Vec<String>)],
    ) -> std::collections::HashSet<&'a str> {
        let assigned = |profile: &str, scope: &Scope| {
            assignments
                .iter()
                .any(|(p, s, _)| p == profile && s == scope)
        };
        let mut names = std::collections::HashSet::new();
        for (profile, keys) in &self.profiles {
            let configured = std::iter::once((Scope::Profile, &keys.keys))
                .chain(
                    keys.tenants
                        .iter()
                        .map(|(t, k)| (Scope::Tenant(t.clone()), k)),
                )
                .chain(keys.plans.iter().map(|(p, k)| (Scope::Plan(p.clone()), k)));
            for (scope, keys) in configured {
                if !assigned(profile, &scope) {
                    names.extend(keys.iter().map(String::as_str));
                }
            }
        }
        for (_, _, keys) in assignments {
            names.extend(keys.iter().map(String::as_str));
        }
        names
    }

    /// Whether a job of `tenant` on `plan` (the plan of its verified licence) may use
    /// `profile`. Runtime key assignments do not change who may use a profile.
    pub fn permit(&self, profile: &str, tenant: &str, plan: &str) -> Result<(), ProfileRefusal> {
        self.profiles
            .get(profile)
            .ok_or_else(|| ProfileRefusal::Unknown(profile.to_owned()))?
            .admits(profile, tenant, plan)
    }

    /// The keys that sign a job of `tenant` (on `plan`) asking for `profile`; `None` for a
    /// profile that does not exist. Who may use the profile is [`permit`](Self::permit)'s
    /// question, asked first.
    pub fn select(
        &self,
        profile: &str,
        tenant: &str,
        plan: Option<&str>,
        assignments: &dyn KeyAssignments,
    ) -> Option<Selection> {
        let configured = self.profiles.get(profile)?;
        let scopes = [
            Some(Scope::Tenant(tenant.to_string())),
            plan.map(|p| Scope::Plan(p.to_string())),
            Some(Scope::Profile),
        ];
        for scope in scopes.into_iter().flatten() {
            if let Some(keys) = assignments.assigned(profile, &scope) {
                return Some(Selection {
                    keys,
                    scope,
                    assigned: true,
                });
            }
            if let Some(keys) = configured.at(&scope) {
                return Some(Selection {
                    keys: keys.clone(),
                    scope,
                    assigned: false,
                });
            }
        }
        None
    }
}

/// Profiles without tenant or plan refinements, from `profile -> keys`.
impl From<HashMap<String, Vec<String>>> for ProfileTable {
    fn from(map: HashMap<String, Vec<String>>) -> Self {
        ProfileTable::new(
            map.into_iter()
                .map(|(name, keys)| {
                    (
                        name,
                        ProfileKeys {
                            keys,
                            ..ProfileKeys::default()
                        },
                    )
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn table() -> ProfileTable {
        let default = ProfileKeys {
            keys: names(&["shared"]),
            tenants: [("acme".to_string(), names(&["acme-hsm"]))].into(),
            plans: [("enterprise".to_string(), names(&["ent", "shared"]))].into(),
            ..ProfileKeys::default()
        };
        ProfileTable::new([("default".to_string(), default)].into())
    }

    #[derive(Default)]
    struct Runtime(Mutex<HashMap<(String, Scope), Vec<String>>>);

    impl KeyAssignments for Runtime {
        fn assigned(&self, profile: &str, scope: &Scope) -> Option<Vec<String>> {
            self.0
                .lock()
                .unwrap()
                .get(&(profile.to_string(), scope.clone()))
                .cloned()
        }
    }

    #[test]
    fn tenant_beats_plan_beats_profile() {
        let t = table();
        let pick = |tenant, plan| t.select("default", tenant, plan, &NoAssignments).unwrap();
        assert_eq!(pick("acme", Some("enterprise")).keys, names(&["acme-hsm"]));
        assert_eq!(pick("acme", None).scope, Scope::Tenant("acme".into()));
        let ent = pick("globex", Some("enterprise"));
        assert_eq!(
            (ent.keys, ent.scope),
            (names(&["ent", "shared"]), Scope::Plan("enterprise".into()))
        );
        assert_eq!(pick("globex", Some("free")).keys, names(&["shared"]));
        assert_eq!(pick("globex", None).scope, Scope::Profile);
        assert!(t.select("nope", "acme", None, &NoAssignments).is_none());
    }

    #[test]
    fn a_rotation_replaces_its_scope_only() {
        let t = table();
        let rt = Runtime::default();
        rt.0.lock()
            .unwrap()
            .insert(("default".into(), Scope::Profile), names(&["shared-2027"]));
        let s = t.select("default", "globex", Some("free"), &rt).unwrap();
        assert_eq!((s.keys, s.assigned), (names(&["shared-2027"]), true));
        // the plan and tenant refinements of the configuration still apply
        let s = t
            .select("default", "globex", Some("enterprise"), &rt)
            .unwrap();
        assert_eq!(s.keys, names(&["ent", "shared"]));
        assert_eq!(
            t.select("default", "acme", None, &rt).unwrap().keys,
            names(&["acme-hsm"])
        );
        // a tenant rotated at runtime gets its new key
        rt.0.lock().unwrap().insert(
            ("default".into(), Scope::Tenant("acme".into())),
            names(&["acme-2027"]),
        );
        assert_eq!(
            t.select("default", "acme", Some("enterprise"), &rt)
                .unwrap()
                .keys,
            names(&["acme-2027"])
        );
    }

    fn set(v: &[&str]) -> Option<BTreeSet<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    fn restricted() -> ProfileTable {
        let open = ProfileKeys {
            keys: names(&["shared"]),
            ..ProfileKeys::default()
        };
        let by_plan = ProfileKeys {
            keys: names(&["shared", "ent"]),
            allow_plans: set(&["enterprise"]),
            ..ProfileKeys::default()
        };
        let by_tenant = ProfileKeys {
            keys: names(&["acme-hsm"]),
            allow_tenants: set(&["acme"]),
            ..ProfileKeys::default()
        };
        let both = ProfileKeys {
            keys: names(&["acme-hsm", "ent"]),
            allow_tenants: set(&["acme", "initech"]),
            allow_plans: set(&["enterprise"]),
            ..ProfileKeys::default()
        };
        ProfileTable::new(
            [
                ("default".to_string(), open),
                ("multi".to_string(), by_plan),
                ("acme-only".to_string(), by_tenant),
                ("both".to_string(), both),
            ]
            .into(),
        )
    }

    #[test]
    fn a_profile_without_allow_lists_is_open_to_everyone() {
        let t = restricted();
        assert_eq!(t.permit("default", "anyone", "free"), Ok(()));
        assert_eq!(t.permit("default", "anyone", ""), Ok(()));
    }

    #[test]
    fn allow_plans_admits_listed_plans_only() {
        let t = restricted();
        assert_eq!(t.permit("multi", "globex", "enterprise"), Ok(()));
        assert_eq!(
            t.permit("multi", "globex", "team"),
            Err(ProfileRefusal::Plan {
                profile: "multi".into(),
                plan: "team".into()
            })
        );
        // no plan (e.g. one the licence did not name) is not a listed plan
        assert!(t.permit("multi", "globex", "").is_err());
        // plan names are compared exactly
        assert!(t.permit("multi", "globex", "Enterprise").is_err());
    }

    #[test]
    fn allow_tenants_admits_listed_tenants_only() {
        let t = restricted();
        assert_eq!(t.permit("acme-only", "acme", "free"), Ok(()));
        assert_eq!(
            t.permit("acme-only", "globex", "enterprise"),
            Err(ProfileRefusal::Tenant {
                profile: "acme-only".into(),
                tenant: "globex".into()
            })
        );
    }

    #[test]
    fn both_lists_must_admit_the_job() {
        let t = restricted();
        assert_eq!(t.permit("both", "initech", "enterprise"), Ok(()));
        assert!(matches!(
            t.permit("both", "initech", "team"),
            Err(ProfileRefusal::Plan { .. })
        ));
        assert!(matches!(
            t.permit("both", "globex", "enterprise"),
            Err(ProfileRefusal::Tenant { .. })
        ));
        assert_eq!(
            t.permit("nope", "acme", "enterprise"),
            Err(ProfileRefusal::Unknown("nope".into()))
        );
    }

    #[test]
    fn a_rotation_does_not_open_a_restricted_profile() {
        // Runtime assignments change the keys, never who may use the profile: permit does
        // not look at them, and select still picks the assigned keys for permitted jobs.
        let t = restricted();
        let rt = Runtime::default();
        rt.0.lock()
            .unwrap()
            .insert(("multi".into(), Scope::Profile), names(&["shared-2027"]));
        assert!(t.permit("multi", "globex", "team").is_err());
        let s = t
            .select("multi", "globex", Some("enterprise"), &rt)
            .unwrap();
        assert_eq!(s.keys, names(&["shared-2027"]));
    }

    #[test]
    fn allow_lists_survive_the_key_bucket_round_trip() {
        // The table is stored as JSON in the key bucket for other replicas and the CLI.
        let t = restricted();
        let json = serde_json::to_string(&t).unwrap();
        let back: ProfileTable = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        // a table written before allow lists existed still reads, open to everyone
        let old: ProfileTable = serde_json::from_str(r#"{"default":{"keys":["k"]}}"#).unwrap();
        assert_eq!(old.permit("default", "x", "y"), Ok(()));
    }
}
