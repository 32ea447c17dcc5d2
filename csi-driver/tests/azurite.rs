//! The real Azure SDK against a real Azurite: every `Lake` operation and every
//! credential mode Azurite can check (SAS signed by our signer, account key, SAS in the
//! URL, bearer tokens from workload identity over HTTPS with `--oauth basic`), plus a
//! wrong key, which must be `Denied` without the key or a signature in the message.
//! Also what the checkpoint upload relies on: create-only puts, checked and stored
//! MD5s, block lists (ids round-trip through base64), lease renewal and its loss.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use md5::{Digest, Md5};
use parking_lot::Mutex;
use tidepool_csi::lake::azure::sas::AccountKey;
use tidepool_csi::lake::azure::{AzureLake, AzureOptions};
use tidepool_csi::lake::credentials::WorkloadIdentity;
use tidepool_csi::lake::parallel::{ListOptions, ParallelLister};
use tidepool_csi::lake::{
    BlockId, Credentials, ETag, Lake, LakeError, LakeUrl, LeaseId, Lister, PutOptions, Secret,
};
use tidepool_csi::testing::azurite::{ACCOUNT, ACCOUNT_KEY};
use tidepool_csi::testing::{Azurite, TlsFiles};

fn lake(az: &Azurite, container: &str, creds: &Credentials) -> AzureLake {
    let url = LakeUrl::parse(&az.url(container, "")).unwrap();
    AzureLake::connect(&url, creds, &az.options()).unwrap()
}

async fn keyed(az: &Azurite, container: &str) -> AzureLake {
    az.lake(container).await
}

/// Deterministic, position-dependent content: a misplaced byte changes the value.
fn pattern(n: usize, seed: u8) -> Bytes {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn listing_pages_filters_by_prefix_and_matches_head() {
    let az = Azurite::start();
    let lake = keyed(&az, "listing").await;
    let mut expected = Vec::new();
    for i in 0..7 {
        let name = format!("ds/file-{i:02}.bin");
        let data = pattern(100 + i, i as u8);
        let etag = lake
            .put(&name, data.clone(), &PutOptions::default())
            .await
            .unwrap();
        expected.push((name, data.len() as u64, etag, Md5::digest(&data)));
    }
    lake.put("other/x", Bytes::from_static(b"x"), &PutOptions::default())
        .await
        .unwrap();
    lake.put(
        "ds-not-a-dir",
        Bytes::from_static(b"y"),
        &PutOptions::default(),
    )
    .await
    .unwrap();

    // Three pages of 3, 3 and 1.
    let first = lake.list_page("ds/", None, 3).await.unwrap();
    assert_eq!(first.objects.len(), 3);
    assert!(first.next.is_some(), "a full page must carry a marker");
    let mut lister = Lister::new(&lake, "ds/").page_size(3);
    let mut pages = 0;
    let mut seen = Vec::new();
    while let Some(page) = lister.next_page().await.unwrap() {
        pages += 1;
        seen.extend(page);
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen.len(),
        7,
        "prefix 'ds/' must exclude other/x and ds-not-a-dir"
    );
    for (meta, (name, size, etag, md5)) in seen.iter().zip(&expected) {
        assert_eq!(&meta.name, name);
        assert_eq!(meta.size, *size);
        assert_eq!(
            &meta.etag, etag,
            "listing and put must agree on the ETag form"
        );
        assert_eq!(meta.content_md5.as_ref().map(|m| &m[..]), Some(&md5[..]));
        let head = lake.head(name).await.unwrap();
        assert_eq!(
            &head, meta,
            "head and listing must describe the same version"
        );
    }
    // A whole-container listing sees all nine, in name order.
    let all = lake.list_page("", None, 5000).await.unwrap();
    let names: Vec<_> = all.objects.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names.len(), 9);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    assert!(all.next.is_none());
}

/// The one-level listing (delimiter `/`, which the SDK's options lack and our policy
/// adds) against Azurite, and the parallel listing built on it: the same names, in the
/// same order, with the same properties as the flat listing, at every page size, with
/// names XML must escape.
#[tokio::test]
async fn level_listings_split_the_flat_listing_exactly() {
    let az = Azurite::start();
    let lake = keyed(&az, "levels").await;
    let mut names: Vec<String> = [
        "ds/a",
        "ds/a/b",
        "ds/a/b/c",
        "ds/a.txt",
        "ds/a0",
        "ds/a&b <c> \"q\" '",
        "ds/ä/ö",
        "ds/z",
        "ds/b/",
        "dsx/no",
        "other",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for d in 0..4 {
        for e in 0..3 {
            for f in 0..(d + e) {
                names.push(format!("ds/d{d}/e{e}/f{f}"));
            }
        }
    }
    for (i, n) in names.iter().enumerate() {
        lake.put(n, pattern(i, i as u8), &PutOptions::default())
            .await
            .unwrap();
    }
    let mut top = Vec::new();
    let mut prefixes = Vec::new();
    let mut marker = None;
    loop {
        let page = lake.list_level("ds/", marker.as_deref(), 2).await.unwrap();
        assert!(page.objects.len() + page.prefixes.len() <= 2);
        top.extend(page.objects.into_iter().map(|o| o.name));
        prefixes.extend(page.prefixes);
        marker = page.next;
        if marker.is_none() {
            break;
        }
    }
    assert_eq!(
        top,
        ["ds/a", "ds/a&b <c> \"q\" '", "ds/a.txt", "ds/a0", "ds/z"]
    );
    assert_eq!(
        prefixes,
        [
            "ds/a/", "ds/b/", "ds/d0/", "ds/d1/", "ds/d2/", "ds/d3/", "ds/ä/"
        ]
    );

    let flat = {
        let mut l = Lister::new(&lake, "ds/");
        let mut all = Vec::new();
        while let Some(p) = l.next_page().await.unwrap() {
            all.extend(p);
        }
        all
    };
    assert_eq!(
        flat.len(),
        names.iter().filter(|n| n.starts_with("ds/")).count()
    );
    for opts in [
        ListOptions::default(),
        ListOptions {
            parallelism: 3,
            split_depth: 3,
            page_size: 2,
        },
    ] {
        let mut l = ParallelLister::new(&lake, "ds/", opts);
        let mut got = Vec::new();
        while let Some(p) = l.next_page().await.unwrap() {
            got.extend(p);
        }
        assert_eq!(
            got, flat,
            "{opts:?}: names, order, sizes, ETags, times and MD5s"
        );
    }
}

#[tokio::test]
async fn ranged_reads_are_exact_clipped_and_pinned_to_the_etag() {
    let az = Azurite::start();
    let lake = keyed(&az, "ranges").await;
    let data = pattern(1000, 7);
    let etag = lake
        .put("blob", data.clone(), &PutOptions::default())
        .await
        .unwrap();

    for r in [3..17u64, 0..1000, 511..513, 999..1000] {
        let got = lake.get_range("blob", r.clone(), &etag).await.unwrap();
        assert_eq!(
            got,
            data.slice(r.start as usize..r.end as usize),
            "range {r:?}"
        );
    }
    // Past the end: clipped; at or beyond the end: empty.
    assert_eq!(
        lake.get_range("blob", 990..5000, &etag).await.unwrap(),
        data.slice(990..)
    );
    assert!(
        lake.get_range("blob", 1000..1010, &etag)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        lake.get_range("blob", 5000..6000, &etag)
            .await
            .unwrap()
            .is_empty()
    );

    // A new version: reads pinned to the old ETag fail instead of mixing versions.
    let etag2 = lake
        .put("blob", pattern(1000, 8), &PutOptions::default())
        .await
        .unwrap();
    assert_ne!(etag, etag2);
    match lake.get_range("blob", 0..10, &etag).await {
        Err(LakeError::Changed { name, expected }) => {
            assert_eq!(name, "blob");
            assert_eq!(expected, etag);
        }
        other => panic!("expected Changed, got {other:?}"),
    }
    assert!(matches!(
        lake.get_range("blob", 2000..3000, &etag).await,
        Err(LakeError::Changed { .. })
    ));
    assert_eq!(
        lake.get_range("blob", 0..10, &etag2).await.unwrap(),
        pattern(1000, 8).slice(0..10)
    );

    // An empty blob: every range is empty, and still pinned.
    let empty = lake
        .put("empty", Bytes::new(), &PutOptions::default())
        .await
        .unwrap();
    assert!(
        lake.get_range("empty", 0..10, &empty)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        lake.get_range("empty", 5..10, &empty)
            .await
            .unwrap()
            .is_empty()
    );
    lake.put(
        "empty",
        Bytes::from_static(b"now full"),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    assert!(matches!(
        lake.get_range("empty", 0..10, &empty).await,
        Err(LakeError::Changed { .. })
    ));

    // Missing objects.
    assert!(matches!(
        lake.head("nope").await,
        Err(LakeError::NotFound { .. })
    ));
    assert!(matches!(
        lake.get_range("nope", 0..1, &etag).await,
        Err(LakeError::NotFound { .. })
    ));
    lake.delete("blob").await.unwrap();
    assert!(matches!(
        lake.get_range("blob", 0..1, &etag2).await,
        Err(LakeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn staged_blocks_commit_to_their_concatenation() {
    let az = Azurite::start();
    let lake = keyed(&az, "blocks").await;
    let parts = [pattern(4096, 1), pattern(10, 2), pattern(3000, 3)];
    let ids: Vec<BlockId> = (0..3).map(|n| BlockId::numbered("up1", n)).collect();
    // Staged out of order and with checksums where given.
    for i in [2usize, 0, 1] {
        let md5 = (i != 1).then(|| Md5::digest(&parts[i]).into());
        lake.put_block("big", &ids[i], parts[i].clone(), md5)
            .await
            .unwrap();
    }
    // A block whose checksum does not match is refused.
    let bad = lake
        .put_block(
            "big",
            &BlockId::numbered("up1", 9),
            pattern(10, 9),
            Some([0u8; 16]),
        )
        .await;
    assert!(bad.is_err(), "a wrong transactional MD5 must be rejected");

    let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let md5: [u8; 16] = Md5::digest(&whole).into();
    let etag = lake.put_block_list("big", &ids, Some(md5)).await.unwrap();
    let head = lake.head("big").await.unwrap();
    assert_eq!(head.etag, etag);
    assert_eq!(head.size, whole.len() as u64);
    assert_eq!(head.content_md5, Some(md5));
    let got = lake.get_range("big", 0..head.size, &etag).await.unwrap();
    assert_eq!(&got[..], &whole[..]);
}

#[tokio::test]
async fn delete_is_idempotent_and_leases_exclude_other_writers() {
    let az = Azurite::start();
    let lake = keyed(&az, "leases").await;
    lake.put("gone", Bytes::from_static(b"a"), &PutOptions::default())
        .await
        .unwrap();
    lake.delete("gone").await.unwrap();
    assert!(matches!(
        lake.head("gone").await,
        Err(LakeError::NotFound { .. })
    ));
    lake.delete("gone").await.unwrap();
    lake.delete("never-was").await.unwrap();

    lake.put("ckpt", Bytes::from_static(b"v1"), &PutOptions::default())
        .await
        .unwrap();
    let proposed = LeaseId::random();
    let lease = lake
        .acquire_lease("ckpt", Some(15), &proposed)
        .await
        .unwrap();
    assert_eq!(lease, proposed, "the lake takes the id we propose");
    assert!(matches!(
        lake.acquire_lease("ckpt", Some(15), &LeaseId::random())
            .await,
        Err(LakeError::LeaseConflict { .. })
    ));
    assert_eq!(
        lake.acquire_lease("ckpt", Some(15), &proposed)
            .await
            .unwrap(),
        proposed,
        "acquiring again under the held id is the holder renewing, not a conflict"
    );
    assert!(
        matches!(
            lake.put("ckpt", Bytes::from_static(b"v2"), &PutOptions::default())
                .await,
            Err(LakeError::LeaseConflict { .. })
        ),
        "a write without the lease must not replace a leased blob"
    );
    lake.release_lease("ckpt", &lease).await.unwrap();
    lake.release_lease("ckpt", &lease).await.unwrap();
    let again = lake
        .acquire_lease("ckpt", None, &LeaseId::random())
        .await
        .unwrap();
    lake.release_lease("ckpt", &again).await.unwrap();
    lake.put("ckpt", Bytes::from_static(b"v3"), &PutOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn create_only_puts_refuse_existing_blobs_and_md5s_are_checked_and_kept() {
    let az = Azurite::start();
    let lake = keyed(&az, "create").await;
    let data = pattern(3000, 5);
    let md5: [u8; 16] = Md5::digest(&data).into();
    let etag = lake
        .put(
            "m/1",
            data.clone(),
            &PutOptions::create_only().with_md5(md5),
        )
        .await
        .unwrap();
    let head = lake.head("m/1").await.unwrap();
    assert_eq!(
        (head.size, head.content_md5, &head.etag),
        (3000, Some(md5), &etag)
    );
    match lake
        .put("m/1", pattern(10, 6), &PutOptions::create_only())
        .await
    {
        Err(LakeError::Exists { name }) => assert_eq!(name, "m/1"),
        other => panic!("expected Exists, got {other:?}"),
    }
    assert_eq!(lake.head("m/1").await.unwrap().etag, etag, "left alone");
    // A plain put still replaces it.
    lake.put("m/1", pattern(10, 6), &PutOptions::default())
        .await
        .unwrap();
    // A body that does not match its MD5 is refused, and nothing is written.
    let err = lake
        .put(
            "m/2",
            data.clone(),
            &PutOptions::default().with_md5([7; 16]),
        )
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(matches!(
        lake.head("m/2").await,
        Err(LakeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn block_lists_round_trip_ids_and_sizes() {
    let az = Azurite::start();
    let lake = keyed(&az, "blocklist").await;
    // A name with nothing: Azurite answers 404 BlobNotFound, the lake two empty lists.
    let empty = lake.get_block_list("nothing").await.unwrap();
    assert!(empty.committed.is_empty() && empty.uncommitted.is_empty());

    // Ids with characters that base64 turns into '+' and '/' round-trip exactly.
    let ids: Vec<BlockId> = ["tp1-?>~-0", "tp1-?>~-1"]
        .iter()
        .map(|s| BlockId((*s).into()))
        .collect();
    let parts = [pattern(1000, 1), pattern(24, 2)];
    for (id, part) in ids.iter().zip(&parts) {
        lake.put_block("b", id, part.clone(), Some(Md5::digest(part).into()))
            .await
            .unwrap();
    }
    let listed = lake.get_block_list("b").await.unwrap();
    assert!(listed.committed.is_empty());
    let mut staged = listed.uncommitted.clone();
    staged.sort();
    assert_eq!(staged, [(ids[0].clone(), 1000), (ids[1].clone(), 24)]);
    // Staged blocks are not a blob.
    assert!(matches!(
        lake.head("b").await,
        Err(LakeError::NotFound { .. })
    ));
    // An id of another length is refused while these are staged.
    let err = lake
        .put_block("b", &BlockId("x".into()), pattern(5, 3), None)
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");

    // Committed without an MD5: the blob has none (the lake computes none for a
    // block list).
    let etag = lake.put_block_list("b", &ids, None).await.unwrap();
    assert_eq!(lake.head("b").await.unwrap().content_md5, None);
    let listed = lake.get_block_list("b").await.unwrap();
    assert_eq!(
        listed.committed,
        [(ids[0].clone(), 1000), (ids[1].clone(), 24)]
    );
    assert!(listed.uncommitted.is_empty(), "{listed:?}");
    // The same commit again (as after a lost answer) finds the committed blocks, and
    // this time stores the MD5.
    let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let md5: [u8; 16] = Md5::digest(&whole).into();
    let etag2 = lake.put_block_list("b", &ids, Some(md5)).await.unwrap();
    assert_ne!(etag, etag2);
    let head = lake.head("b").await.unwrap();
    assert_eq!((head.size, head.content_md5), (1024, Some(md5)));
    assert_eq!(
        lake.get_range("b", 0..1024, &etag2).await.unwrap(),
        Bytes::from(whole)
    );
    // A blob written by one put has no blocks.
    lake.put("b", pattern(10, 4), &PutOptions::default())
        .await
        .unwrap();
    assert!(lake.get_block_list("b").await.unwrap().committed.is_empty());
}

#[tokio::test]
async fn leases_renew_and_a_lost_lease_is_named() {
    let az = Azurite::start();
    let lake = keyed(&az, "renew").await;
    lake.put("lock", Bytes::from_static(b"x"), &PutOptions::default())
        .await
        .unwrap();
    let ours = lake
        .acquire_lease("lock", Some(15), &LeaseId::random())
        .await
        .unwrap();
    lake.renew_lease("lock", &ours).await.unwrap();
    lake.renew_lease("lock", &ours).await.unwrap();
    let stranger = LeaseId::random();
    assert!(matches!(
        lake.renew_lease("lock", &stranger).await,
        Err(LakeError::LeaseLost { .. })
    ));
    // Expired and not taken since: still ours to renew (after that, it is held again).
    tokio::time::sleep(Duration::from_secs(16)).await;
    lake.renew_lease("lock", &ours)
        .await
        .expect("an expired lease nobody took is renewed");
    assert!(matches!(
        lake.acquire_lease("lock", Some(15), &stranger).await,
        Err(LakeError::LeaseConflict { .. })
    ));
    // Released (or taken by another writer): lost, with words saying what to do.
    lake.release_lease("lock", &ours).await.unwrap();
    let err = lake.renew_lease("lock", &ours).await.unwrap_err();
    assert!(matches!(err, LakeError::LeaseLost { .. }), "{err:?}");
    assert!(err.to_string().contains("acquire it again"), "{err}");
    let theirs = lake
        .acquire_lease("lock", Some(15), &stranger)
        .await
        .unwrap();
    assert!(matches!(
        lake.renew_lease("lock", &ours).await,
        Err(LakeError::LeaseLost { .. })
    ));
    lake.release_lease("lock", &theirs).await.unwrap();
    assert!(matches!(
        lake.renew_lease("gone", &ours).await,
        Err(LakeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn sas_signed_by_us_and_sas_in_the_url_both_work() {
    let az = Azurite::start();
    az.create_container("sas").await;
    let key = AccountKey::new(ACCOUNT, &Secret::new(ACCOUNT_KEY)).unwrap();
    let sas = key.container_sas(
        "sas",
        "racwdl",
        Duration::from_secs(600),
        time::OffsetDateTime::now_utc(),
    );

    let by_cred = lake(&az, "sas", &Credentials::Sas(sas.clone()));
    let etag = by_cred
        .put("a", Bytes::from_static(b"hello"), &PutOptions::default())
        .await
        .unwrap();

    let url = LakeUrl::parse(&format!("{}?{}", az.url("sas", ""), sas.expose())).unwrap();
    let by_url = AzureLake::connect(&url, &Credentials::Anonymous, &az.options()).unwrap();
    assert_eq!(
        by_url.get_range("a", 0..5, &etag).await.unwrap(),
        Bytes::from_static(b"hello")
    );
    assert!(!by_url.describe().contains("sig="));

    // A read-only SAS cannot write.
    let ro = key.container_sas(
        "sas",
        "rl",
        Duration::from_secs(600),
        time::OffsetDateTime::now_utc(),
    );
    let ro_lake = lake(&az, "sas", &Credentials::Sas(ro));
    assert_eq!(
        ro_lake.get_range("a", 1..3, &etag).await.unwrap(),
        Bytes::from_static(b"el")
    );
    assert!(matches!(
        ro_lake
            .put("b", Bytes::from_static(b"x"), &PutOptions::default())
            .await,
        Err(LakeError::Denied { status: 403, .. })
    ));

    // No credential on a private container.
    let anon = lake(&az, "sas", &Credentials::Anonymous);
    assert!(matches!(
        anon.head("a").await,
        Err(LakeError::Denied { .. }) | Err(LakeError::NotFound { .. })
    ));
}

#[tokio::test]
async fn wrong_key_is_denied_and_no_secret_leaks() {
    let az = Azurite::start();
    az.create_container("private").await;
    // Valid base64, wrong key; distinctive so that any leak is found.
    let wrong = "V1JPTkdLRVlTRUNSRVRXUk9OR0tFWVNFQ1JFVA==";
    let lake = lake(&az, "private", &Credentials::AccountKey(Secret::new(wrong)));
    let err = lake
        .put("x", Bytes::from_static(b"x"), &PutOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, LakeError::Denied { status: 403, .. }),
        "{err:?}"
    );
    let err2 = lake.head("x").await.unwrap_err();
    assert!(matches!(err2, LakeError::Denied { .. }), "{err2:?}");
    for text in [
        err.to_string(),
        format!("{err:?}"),
        err2.to_string(),
        format!("{err2:?}"),
        format!("{lake:?}"),
        lake.describe(),
    ] {
        assert!(!text.contains(wrong), "key leaked: {text}");
        assert!(!text.contains("sig="), "signature leaked: {text}");
        assert!(!text.contains("V1JPTkdLRVl"), "key leaked: {text}");
    }
    assert!(err.to_string().contains("access denied"), "{err}");

    // A dead endpoint is a connection error that names no secret either.
    let dead = LakeUrl::parse("http://127.0.0.1:9/devstoreaccount1/private").unwrap();
    let sas = Secret::new("sv=2022-11-02&sr=c&sp=r&sig=DEADSECRETSIG");
    let dead = AzureLake::connect(&dead, &Credentials::Sas(sas), &AzureOptions::default()).unwrap();
    let err = dead.head("x").await.unwrap_err();
    assert!(matches!(err, LakeError::Connection { .. }), "{err:?}");
    assert!(
        !format!("{err} {err:?}").contains("DEADSECRETSIG"),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------
// Workload identity: a local Entra token endpoint over HTTPS.

/// What the token endpoint saw and should answer.
#[derive(Default)]
struct Sts {
    /// (client_id, client_assertion) of every exchange.
    exchanges: Vec<(String, String)>,
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A JWT-shaped token with the claims Azurite's basic OAuth checks.
fn access_token(tenant: &str, audience: &str) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "aud": audience, "iss": format!("https://sts.windows.net/{tenant}/"),
        "iat": now - 60, "nbf": now - 60, "exp": now + 120, "tid": tenant, "sub": "tidepool-test",
    });
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(b"unsigned")
    )
}

fn pem_blocks(path: &std::path::Path) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("-----BEGIN") {
            cur = Some(String::new());
        } else if line.starts_with("-----END") {
            out.push(
                base64::engine::general_purpose::STANDARD
                    .decode(cur.take().unwrap())
                    .unwrap(),
            );
        } else if let Some(c) = cur.as_mut() {
            c.push_str(line.trim());
        }
    }
    out
}

/// Serves `POST /<tenant>/oauth2/v2.0/token` on 127.0.0.1 over TLS; tokens for client
/// id "bad-audience" carry a wrong audience. Returns the authority host URL.
async fn start_sts(tls: &TlsFiles, tenant: &'static str, sts: Arc<Mutex<Sts>>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let certs = pem_blocks(&tls.cert)
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pem_blocks(&tls.key).remove(0).into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let sts = sts.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, body_len) = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + body_len {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let request_line =
                    String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == b'\r').unwrap()])
                        .into_owned();
                let form: std::collections::HashMap<String, String> =
                    url::form_urlencoded::parse(&buf[head_end..head_end + body_len])
                        .into_owned()
                        .collect();
                let client_id = form.get("client_id").cloned().unwrap_or_default();
                let ok_path =
                    request_line.starts_with(&format!("POST /{tenant}/oauth2/v2.0/token"));
                let (status, body) = if ok_path
                    && form.get("grant_type").map(String::as_str) == Some("client_credentials")
                {
                    sts.lock().exchanges.push((
                        client_id.clone(),
                        form.get("client_assertion").cloned().unwrap_or_default(),
                    ));
                    let aud = if client_id == "bad-audience" {
                        "https://example.com"
                    } else {
                        "https://storage.azure.com"
                    };
                    // 120 s: inside the SDK's 5-minute refresh window, so every request
                    // exchanges again and the test sees the token file being re-read.
                    let body = serde_json::json!({
                        "token_type": "Bearer", "expires_in": 120, "ext_expires_in": 120,
                        "access_token": access_token(tenant, aud),
                    });
                    ("200 OK", body.to_string())
                } else {
                    (
                        "400 Bad Request",
                        r#"{"error":"invalid_request"}"#.to_owned(),
                    )
                };
                let rsp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(rsp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("https://127.0.0.1:{port}/")
}

#[tokio::test]
async fn workload_identity_bearer_tokens_over_https() {
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let az = Azurite::start_https_oauth();
    az.create_container("wid").await;
    let sts = Arc::new(Mutex::new(Sts::default()));
    let authority = start_sts(az.tls().unwrap(), TENANT, sts.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "service-account-token-1\n").unwrap();
    let wi = |client_id: &str| {
        Credentials::WorkloadIdentity(WorkloadIdentity {
            token_file: token_file.clone(),
            client_id: client_id.to_owned(),
            tenant_id: TENANT.to_owned(),
            authority_host: Some(authority.clone()),
        })
    };

    let lake = lake(&az, "wid", &wi("good-client"));
    let etag = lake
        .put("model.bin", pattern(5000, 4), &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        sts.lock().exchanges.last().unwrap(),
        &(
            "good-client".to_owned(),
            "service-account-token-1".to_owned()
        )
    );

    // The kubelet rotates the token: the next exchange must send the new one.
    std::fs::write(&token_file, "service-account-token-2\n").unwrap();
    let got = lake.get_range("model.bin", 100..200, &etag).await.unwrap();
    assert_eq!(got, pattern(5000, 4).slice(100..200));
    assert_eq!(
        sts.lock().exchanges.last().unwrap().1,
        "service-account-token-2"
    );
    assert_eq!(lake.head("model.bin").await.unwrap().size, 5000);

    // Azurite really checks the token: a wrong audience is denied.
    let bad = self::lake(&az, "wid", &wi("bad-audience"));
    let err = bad.head("model.bin").await.unwrap_err();
    assert!(matches!(err, LakeError::Denied { .. }), "{err:?}");
    assert!(
        !format!("{err} {err:?}").contains("service-account-token"),
        "{err:?}"
    );

    // An unknown tenant path at the token endpoint is a denied identity, not a hang.
    let other = Credentials::WorkloadIdentity(WorkloadIdentity {
        token_file: token_file.clone(),
        client_id: "good-client".into(),
        tenant_id: "00000000-0000-0000-0000-000000000000".into(),
        authority_host: Some(authority.clone()),
    });
    let err = self::lake(&az, "wid", &other)
        .head("model.bin")
        .await
        .unwrap_err();
    assert!(matches!(err, LakeError::Denied { .. }), "{err:?}");

    // An unreachable token endpoint is a connection failure (worth retrying).
    let unreachable = Credentials::WorkloadIdentity(WorkloadIdentity {
        token_file: token_file.clone(),
        client_id: "good-client".into(),
        tenant_id: TENANT.into(),
        authority_host: Some("https://127.0.0.1:9/".into()),
    });
    let err = self::lake(&az, "wid", &unreachable)
        .head("model.bin")
        .await
        .unwrap_err();
    assert!(matches!(err, LakeError::Connection { .. }), "{err:?}");
    assert!(err.is_transient());

    // Plain key/SAS auth keeps working over HTTPS with the test CA.
    let keyed = self::lake(&az, "wid", &Credentials::AccountKey(Azurite::account_key()));
    assert_eq!(keyed.head("model.bin").await.unwrap().etag, etag);
    let _: &ETag = &etag;
}
