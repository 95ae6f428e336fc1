//! Who calls the application and what they may do: an [`Actor`] (subject, tenant, scopes),
//! however a front end authenticated it (a JWT over HTTP, the bus's own identity, a saga).
//!
//! Every authorization rule of the application is here, once: [`Actor::require`] (a scope),
//! [`Actor::require_system_admin`] (an admin of the [`SYSTEM_TENANT`]),
//! [`Actor::require_admin_of`] (a system admin, or an admin of that tenant) and
//! [`Actor::require_scrape`] (metrics). Tenant state (active, suspended) is checked by the
//! tenant registry.

use std::fmt;
use std::str::FromStr;

use tracktrace_core::TenantId;

use crate::error::AppError;

/// The tenant id of the system itself: its admins administer tenants; it owns the registry
/// streams (tenants, schemas, rules, routes, analytics) and can never be created by a client.
pub const SYSTEM_TENANT: &str = "_system";

/// The [`SYSTEM_TENANT`] as a [`TenantId`] (checked at compile time; clones allocate nothing).
pub const SYSTEM_TENANT_ID: TenantId = TenantId::from_static(SYSTEM_TENANT);

/// The [`SYSTEM_TENANT`] as a [`TenantId`].
pub fn system_tenant() -> TenantId {
    SYSTEM_TENANT_ID
}

/// What an actor may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scope {
    /// Capture events.
    EventsWrite,
    /// Read traces and subscribe.
    TraceRead,
    /// Read metrics, KPIs and anomalies.
    MetricsRead,
    /// Administer (tenants, schemas, rules, routes: system admins; analytics: tenant admins).
    Admin,
}

impl Scope {
    /// The scope's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::EventsWrite => "events:write",
            Scope::TraceRead => "trace:read",
            Scope::MetricsRead => "metrics:read",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "events:write" => Scope::EventsWrite,
            "trace:read" => Scope::TraceRead,
            "metrics:read" => Scope::MetricsRead,
            "admin" => Scope::Admin,
            other => {
                return Err(format!(
                    "unknown scope {other:?} (events:write, trace:read, metrics:read, admin)"
                ));
            }
        })
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// Who: the client system or user (recorded as `submittedBy`, the default `source`).
    pub subject: String,
    /// The tenant the actor acts for.
    pub tenant: TenantId,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
}

impl Actor {
    /// An actor of `tenant` named `subject` with `scopes`.
    pub fn new(subject: impl Into<String>, tenant: TenantId, scopes: Vec<Scope>) -> Self {
        Self {
            subject: subject.into(),
            tenant,
            scopes,
        }
    }

    /// Forbidden unless the actor holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), AppError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "the token lacks the {scope} scope"
            )))
        }
    }

    /// Whether this is an administrator of the system tenant.
    pub fn is_system_admin(&self) -> bool {
        self.tenant.as_str() == SYSTEM_TENANT && self.scopes.contains(&Scope::Admin)
    }

    /// Forbidden unless the actor is a system admin; `what` names what needs it.
    pub fn require_system_admin(&self, what: &str) -> Result<(), AppError> {
        if self.is_system_admin() {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "{what}: an admin token of the system tenant is required"
            )))
        }
    }

    /// Forbidden unless the actor is a system admin or an admin of `tenant`.
    pub fn require_admin_of(&self, tenant: &str) -> Result<(), AppError> {
        self.require(Scope::Admin)?;
        if self.is_system_admin() || self.tenant.as_str() == tenant {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "an admin token of tenant {} cannot act for {tenant}",
                self.tenant
            )))
        }
    }

    /// Forbidden unless the actor may read the process metrics: the `metrics:read` scope on a
    /// token of the system tenant (metrics cover every tenant, so a tenant's token may not).
    pub fn require_scrape(&self) -> Result<(), AppError> {
        if self.tenant.as_str() == SYSTEM_TENANT && self.scopes.contains(&Scope::MetricsRead) {
            Ok(())
        } else {
            Err(AppError::Forbidden(format!(
                "/metrics needs a token of the {SYSTEM_TENANT} tenant with the metrics:read scope"
            )))
        }
    }
}

/// Who may administer a tenant (see [`crate::tenants::TenantRegistry::admin_target`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admins<'a> {
    /// System admins only; the string names what needs it (`"partner routes"`).
    System(&'a str),
    /// System admins, and the tenant's own admins.
    SystemOrOwn,
}

impl Actor {
    /// Forbidden unless the actor is one of `admins` of `tenant`.
    pub fn require_admin(&self, admins: Admins<'_>, tenant: &str) -> Result<(), AppError> {
        match admins {
            Admins::System(what) => self.require_system_admin(what),
            Admins::SystemOrOwn => self.require_admin_of(tenant),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(tenant: &str, scopes: &[Scope]) -> Actor {
        Actor::new("t", TenantId::parse(tenant).unwrap(), scopes.to_vec())
    }

    #[test]
    fn admin_rules() {
        let sys = actor(SYSTEM_TENANT, &[Scope::Admin]);
        let acme_admin = actor("acme", &[Scope::Admin]);
        let acme_writer = actor("acme", &[Scope::EventsWrite]);
        assert!(sys.require_system_admin("x").is_ok());
        assert!(acme_admin.require_system_admin("x").is_err());
        assert!(acme_admin.require_admin_of("acme").is_ok());
        assert!(acme_admin.require_admin_of("other").is_err());
        assert!(acme_writer.require_admin_of("acme").is_err());
        assert!(sys.require_admin_of("anyone").is_ok());
        assert!(
            actor(SYSTEM_TENANT, &[Scope::MetricsRead])
                .require_scrape()
                .is_ok()
        );
        assert!(
            actor("acme", &[Scope::MetricsRead])
                .require_scrape()
                .is_err()
        );
        assert_eq!("trace:read".parse::<Scope>(), Ok(Scope::TraceRead));
        assert!("bogus".parse::<Scope>().is_err());
    }
}
