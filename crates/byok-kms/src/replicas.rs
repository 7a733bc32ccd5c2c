//! Replicas of a key manager: other Regions (AWS), vaults (Azure), locations
//! (Google Cloud) or clusters (Vault) holding the same keys, tried in order
//! when the one before cannot be reached. Never after a refusal: a key the
//! customer disabled, or access it withdrew, is refused wherever it is asked.

use std::future::Future;
use std::time::Duration;

use crate::error::ProviderError;
use crate::provider::CallReport;

/// Replicas a tenant may list at most (each gets a share of the call's time).
pub const MAX_REPLICAS: usize = 4;

/// Runs `call(0)`, then `call(1)`, ... while the target could not be reached
/// ([`ErrorKind::is_unreachable`](crate::error::ErrorKind::is_unreachable):
/// not when throttled, which a reachable key manager may answer before it
/// looks at the key). `labels` names the targets (the
/// first is the primary); the replica that answers is noted in `report`.
pub async fn first_reachable<T, F, Fut>(
    labels: &[&str],
    report: Option<&CallReport>,
    call: F,
) -> Result<T, ProviderError>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let mut result = call(0).await;
    for (index, label) in labels.iter().enumerate().skip(1) {
        match &result {
            Err(e) if e.kind.is_unreachable() => {}
            _ => break,
        }
        result = call(index).await;
        if result.is_ok()
            && let Some(report) = report
        {
            report.note_replica(label);
        }
    }
    result
}

/// Each of `targets` gets an equal share of the call's time, so that a
/// primary that hangs leaves its replicas time within `byok.kms_timeout_ms`.
pub fn share(timeout: Duration, targets: usize) -> Duration {
    timeout / targets.max(1) as u32
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use byok_core::config::ProviderKind;

    use super::*;
    use crate::error::ErrorKind;

    fn fails(kind: ErrorKind) -> Result<u32, ProviderError> {
        Err(ProviderError::new(ProviderKind::Vault, kind, "x"))
    }

    /// Runs `first_reachable` over targets answering `answers`; returns the
    /// result, the targets asked, and the replica noted.
    async fn run(
        answers: Vec<Result<u32, ProviderError>>,
    ) -> (Result<u32, ProviderError>, Vec<usize>, Option<String>) {
        let asked = Mutex::new(Vec::new());
        let report = CallReport::default();
        let labels: Vec<String> = (0..answers.len()).map(|i| format!("t{i}")).collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let result = first_reachable(&labels, Some(&report), |i| {
            asked.lock().unwrap().push(i);
            let answer = answers[i].clone();
            async move { answer }
        })
        .await;
        (result, asked.into_inner().unwrap(), report.replica())
    }

    #[tokio::test]
    async fn replicas_answer_only_for_an_unreachable_primary() {
        let (result, asked, replica) = run(vec![Ok(1), Ok(2)]).await;
        assert_eq!((result.unwrap(), asked, replica), (1, vec![0], None));

        let (result, asked, replica) = run(vec![
            fails(ErrorKind::Unavailable),
            fails(ErrorKind::Unavailable),
            Ok(3),
        ])
        .await;
        assert_eq!(
            (result.unwrap(), asked, replica),
            (3, vec![0, 1, 2], Some("t2".into()))
        );

        // Throttled is reachable: the key manager may be refusing behind it.
        let (result, asked, _) = run(vec![fails(ErrorKind::Throttled), Ok(2)]).await;
        assert_eq!(
            (result.unwrap_err().kind, asked),
            (ErrorKind::Throttled, vec![0])
        );

        // A refusal is final, at the primary or at a replica.
        for refusal in [
            ErrorKind::AccessDenied,
            ErrorKind::KeyDisabled,
            ErrorKind::KeyNotFound,
            ErrorKind::UnwrapFailed,
        ] {
            let (result, asked, _) = run(vec![fails(refusal), Ok(2)]).await;
            assert_eq!((result.unwrap_err().kind, asked), (refusal, vec![0]));
            let (result, asked, _) =
                run(vec![fails(ErrorKind::Unavailable), fails(refusal), Ok(3)]).await;
            assert_eq!((result.unwrap_err().kind, asked), (refusal, vec![0, 1]));
        }
        // All down: the last one's error.
        let (result, asked, _) = run(vec![
            fails(ErrorKind::Unavailable),
            fails(ErrorKind::Throttled),
        ])
        .await;
        assert_eq!(
            (result.unwrap_err().kind, asked),
            (ErrorKind::Throttled, vec![0, 1])
        );
    }

    #[test]
    fn each_target_gets_a_share_of_the_time() {
        assert_eq!(share(Duration::from_secs(6), 3), Duration::from_secs(2));
        assert_eq!(share(Duration::from_secs(6), 0), Duration::from_secs(6));
    }
}
