//! The CEL rules (`x-kubernetes-validations`) of the generated CRDs, evaluated in
//! process with kube-cel: a fast check that runs everywhere, also where no envtest
//! binaries are installed. It is not the proof: what the API server accepts and refuses
//! (rule cost budgets included, which kube-cel does not estimate) is checked against a
//! real kube-apiserver in `apiserver.rs`.
use serde_json::{Value, json};
use tidepool_api::generate::crds;

fn schema(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// `Ok(())` or the messages of the failed rules.
fn check(kind: &str, spec: Value) -> Result<(), Vec<String>> {
    let object = json!({"apiVersion": "tidepool.dev/v1alpha1", "kind": kind, "metadata": {"name": "x", "namespace": "ml"}, "spec": spec});
    kube_cel::validate(&schema(kind), &object, None)
        .map_err(|errs| errs.iter().map(|e| e.to_string()).collect())
}

const URL: &str = "https://acct.blob.core.windows.net/datasets/imagenet";

#[test]
fn every_rule_compiles_with_kubernetes_cel() {
    for kind in ["DatasetCache", "CheckpointSync", "CachePool"] {
        let compiled = kube_cel::compile_schema(&schema(kind));
        assert!(
            !compiled.has_errors(),
            "{kind}: {:?}",
            compiled.compilation_errors()
        );
    }
}

#[test]
fn valid_dataset_caches_are_accepted() {
    let cases = [
        ("anonymous", json!({"source": {"url": URL}})),
        (
            "sas secret",
            json!({"source": {"url": URL, "credentials": {"secretRef": {"name": "lake"}}}}),
        ),
        (
            "workload identity",
            json!({"source": {"url": URL, "credentials": {"workloadIdentity": {"serviceAccountName": "sa", "clientId": "c", "tenantId": "t"}}}}),
        ),
        (
            "managed identity",
            json!({"source": {"url": "http://127.0.0.1:10000/devstoreaccount1/c", "credentials": {"managedIdentity": {}}}}),
        ),
        (
            "interval refresh",
            json!({"source": {"url": URL}, "refresh": {"policy": "Interval", "interval": "1h30m"}}),
        ),
        (
            "eager globs",
            json!({"source": {"url": URL}, "prefetch": {"policy": "Eager", "include": ["train/**"]}, "pinned": true}),
        ),
    ];
    for (name, spec) in cases {
        assert_eq!(check("DatasetCache", spec), Ok(()), "{name}");
    }
}

#[test]
fn invalid_dataset_caches_are_rejected_with_a_message_naming_the_fix() {
    let cases = [
        (
            "two credential kinds",
            json!({"source": {"url": URL, "credentials": {"secretRef": {"name": "s"}, "managedIdentity": {}}}}),
            "set exactly one of",
        ),
        (
            "three credential kinds",
            json!({"source": {"url": URL, "credentials": {"secretRef": {"name": "s"}, "managedIdentity": {}, "workloadIdentity": {"serviceAccountName": "sa", "clientId": "c", "tenantId": "t"}}}}),
            "set exactly one of",
        ),
        (
            "not http",
            json!({"source": {"url": "ftp://acct/container"}}),
            "url must be http(s)",
        ),
        (
            "no container",
            json!({"source": {"url": "https://acct.blob.core.windows.net/"}}),
            "url must be http(s)",
        ),
        (
            "bare account",
            json!({"source": {"url": "https://acct.blob.core.windows.net"}}),
            "url must be http(s)",
        ),
        (
            "interval without duration",
            json!({"source": {"url": URL}, "refresh": {"policy": "Interval"}}),
            "refresh.interval is required",
        ),
        (
            "zero interval",
            json!({"source": {"url": URL}, "refresh": {"policy": "Interval", "interval": "0s"}}),
            "positive duration",
        ),
    ];
    for (name, spec, want) in cases {
        let errors = check("DatasetCache", spec).expect_err(name);
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{name}: {errors:?} should mention {want:?}"
        );
    }
}

#[test]
fn checkpoint_sync_rules() {
    assert_eq!(
        check(
            "CheckpointSync",
            json!({"destination": {"url": URL}, "commit": {"quiescence": "5m"}, "retention": {"keepLocal": 2}})
        ),
        Ok(())
    );
    let errors = check(
        "CheckpointSync",
        json!({"destination": {"url": URL}, "commit": {"quiescence": "0s"}}),
    )
    .unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("commit.quiescence must be a positive duration")),
        "{errors:?}"
    );
    let errors = check("CheckpointSync", json!({"destination": {"url": "s3://bucket/x", "credentials": {"secretRef": {"name": "a"}, "workloadIdentity": {"serviceAccountName": "sa", "clientId": "c", "tenantId": "t"}}}})).unwrap_err();
    assert!(
        errors.iter().any(|e| e.contains("url must be")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("set exactly one of")),
        "{errors:?}"
    );
}

/// Enum values and numeric bounds are OpenAPI constraints the API server enforces
/// before CEL runs; check they are in the schema users install.
#[test]
fn schema_constrains_enums_durations_and_counts() {
    let s = schema("DatasetCache");
    let spec = &s["properties"]["spec"]["properties"];
    assert_eq!(
        spec["prefetch"]["properties"]["policy"]["enum"],
        json!(["OnDemand", "Eager"])
    );
    assert_eq!(
        spec["refresh"]["properties"]["policy"]["enum"],
        json!(["Pinned", "Interval"])
    );
    assert!(spec["refresh"]["properties"]["interval"]["pattern"].is_string());
    let c = schema("CheckpointSync");
    let retention = &c["properties"]["spec"]["properties"]["retention"]["properties"];
    assert_eq!(
        retention["keepLocal"]["minimum"].as_f64(),
        Some(0.0),
        "negative counts are rejected"
    );
    assert_eq!(
        retention["keepRemote"]["minimum"].as_f64(),
        Some(0.0),
        "negative counts are rejected"
    );
    let markers =
        &c["properties"]["spec"]["properties"]["commit"]["properties"]["markers"]["default"];
    assert_eq!(markers, &json!([".metadata", "commit_success.txt"]));
}
