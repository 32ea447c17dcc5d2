//! The committed CRD YAML is exactly what the types produce.
use std::path::Path;

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stale = tidepool_api::generate::stale_files(&root).expect("read generated files");
    assert!(
        stale.is_empty(),
        "generated CRD YAML is stale: {stale:?}; run {}",
        tidepool_api::generate::GENERATE_COMMAND
    );
}

#[test]
fn crds_install_the_names_users_type() {
    let crds = tidepool_api::generate::crds();
    let names: Vec<_> = crds
        .iter()
        .map(|c| {
            (
                c.spec.names.kind.as_str(),
                c.spec.scope.as_str(),
                c.spec.names.short_names.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("DatasetCache", "Namespaced", vec!["dsc".to_owned()]),
            ("CheckpointSync", "Namespaced", vec!["cks".to_owned()]),
            ("CachePool", "Cluster", vec!["cpool".to_owned()]),
        ]
    );
    for crd in &crds {
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{} has a status subresource",
            crd.spec.names.kind
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert!(
            columns.contains(&"Age"),
            "{} prints Age: {columns:?}",
            crd.spec.names.kind
        );
    }
}

/// Every property in every schema has a description: it is what `kubectl explain` shows.
#[test]
fn every_field_is_documented_for_kubectl_explain() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, prop) in props {
                let path = format!("{path}.{name}");
                // apiVersion/kind/metadata are documented by Kubernetes itself.
                let builtin = matches!(name.as_str(), "apiVersion" | "kind" | "metadata")
                    && !path[1..].contains('.');
                if prop.get("description").is_none()
                    && !builtin
                    && !path.contains(".conditions.")
                    && !path.contains("Selector.")
                {
                    missing.push(path.clone());
                }
                walk(&path, prop, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(path, items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in tidepool_api::generate::crds() {
        let schema = serde_json::to_value(
            &crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema,
        )
        .unwrap();
        walk(&crd.spec.names.kind, &schema, &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
}
