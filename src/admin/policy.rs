//! Segregation and dual-control policy: decisions only, from the server's
//! settings and facts about roles that the caller looks up.
//!
//! - Key segregation (the guide's `segregation_matrix`): a master key's name
//!   must carry the environment's key prefix.
//! - Dual control (PCI DSS "split knowledge and dual control"): where the
//!   environment requires approval, operations that destroy, rotate or grant
//!   run only when a second person approves them. "Second person" is checked,
//!   not assumed:
//!   - the approver is another login than the requester;
//!   - no membership on the approver's path to `byok_admin` was granted by the
//!     requester (or a role the requester belongs to): whoever hands out
//!     byok_admin cannot approve through the roles they handed it to;
//!   - a holder of `CREATEROLE` can mint logins and give them byok_admin, so
//!     neither requester nor approver may hold it, nor may both owe their
//!     byok_admin to the same CREATEROLE holder (two logins one person made),
//!     unless a superuser names the approvers explicitly
//!     (`byok.dual_control_approvers`): then only those roles approve, and who
//!     else can create roles no longer matters.
//!
//! A superuser can always act alone (and change any of this): superusers are
//! trusted by byok_pg's threat model.

use crate::errors::ByokError;
use crate::gucs;

/// Whether operations that need approval, called directly now, are refused.
/// (Background workers acting on policy administrators configured — scheduled
/// rotation, the encryption budget — run their operations as
/// `Origin::Policy`, which never asks; anything else in a worker is held to
/// the same rule as a session.)
pub fn dual_control_applies() -> bool {
    gucs::segregation_policy().approval_required
}

/// A master key's name as segregation sees it: the last `/`-separated segment of
/// its id (an AWS alias or ARN, a GCP resource name, a Vault or Azure key name).
fn key_name(master_key_id: &str) -> &str {
    master_key_id.rsplit('/').next().unwrap_or(master_key_id)
}

/// Refuses a master key that does not carry the environment's key prefix.
pub fn check_key_prefix(master_key_id: &str) -> Result<(), ByokError> {
    let policy = gucs::segregation_policy();
    if policy.key_prefix.is_empty() || key_name(master_key_id).starts_with(&policy.key_prefix) {
        return Ok(());
    }
    Err(ByokError::SegregationViolation {
        master_key_id: master_key_id.to_string(),
        key_prefix: policy.key_prefix,
        environment: policy.environment.name(),
    })
}

pub use crate::catalog::Participant;

fn refusal(message: String, detail: &str, hint: Option<&str>) -> ByokError {
    ByokError::NotAllowed {
        message,
        detail: Some(detail.to_string()),
        hint: hint.map(str::to_string),
    }
}

/// May `requester` ask for an operation that needs approval?
pub fn check_requester(requester: &Participant) -> Result<(), ByokError> {
    if gucs::dual_control_approvers().is_empty() && requester.can_create_roles {
        return Err(refusal(
            format!(
                "role \"{}\" holds CREATEROLE and may not take part in dual control",
                requester.name
            ),
            "a CREATEROLE holder can create a second login and give it byok_admin, approving its own requests",
            Some(
                "drop CREATEROLE from the role, or have a superuser name the approvers in byok.dual_control_approvers",
            ),
        ));
    }
    Ok(())
}

/// May `approver` approve `requester`'s request? `granted_by_other` says
/// whether either party's byok_admin came (through any chain of grants) from
/// the other; `minted_by` names a CREATEROLE holder in both parties'
/// provenance (`catalog::membership_conflicts`).
pub fn check_approver(
    request_id: i64,
    requester: &Participant,
    approver: &Participant,
    granted_by_other: bool,
    minted_by: Option<&str>,
) -> Result<(), ByokError> {
    if !approver.is_admin {
        return Err(refusal(
            "only a byok_admin may approve operations".into(),
            "dual control: the approver is a second administrator",
            None,
        ));
    }
    if approver.name == requester.name {
        return Err(refusal(
            format!(
                "operation request {request_id} was made by {}; a different administrator must approve it",
                requester.name
            ),
            "dual control: two people take part in every destructive or rotating operation",
            None,
        ));
    }
    let named = gucs::dual_control_approvers();
    if !named.is_empty() {
        if !named.contains(&approver.name) {
            return Err(refusal(
                format!("role \"{}\" is not an approver", approver.name),
                "byok.dual_control_approvers names the roles that approve dual-control requests",
                Some("ask one of the roles in byok.dual_control_approvers"),
            ));
        }
    } else {
        check_requester(requester)?;
        if approver.can_create_roles {
            return Err(refusal(
                format!(
                    "role \"{}\" holds CREATEROLE and may not approve dual-control requests",
                    approver.name
                ),
                "a CREATEROLE holder can create logins and give them byok_admin, so it could be both people",
                Some(
                    "drop CREATEROLE from the role, or have a superuser name the approvers in byok.dual_control_approvers",
                ),
            ));
        }
        if let Some(minter) = minted_by {
            return Err(refusal(
                format!(
                    "roles \"{}\" and \"{}\" both hold byok_admin through memberships granted by \"{minter}\", which holds CREATEROLE",
                    requester.name, approver.name
                ),
                "dual control: a CREATEROLE holder could have made both logins, so they may be one person",
                Some(
                    "have a superuser grant byok_admin, or name the approvers in byok.dual_control_approvers",
                ),
            ));
        }
    }
    if granted_by_other {
        return Err(refusal(
            format!(
                "roles \"{}\" and \"{}\" are not independent: one holds byok_admin through grants made by the other",
                requester.name, approver.name
            ),
            "dual control: neither the approver nor the requester may owe its administrator rights to the other",
            Some("have a superuser (or another administrator) grant byok_admin to each of them"),
        ));
    }
    Ok(())
}
