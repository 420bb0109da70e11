//! The fleet's store against a real etcd started for the test: writes with a revision
//! check, leased documents that go with their node (and a leased key held by one node at
//! a time, the load loop's election), watches, and data that survives an etcd killed
//! and restarted on its disk.

use std::time::Duration;

use lb::fleet::{
    doc::NodeReport,
    store::{FleetConfig, Store, StoreError},
};
use serde_json::{json, Value};
use tests::{can_run, etcd::Etcd};

fn config(etcd: &Etcd, node: &str) -> FleetConfig {
    FleetConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: "/lbt/site".into(),
        node: node.into(),
        tls: None,
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn two_operators_cannot_overwrite_each_other() {
    if !can_run("two_operators_cannot_overwrite_each_other") {
        return;
    }
    let etcd = Etcd::start("rev").unwrap();
    block_on(async {
        let mut a = Store::connect(&config(&etcd, "lb0")).await.unwrap();
        let mut b = Store::connect(&config(&etcd, "lb1")).await.unwrap();
        let empty = a.get::<Value>("services").await.unwrap();
        assert_eq!((empty.value, empty.revision), (None, 0));

        let r1 = a.put_if("services", &json!({"web": 1}), 0).await.unwrap();
        // b read nothing, so b's write "if absent" must fail and name the revision.
        let e = b
            .put_if("services", &json!({"web": 2}), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::Conflict { expected: 0, found, .. } if found == r1),
            "{e}"
        );
        // After reading again, b's write goes through.
        let seen = b.get::<Value>("services").await.unwrap();
        assert_eq!(seen.value, Some(json!({"web": 1})));
        let r2 = b
            .put_if("services", &json!({"web": 2}), seen.revision)
            .await
            .unwrap();
        assert!(r2 > r1);
        let e = a
            .put_if("services", &json!({"web": 3}), r1)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("changed since it was read"), "{e}");
        assert_eq!(
            a.get::<Value>("services").await.unwrap().value,
            Some(json!({"web": 2}))
        );
    });
}

#[test]
fn a_nodes_leased_view_goes_with_it_and_watches_see_it() {
    if !can_run("a_nodes_leased_view_goes_with_it_and_watches_see_it") {
        return;
    }
    let etcd = Etcd::start("lease").unwrap();
    block_on(async {
        let mut a = Store::connect(&config(&etcd, "lb0")).await.unwrap();
        let mut b = Store::connect(&config(&etcd, "lb1")).await.unwrap();
        let mut watch = b.watch(0).await.unwrap();
        let mut lease_a = a.lease(Duration::from_secs(2)).await.unwrap();
        let lease_b = b.lease(Duration::from_secs(60)).await.unwrap();
        a.put_leased("health/lb0", &json!({"10.0.0.2": "down"}), &lease_a)
            .await
            .unwrap();
        b.put_leased("health/lb1", &json!({"10.0.0.2": "up"}), &lease_b)
            .await
            .unwrap();
        let views = b.list::<Value>("health").await.unwrap().docs;
        assert_eq!(views.keys().collect::<Vec<_>>(), ["lb0", "lb1"]);

        // A report that does not parse (another version's) costs the reader that report,
        // not the list.
        b.put_leased(
            "tables/lb0",
            &json!({"revision": 3, "tables": {}}),
            &lease_b,
        )
        .await
        .unwrap();
        b.put_leased("tables/lb1", &json!({"revision": 3, "digest": 7}), &lease_b)
            .await
            .unwrap();
        let reports = b.list::<NodeReport>("tables").await.unwrap();
        assert_eq!(reports.docs.keys().collect::<Vec<_>>(), ["lb0"]);
        let bad: Vec<&String> = reports.unreadable.keys().collect();
        assert!(
            bad.len() == 1 && bad[0].ends_with("/tables/lb1"),
            "{:?}",
            reports.unreadable
        );

        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first[0].name, "health/lb0");
        assert!(first[0].value.is_some());

        // The load loop's election: one holder of the leased key at a time.
        let (lb0, lb1) = ("lb0".to_string(), "lb1".to_string());
        assert_eq!(a.hold("controller", &lb0, &lease_a).await.unwrap(), lb0);
        assert_eq!(b.hold("controller", &lb1, &lease_b).await.unwrap(), lb0);
        assert_eq!(a.hold("controller", &lb0, &lease_a).await.unwrap(), lb0);

        // Renewed, lb0's view stays past its TTL; left alone, it goes.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            lease_a.renew().await.unwrap();
        }
        assert_eq!(b.list::<Value>("health").await.unwrap().docs.len(), 2);
        drop(lease_a);
        let gone = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let changes = watch.next().await.unwrap().unwrap();
                if let Some(c) = changes
                    .iter()
                    .find(|c| c.name == "health/lb0" && c.value.is_none())
                {
                    return c.clone();
                }
            }
        })
        .await
        .expect("lb0's view outlived its lease");
        assert!(gone.revision > 0);
        let views = b.list::<Value>("health").await.unwrap().docs;
        assert_eq!(views.keys().collect::<Vec<_>>(), ["lb1"]);
        // The holder's lease ended: the next to try holds the key.
        assert_eq!(b.hold("controller", &lb1, &lease_b).await.unwrap(), lb1);
    });
}

#[test]
fn etcd_killed_and_restarted_on_its_data_loses_nothing() {
    if !can_run("etcd_killed_and_restarted_on_its_data_loses_nothing") {
        return;
    }
    let mut etcd = Etcd::start("restart").unwrap();
    let cfg = config(&etcd, "lb0");
    let rev = block_on(async {
        let mut s = Store::connect(&cfg).await.unwrap();
        s.put_if("services", &json!({"web": [1, 2, 3]}), 0)
            .await
            .unwrap()
    });
    etcd.kill();
    let down = block_on(async {
        match Store::connect(&cfg).await {
            Ok(mut s) => s.get::<Value>("services").await.err(),
            Err(e) => Some(e),
        }
    });
    assert!(down.is_some(), "a stopped etcd answered");
    etcd.restart().unwrap();
    block_on(async {
        let mut s = Store::connect(&cfg).await.unwrap();
        let v = s.get::<Value>("services").await.unwrap();
        assert_eq!(v.value, Some(json!({"web": [1, 2, 3]})));
        assert_eq!(v.revision, rev);
    });
}
